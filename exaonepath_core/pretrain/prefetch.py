"""One-batch-ahead transfer of loader batches to the training device (pinned memory, a side CUDA stream).

While the step runs on the default stream, the next batch's host-to-device copy runs on a second stream; the
consumer's stream waits for that copy on the device (no host synchronisation), and `record_stream` keeps the
caching allocator from reusing a batch's memory before the step that reads it has finished.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def _move(batch: Any, device: torch.device) -> Any:
    """Tensors (in lists / tuples) copied to `device` without blocking (pinned sources copy asynchronously)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(item, device) for item in batch)
    return batch


def _record(batch: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            _record(item, stream)


def to_device(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """The batches of `batches` on `device`; on CUDA the next one is already in flight while one is used.

    On CPU batches pass through unchanged (the loader's workers already overlap their work with the step).
    """
    if device.type != "cuda":
        yield from batches
        return
    copy_stream = torch.cuda.Stream(device)
    iterator = iter(batches)

    def issue() -> Any:
        try:
            host_batch = next(iterator)
        except StopIteration:
            return None
        with torch.cuda.stream(copy_stream):
            return _move(host_batch, device)

    ahead = issue()
    while ahead is not None:
        current = ahead
        torch.cuda.current_stream(device).wait_stream(copy_stream)
        _record(current, torch.cuda.current_stream(device))
        ahead = issue()  # the next copy is queued before the consumer launches this step's work
        yield current
