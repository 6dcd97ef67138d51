"""The ledger rule of the per-slide stages: one record per slide, status ok | failed, a reason and counts.

A stage that works slide by slide records each attempt so that a rerun skips what is done and reports what
failed. The record form owned here is one JSON file per slide, `<folder>/<slide_id>.json`, written whole and
atomically by the process that handled the slide, so shards on several machines never write the same file
(stage 01's `ledger/`; the shard store's `records/` follow the same form). `read_records` gathers them.

The .npy patch store keeps its older form, one appended `ledger.csv` (a row per attempt, the last row of a
slide wins): turning either form into the other would change the files of existing run folders, so both
stay; they share `STATUSES`. The stages own their columns.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from exaonepath_core.io import atomic

STATUSES = ("ok", "failed")


def check_status(status: str) -> str:
    """Return `status` if it is one of STATUSES, else raise a ValueError that says which are."""
    if status not in STATUSES:
        raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
    return status


def record_path(folder: str | os.PathLike, slide_id: str) -> Path:
    """The record file of `slide_id` in a record folder."""
    return Path(folder) / f"{slide_id}.json"


def write_record(folder: str | os.PathLike, slide_id: str, record: dict[str, Any]) -> Path:
    """Write the record of `slide_id` atomically (a reader sees the old record or the new one, never half)."""
    check_status(record["status"])
    return atomic.write_json(record_path(folder, slide_id), record)


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """One record, or None when the file is missing or unreadable (a rerun then redoes the slide)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every readable, non-empty record of a folder, in file-name order (so sorted by slide id)."""
    records = (read_record(p) for p in sorted(Path(folder).glob("*.json")))
    return [r for r in records if r]
