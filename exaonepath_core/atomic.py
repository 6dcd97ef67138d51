"""Atomic file writes: write to a temp file in the target's folder, then rename over the target.

Readers (a resumed run, another shard, a notebook) never see a half-written file, and an interrupted write
leaves the previous version intact. Every stage writes its files through `atomic_path`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Bytes to `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text to `path`, atomically (newlines written as given)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any, indent: int = 2) -> Path:
    """JSON to `path`, atomically (non-JSON values via str)."""
    return write_text(path, json.dumps(payload, indent=indent, default=str) + "\n")


def write_csv(df: Any, path: str | os.PathLike) -> Path:
    """A pandas DataFrame as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to `path`, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
