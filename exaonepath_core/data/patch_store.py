"""Patch store: (normalized) patches written once per slide as one .npy each, streamed back by a Dataset.

Layout of a store root::

    manifest.json            patch_size, mode, reference, counts (counts filled by finalize())
    ledger.csv               one appended row per attempt: slide_id, status ok/failed, reason, n_patches,
                             n_fallback, seconds (the last row of a slide wins)
    slides/<slide_id>.npy    uint8 (N, T, T, 3), written to a temp file then renamed
    slides/<slide_id>.csv    x, y, fallback per patch (same order as the .npy)
    index.csv                patch_index, slide_id, x, y, fallback over all ok slides (finalize_store(), which
                             normalize_slides runs once every slide of its listing has a ledger row; a later
                             ledger row removes it again, and readers then index from the ledger)

Several processes may write disjoint slides into one root: every file a slide owns is renamed into place
atomically and ledger rows are appended with single O_APPEND writes.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from exaonepath_core.config import DEFAULT_MACENKO_PARAMS
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.data.store_layout import LEDGER_COLUMNS, csv_line, read_manifest, validate_slide_id
from exaonepath_core.io import atomic

STORE_FORMAT_VERSION = 1
INDEX_COLUMNS = ["patch_index", "slide_id", "x", "y", "fallback"]

def read_ledger(root: str | os.PathLike, latest_only: bool = True) -> pd.DataFrame:
    """The ledger of a store root (last attempt per slide when `latest_only`); empty frame when none."""
    path = Path(root) / "ledger.csv"
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER_COLUMNS})
    ledger = pd.read_csv(path, dtype={"slide_id": str, "status": str, "reason": str}, keep_default_na=False)
    if list(ledger.columns) != LEDGER_COLUMNS:
        raise ValueError(f"{path} has columns {list(ledger.columns)}, expected {LEDGER_COLUMNS}")
    if latest_only:
        ledger = ledger.drop_duplicates("slide_id", keep="last").reset_index(drop=True)
    return ledger


def _slide_table(root: Path, slide_id: str) -> pd.DataFrame:
    table = pd.read_csv(root / "slides" / f"{slide_id}.csv", dtype={"x": np.int64, "y": np.int64})
    if list(table.columns) != ["x", "y", "fallback"]:
        raise ValueError(f"{root}/slides/{slide_id}.csv has columns {list(table.columns)}, expected x,y,fallback")
    table["fallback"] = table["fallback"].astype(bool)
    return table


def build_index(root: str | os.PathLike, slide_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Index rows (patch_index, slide_id, x, y, fallback) of the ok slides, slides sorted by id."""
    root = Path(root)
    ledger = read_ledger(root)
    ok_ids = sorted(ledger.loc[ledger["status"] == "ok", "slide_id"])
    if slide_ids is not None:
        wanted = list(slide_ids)
        missing = sorted(set(wanted) - set(ok_ids))
        if missing:
            raise KeyError(f"slides not stored (or not ok) in {root}: {missing[:10]} ({len(missing)} in all)")
        ok_ids = sorted(set(wanted))
    tables = []
    for slide_id in ok_ids:
        table = _slide_table(root, slide_id)
        table.insert(0, "slide_id", slide_id)
        tables.append(table)
    if tables:
        index = pd.concat(tables, ignore_index=True)
    else:
        index = pd.DataFrame({"slide_id": pd.Series(dtype=str), "x": pd.Series(dtype=np.int64),
                              "y": pd.Series(dtype=np.int64), "fallback": pd.Series(dtype=bool)})
    index.insert(0, "patch_index", np.arange(len(index), dtype=np.int64))
    return index[INDEX_COLUMNS]


