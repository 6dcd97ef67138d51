"""The tiling ledger: one JSON record per slide under ledger/, gathered into ledger.csv and summary.csv.

The record form (writing, reading, statuses) is `io/ledger.py`'s, shared with the other per-slide stages;
this module owns what a tiling record holds (LEDGER_COLUMNS, the duplicate-id record) and the two tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from exaonepath_core.io import atomic, ledger

LEDGER_COLUMNS = ["slide_id", "slide_path", "status", "reason", "n_tiles", "seconds"]


def ledger_dir(out_dir: str | Path) -> Path:
    """The folder of the per-slide records of a tiling folder."""
    return Path(out_dir) / "ledger"


def save_record(out_dir: str | Path, record: dict[str, Any]) -> None:
    """Write one slide's record (atomic; the process that tiled the slide is its only writer)."""
    ledger.write_record(ledger_dir(out_dir), record["slide_id"], record)


def read_record(out_dir: str | Path, slide_id: str) -> dict[str, Any] | None:
    """The record of `slide_id`, None when there is none (or it cannot be read)."""
    return ledger.read_record(ledger.record_path(ledger_dir(out_dir), slide_id))


def failed_record(slide_path: str | Path, slide_id: str, reason: str, seconds: float = 0.0) -> dict[str, Any]:
    """The record of a slide that could not be tiled."""
    return {"slide_id": slide_id, "slide_path": str(slide_path), "status": "failed", "reason": reason,
            "n_tiles": 0, "seconds": seconds}


def duplicate_record(slide_id: str, paths: list[Path]) -> dict[str, Any]:
    """The failed ledger record of an id shared by several files (one record, one ledger row per path)."""
    names = ", ".join(str(p) for p in paths)
    reason = (f"duplicate slide id {slide_id!r} shared by {len(paths)} files ({names}): none tiled; "
              "rename all but one (the id is the file name without its extension)")
    return {**failed_record(paths[0], slide_id, reason), "duplicate_paths": [str(p) for p in paths]}


def read_ledger(out_dir: str | Path) -> pd.DataFrame:
    """All per-slide records under out_dir/ledger/ as a table (LEDGER_COLUMNS first), sorted by slide_id.

    A slide id shared by several files of the listing gives one failed row per file (same id, both paths).
    """
    rows = []
    for record in ledger.read_records(ledger_dir(out_dir)):
        # A duplicate id is one record naming every file that shares it: one failed row per file.
        for path in record.pop("duplicate_paths", None) or [record["slide_path"]]:
            rows.append({**record, "slide_path": path})
    table = pd.DataFrame(rows)
    for col in LEDGER_COLUMNS:
        if col not in table.columns:
            table[col] = pd.Series(dtype=object)
    extra = [c for c in table.columns if c not in LEDGER_COLUMNS]
    return table[LEDGER_COLUMNS + extra].sort_values("slide_id", kind="stable").reset_index(drop=True)


def write_tables(out_dir: Path) -> pd.DataFrame:
    """Gather every shard's records into ledger.csv and summary.csv (atomic); returns the whole ledger."""
    table = read_ledger(out_dir)
    atomic.write_text(out_dir / "ledger.csv", table[LEDGER_COLUMNS].to_csv(index=False))
    ok = table["status"] == "ok"
    summary = pd.DataFrame(
        [{
            "slides": len(table),
            "ok": int(ok.sum()),
            "failed": int((~ok).sum()),
            "tiles": int(pd.to_numeric(table.loc[ok, "n_tiles"]).sum()) if ok.any() else 0,
            "ok_zero_tiles": int((ok & (pd.to_numeric(table["n_tiles"]) == 0)).sum()),
        }]
    )
    atomic.write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    return table
