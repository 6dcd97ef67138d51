"""Tile a cohort: the slide listing, duplicate ids, deterministic shards and a pool of worker processes.

Every slide gets a ledger record (`ledger.py`); a rerun skips slides that tiled and, unless forced, those that
failed; the run always finishes and gathers every shard's records into ledger.csv and summary.csv.
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pandas as pd

from exaonepath_core.config import check_shard
from exaonepath_core.data.tiling import ledger
from exaonepath_core.data.tiling.coords import coords_path
from exaonepath_core.data.tiling.params import TilingParams
from exaonepath_core.data.tiling.slide import tile_slide
from exaonepath_core.io import atomic
from exaonepath_core.io.slides import (
    SlideError,
    find_slides,
    is_slide_file_name,
    list_file_entries,
    slide_id_from_path,
)

# (slide path, tiling folder, TilingParams as a dict, mpp override): what one worker process is given
Task = tuple[str, str, dict[str, Any], float | None]


def list_slides(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Slide paths from a folder (recursive, by extension), one slide file, a text file (one path per line) or a list.

    Relative paths of a text file are taken relative to the file's folder; '#' starts a comment line.
    """
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source]
    source = Path(source)
    if source.is_dir():
        return find_slides(source)
    if source.is_file() and is_slide_file_name(source):
        return [source]  # one slide, not a list file
    if source.is_file():
        return [p if p.is_absolute() else source.parent / p for p in map(Path, list_file_entries(source))]
    raise FileNotFoundError(f"slide source not found: {source} (give a folder or a text file of paths)")


def duplicate_slide_ids(slide_paths: Sequence[str | Path]) -> dict[str, list[Path]]:
    """{slide id: its sorted paths} for every id that more than one entry of the listing maps to."""
    by_id: dict[str, list[Path]] = {}
    for p in slide_paths:
        by_id.setdefault(slide_id_from_path(p), []).append(Path(p))
    return {sid: sorted(paths, key=str) for sid, paths in sorted(by_id.items()) if len(paths) > 1}


def shard_slides(slide_paths: Sequence[str | Path], shard: tuple[int, int] = (0, 1)) -> list[Path]:
    """Shard i of N of the sorted slide list (round-robin, so every shard gets a similar mix of sizes)."""
    index, count = check_shard(shard)
    ordered = sorted((Path(p) for p in slide_paths), key=lambda p: (slide_id_from_path(p), str(p)))
    return ordered[index::count]


def _check_params_file(out_dir: Path, params: TilingParams) -> None:
    """Refuse to mix tiles of different parameters in one folder; record the parameters on first use."""
    path = out_dir / "params.json"
    wanted = params.to_dict()
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            diff = {k: (existing.get(k), v) for k, v in wanted.items() if existing.get(k) != v}
            raise ValueError(f"{out_dir} holds tiles made with other parameters {diff}; use another folder")
    else:
        atomic.write_text(path, json.dumps(wanted, indent=2, sort_keys=True))


def _tile_one_safely(slide_path: str, out_dir: str, params_dict: dict[str, Any], mpp: float | None) -> dict[str, Any]:
    """Worker entry point: tile one slide and turn any exception into a failed record (never raises)."""
    start = time.perf_counter()
    try:
        return tile_slide(slide_path, out_dir, TilingParams.from_dict(params_dict), mpp_override=mpp)
    except SlideError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bad slide must never stop the cohort; the cause goes to the ledger
        reason = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-2].strip()}"
    return ledger.failed_record(slide_path, slide_id_from_path(slide_path), reason,
                                seconds=round(time.perf_counter() - start, 3))


def _override_for(path: Path, mpp_overrides: float | dict[str, float] | None) -> float | None:
    if mpp_overrides is None or isinstance(mpp_overrides, (int, float)):
        return None if mpp_overrides is None else float(mpp_overrides)
    for key in (str(path), path.name, slide_id_from_path(path)):
        if key in mpp_overrides:
            return float(mpp_overrides[key])
    return None


def _run_pool(tasks: list[Task], workers: int, on_done: Callable[[dict[str, Any]], None]) -> list[Task]:
    """Run tasks in a spawn pool; returns the tasks whose worker process died (crashed C library)."""
    crashed = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_tile_one_safely, *task): task for task in tasks}
        for fut in as_completed(futures):
            try:
                on_done(fut.result())
            except BrokenProcessPool:
                crashed.append(futures[fut])
    return crashed