class PatchStoreWriter:
    """Writes one slide at a time into a store root; refuses a root made with another mode or patch size."""

    def __init__(
        self,
        root: str | os.PathLike,
        patch_size: int,
        mode: str,
        reference: MacenkoReference | None = None,
        force: bool = False,
        macenko_params: dict | None = None,
    ) -> None:
        if int(patch_size) <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if not isinstance(mode, str) or not mode:
            raise ValueError(f"mode must be a non-empty string, got {mode!r}")
        self.root = Path(root)
        self.patch_size = int(patch_size)
        self.mode = mode
        self.reference = reference
        # Io / alpha / beta of the per-patch stain estimate (macenko mode); a store is written with one set
        self.macenko_params = None if mode == "raw" else {**DEFAULT_MACENKO_PARAMS, **(macenko_params or {})}
        self.force = force
        (self.root / "slides").mkdir(parents=True, exist_ok=True)
        self._open_manifest()
        self._create_ledger()

    def _manifest_settings(self) -> dict:
        return {
            "format_version": STORE_FORMAT_VERSION,
            "patch_size": self.patch_size,
            "mode": self.mode,
            "reference": None if self.reference is None else self.reference.to_dict(),
            "macenko_params": self.macenko_params,
        }

    def _open_manifest(self) -> None:
        path = self.root / "manifest.json"
        settings = self._manifest_settings()
        if path.is_file():
            existing = read_manifest(self.root)
            problems = []
            # stores written before macenko_params was recorded used the defaults
            existing.setdefault("macenko_params", None if existing.get("mode") == "raw" else DEFAULT_MACENKO_PARAMS)
            for key in ("format_version", "patch_size", "mode", "macenko_params"):
                if existing.get(key) != settings[key]:
                    problems.append(f"{key}: store has {existing.get(key)!r}, asked for {settings[key]!r}")
            stored_ref = existing.get("reference")
            if (stored_ref is None) != (self.reference is None) or (
                stored_ref is not None and not MacenkoReference.from_dict(stored_ref).allclose(self.reference)
            ):
                problems.append("reference differs from the one the store was written with")
            if not problems:
                return
            if not self.force:
                raise ValueError(
                    f"patch store {self.root} was written with other settings ("
                    + "; ".join(problems)
                    + "); use another root or force=True to overwrite"
                )
        settings["counts"] = None
        (self.root / "index.csv").unlink(missing_ok=True)  # an index of the store's earlier settings
        atomic.write_json(path, settings)

    def _create_ledger(self) -> None:
        # create_once links a complete file into place, so concurrent writers create the header exactly once
        atomic.create_once(self.root / "ledger.csv", csv_line(LEDGER_COLUMNS))

    def record(self, slide_id: str, status: str, reason: str = "", n_patches: int = 0,
               n_fallback: int = 0, seconds: float = 0.0) -> None:
        """Append one ledger row (a single O_APPEND write, safe with concurrent writers)."""
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        line = csv_line([slide_id, status, reason, int(n_patches), int(n_fallback), f"{seconds:.3f}"])
        fd = os.open(self.root / "ledger.csv", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # umask applies
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        _invalidate_index(self.root)

    def has_slide(self, slide_id: str) -> bool:
        """True when the ledger's last row for this slide is ok and its files are in place."""
        ledger = read_ledger(self.root)
        rows = ledger[ledger["slide_id"] == slide_id]
        if rows.empty or rows["status"].iloc[-1] != "ok":
            return False
        return (self.root / "slides" / f"{slide_id}.npy").is_file() and (
            self.root / "slides" / f"{slide_id}.csv"
        ).is_file()

    def write_slide(
        self,
        slide_id: str,
        coords: np.ndarray,
        batches: Iterable[np.ndarray],
        fallback: Iterable | None = None,
        seconds_offset: float = 0.0,
    ) -> dict:
        """Stream uint8 (b, T, T, 3) batches of one slide to disk; exactly len(coords) patches are required.

        `fallback` (per-patch flags, as one array or per-batch arrays) is read after all batches, so it may be
        filled while the batches are produced. Records an ok ledger row and returns it as a dict; on any error
        the temp files are removed and the error propagates (the caller records the failure).
        """
        validate_slide_id(slide_id)
        start = time.perf_counter()
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
            raise ValueError(f"coords of {slide_id} must be an integer (N, 2) array, got {coords.dtype} {coords.shape}")
        n_patches = len(coords)
        size = self.patch_size
        slides_dir = self.root / "slides"
        # The csv is renamed into place first (inner block): a slide counts as present only once its .npy is.
        with atomic.atomic_path(slides_dir / f"{slide_id}.npy") as tmp_npy:
            array = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n_patches, size, size, 3))
            written = 0
            for batch in batches:
                batch = np.asarray(batch)
                if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
                    raise ValueError(
                        f"slide {slide_id}: batches must be uint8 (b, {size}, {size}, 3), got {batch.dtype} {batch.shape}"
                    )
                if written + len(batch) > n_patches:
                    raise ValueError(f"slide {slide_id}: more patches than the {n_patches} coordinates")
                array[written : written + len(batch)] = batch
                written += len(batch)
            if written != n_patches:
                raise ValueError(f"slide {slide_id}: got {written} patches for {n_patches} coordinates")
            array.flush()
            del array
            if fallback is None:
                flags = np.zeros(n_patches, dtype=bool)
            elif isinstance(fallback, np.ndarray | torch.Tensor):
                flags = np.asarray(fallback, dtype=bool).reshape(-1)
            else:
                parts = [np.asarray(f, dtype=bool).reshape(-1) for f in fallback]
                flags = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
            if len(flags) != n_patches:
                raise ValueError(f"slide {slide_id}: {len(flags)} fallback flags for {n_patches} patches")
            table = pd.DataFrame({"x": coords[:, 0].astype(np.int64), "y": coords[:, 1].astype(np.int64),
                                  "fallback": flags.astype(np.int8)})
            atomic.write_csv(table, slides_dir / f"{slide_id}.csv")
        row = {"slide_id": slide_id, "status": "ok", "reason": "", "n_patches": n_patches,
               "n_fallback": int(flags.sum()), "seconds": seconds_offset + time.perf_counter() - start}
        self.record(**row)
        return row

    def finalize(self) -> pd.DataFrame:
        """Write index.csv over all ok slides and the counts into manifest.json; returns the index."""
        return finalize_store(self.root)


