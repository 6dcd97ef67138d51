"""What every store root of stage 02 shares: safe slide ids, the shard split of a slide listing, the manifest,
the ledger's columns, and the selection of slides by per-slide arrays.

The store formats (`patch_store`: one .npy per slide; `shard_store`: encoded patches in tar shards; `storeless`:
a coordinate index read from the slides) and their readers build on this module, never on each other.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from exaonepath_core.config import check_shard

LEDGER_COLUMNS = ["slide_id", "status", "reason", "n_patches", "n_fallback", "seconds"]
_SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")

# (slide_id, coords (N, 2), make_batch_iterator): what stage 02 normalizes, one slide at a time
TileSource = tuple[str, np.ndarray, Callable[[], Iterator[np.ndarray]]]


def csv_line(values: list) -> bytes:
    """One CSV row, newlines inside fields flattened so that one row stays one line."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        [str(v).replace("\r", " ").replace("\n", " | ") for v in values]
    )
    return buffer.getvalue().encode()


def validate_slide_id(slide_id: str) -> str:
    """Return `slide_id` if it is safe as a file name, else raise ValueError."""
    if not isinstance(slide_id, str) or not _SLIDE_ID_PATTERN.match(slide_id):
        raise ValueError(
            f"slide id {slide_id!r} is not a safe file name (letters, digits, '._+-', not starting with a dot)"
        )
    return slide_id


def shard_slide_ids(slide_ids: Iterable[str], shard: tuple[int, int]) -> list[str]:
    """The deterministic i-th of N parts of the sorted slide ids (round robin over the sorted list)."""
    index, count = check_shard(shard)
    return [s for position, s in enumerate(sorted(slide_ids)) if position % count == index]


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest.json of a store root."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no patch store at {root}: {path} is missing")
    with open(path) as handle:
        return json.load(handle)


class SlideSelection:
    """Dataset index -> index row over a subset of slides, from per-slide arrays only (no per-patch objects)."""

    def __init__(self, all_slide_ids: list[str], first_row: np.ndarray, slide_ids: Iterable[str] | None,
                 where: str) -> None:
        position = {s: i for i, s in enumerate(all_slide_ids)}
        if slide_ids is None:
            kept = np.arange(len(all_slide_ids))
        else:
            wanted = sorted(set(slide_ids))
            missing = [s for s in wanted if s not in position]
            if missing:
                raise KeyError(f"slides not in {where}: {missing[:10]} ({len(missing)} in all)")
            kept = np.array([position[s] for s in wanted], dtype=np.int64)
        first_row = np.asarray(first_row, dtype=np.int64)
        self.slide_ids = [all_slide_ids[i] for i in kept]
        self.first_row = first_row[kept] if len(kept) else np.zeros(0, dtype=np.int64)
        counts = (first_row[1:] - first_row[:-1])[kept] if len(kept) else np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row(self, index: int) -> int:
        """Row in the full index of dataset item `index` (negative indices count from the end)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"patch index {index} out of range for {n} patches")
        index = int(index) % n
        slide = int(np.searchsorted(self.starts, index, side="right")) - 1
        return int(self.first_row[slide] + index - self.starts[slide])