def _run_tasks(tasks: list[Task], workers: int, on_done: Callable[[dict[str, Any]], None]) -> None:
    """Every task in this process (workers <= 1) or in a pool; a worker that crashed is isolated and recorded."""
    if workers <= 1:
        for task in tasks:
            on_done(_tile_one_safely(*task))
        return
    crashed = _run_pool(tasks, workers, on_done)
    # A dead worker breaks every pending future: rerun those one by one to find the culprit.
    for task in crashed:
        if _run_pool([task], 1, on_done):
            on_done(ledger.failed_record(task[0], slide_id_from_path(task[0]),
                                         "worker process crashed while reading the slide (corrupt file?)"))


def _record_duplicates(out_dir: Path, duplicates: dict[str, list[Path]], progress: bool) -> None:
    """Record (and report) every id shared by several files; a record already on disk is not rewritten."""
    for sid, paths in duplicates.items():
        record = ledger.duplicate_record(sid, paths)
        if progress:
            print(f"[tiling] FAILED {sid}: {record['reason']}", file=sys.stderr)
        if ledger.read_record(out_dir, sid) != record:
            ledger.save_record(out_dir, record)


def _is_done(out_dir: Path, path: Path, force: bool) -> bool:
    """True when the slide's record says it tiled (and its coords file exists), or failed and not `force`."""
    sid = slide_id_from_path(path)
    previous = ledger.read_record(out_dir, sid)
    if previous is None or previous.get("slide_path") != str(path) or previous.get("duplicate_paths"):
        return False
    if previous.get("status") == "ok" and coords_path(out_dir, sid).is_file():
        return True
    return previous.get("status") == "failed" and not force


def tile_cohort(
    slide_paths: Sequence[str | Path],
    out_dir: str | Path,
    params: TilingParams | None = None,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    mpp_overrides: float | dict[str, float] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Tile this shard's slides into out_dir with a worker pool; returns the ledger rows of this shard.

    `shard` (i, N) is 0-based. Slide ids (file names without extension) must be unique over the whole listing:
    every file of a shared id is a failed row (reason naming all of them) in every shard's result and in
    ledger.csv / summary.csv, and none of them is tiled; the other slides are.

    Slides whose record is ok (and whose coords file exists) are skipped; failed ones are retried only with
    force. Every slide gets a record: unreadable, mpp-less or crashing slides are 'failed' with a reason, and
    the run always finishes, writing ledger.csv and summary.csv over every shard's records in out_dir.
    `mpp_overrides`: one um/px for all slides or a mapping from path, file name or slide id.
    """
    from tqdm.auto import tqdm

    params = params or TilingParams()
    check_shard(shard)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_params_file(out_dir, params)
    # Duplicates are found over the whole listing, before sharding: two files with one id would otherwise land
    # in different shards and overwrite each other's coords. Every shard records and reports them, none tiles.
    duplicates = duplicate_slide_ids(slide_paths)
    mine = shard_slides([p for p in slide_paths if slide_id_from_path(p) not in duplicates], shard)
    ledger.ledger_dir(out_dir).mkdir(exist_ok=True)
    _record_duplicates(out_dir, duplicates, progress)
    tasks = [(str(path), str(out_dir), params.to_dict(), _override_for(path, mpp_overrides))
             for path in mine if not _is_done(out_dir, path, force)]
    bar = tqdm(total=len(tasks), desc=f"tiling shard {shard[0]}/{shard[1]}", unit="slide", disable=not progress)

    def on_done(record: dict[str, Any]) -> None:
        ledger.save_record(out_dir, record)
        bar.update(1)
        bar.set_postfix_str(f"{record['slide_id']}: {record['status']} {record['n_tiles']} tiles")

    try:
        _run_tasks(tasks, workers, on_done)
    finally:
        bar.close()
    table = ledger.write_tables(out_dir)
    mine_ids = {slide_id_from_path(p) for p in mine} | set(duplicates)
    return table[table["slide_id"].isin(mine_ids)].reset_index(drop=True)