def finalize_store(root: str | os.PathLike) -> pd.DataFrame:
    """Write index.csv over all ok slides and the counts into manifest.json; returns the index (idempotent).

    A later ledger row (a slide added, retried or rewritten) removes index.csv and resets the counts to null,
    so readers never use a stale index; readers build the index from the ledger while index.csv is missing.
    """
    root = Path(root)
    index = build_index(root)
    atomic.write_csv(index.assign(fallback=index["fallback"].astype(np.int8)), root / "index.csv")
    ledger = read_ledger(root)
    manifest = read_manifest(root)
    manifest["counts"] = {
        "n_slides_ok": int((ledger["status"] == "ok").sum()),
        "n_slides_failed": int((ledger["status"] == "failed").sum()),
        "failed_slides": sorted(ledger.loc[ledger["status"] == "failed", "slide_id"]),
        "n_patches": len(index),
        "n_fallback": int(index["fallback"].sum()),
    }
    atomic.write_json(root / "manifest.json", manifest)
    return index


def _invalidate_index(root: Path) -> None:
    """Drop a finalized index.csv and the manifest counts once the ledger changes after finalize_store."""
    index_path = root / "index.csv"
    if not index_path.exists():
        return
    index_path.unlink(missing_ok=True)
    manifest = read_manifest(root)
    if manifest.get("counts") is not None:
        manifest["counts"] = None
        atomic.write_json(root / "manifest.json", manifest)


def is_store_complete(root: str | os.PathLike, slide_ids: Iterable[str]) -> bool:
    """True when every one of `slide_ids` has a ledger row (ok or failed) in the store at `root`."""
    done = set(read_ledger(root)["slide_id"])
    return all(slide_id in done for slide_id in slide_ids)


def rank_indices(n: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's indices: a seeded permutation padded by wrap-around, split like DistributedSampler."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).numpy()
    total = math.ceil(n / world_size) * world_size
    if n and total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[rank:total:world_size].astype(np.int64)


class PatchStoreDataset(torch.utils.data.Dataset):
    """Patches of a store root as uint8 (T, T, 3) arrays, read through per-slide memmaps opened lazily."""

    def __init__(self, root: str | os.PathLike, slide_ids: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.patch_size = int(manifest["patch_size"])
        self.mode = manifest["mode"]
        self.reference = (None if manifest.get("reference") is None
                          else MacenkoReference.from_dict(manifest["reference"]))
        index_path = self.root / "index.csv"
        if index_path.is_file():
            index = pd.read_csv(index_path, dtype={"slide_id": str}, keep_default_na=False)
            if slide_ids is not None:
                wanted = set(slide_ids)
                missing = sorted(wanted - set(index["slide_id"]))
                if missing:
                    raise KeyError(f"slides not in {index_path}: {missing[:10]} ({len(missing)} in all)")
                index = index[index["slide_id"].isin(wanted)].reset_index(drop=True)
        else:
            index = build_index(self.root, slide_ids)
        self.slide_ids = index["slide_id"].to_numpy(dtype=str)
        self.coords = index[["x", "y"]].to_numpy(dtype=np.int64).reshape(-1, 2)
        self.fallback = index["fallback"].to_numpy().astype(bool)
        # patches of one slide are contiguous in the index; keep (slide, row-in-slide) per patch
        self._slide_names, first_rows, slide_of_patch = np.unique(self.slide_ids, return_index=True,
                                                                  return_inverse=True)
        self._slide_of_patch = slide_of_patch.astype(np.int64)
        self._row_in_slide = np.arange(len(index)) - first_rows[self._slide_of_patch]
        counts = np.bincount(self._slide_of_patch, minlength=len(self._slide_names))
        for name, count in zip(self._slide_names, counts):
            array = np.load(self.root / "slides" / f"{name}.npy", mmap_mode="r")
            if array.shape != (count, self.patch_size, self.patch_size, 3) or array.dtype != np.uint8:
                raise ValueError(f"{self.root}/slides/{name}.npy is {array.dtype} {array.shape}, index expects "
                                 f"uint8 ({count}, {self.patch_size}, {self.patch_size}, 3)")
            del array
        self._memmaps: dict[int, np.ndarray] = {}
        self._owner_pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slide_ids)

    def _slide_array(self, slide: int) -> np.ndarray:
        if self._owner_pid != os.getpid():  # a forked worker opens its own maps
            self._memmaps = {}
            self._owner_pid = os.getpid()
        array = self._memmaps.get(slide)
        if array is None:
            array = np.load(self.root / "slides" / f"{self._slide_names[slide]}.npy", mmap_mode="r")
            self._memmaps[slide] = array
        return array

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        index = int(index) % len(self)
        return np.array(self._slide_array(int(self._slide_of_patch[index]))[self._row_in_slide[index]])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_memmaps"] = {}
        return state
