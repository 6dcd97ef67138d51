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

import csv
import io
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from exaonepath_core.data.cohort import check_shard, parse_shard  # noqa: F401 - parse_shard re-exported
from exaonepath_core.data.stain.macenko import macenko_normalize_batch
from exaonepath_core.data.stain.reference import DEFAULT_MACENKO_PARAMS, MacenkoReference
from exaonepath_core.io import atomic

STORE_FORMAT_VERSION = 1
STORE_MODES = ("raw", "macenko")
STORE_FORMATS = ("npy", "shards")
LEDGER_COLUMNS = ["slide_id", "status", "reason", "n_patches", "n_fallback", "seconds"]
INDEX_COLUMNS = ["patch_index", "slide_id", "x", "y", "fallback"]
_SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")

TileSource = tuple[str, np.ndarray, Callable[[], Iterator[np.ndarray]]]


def _csv_line(values: list) -> bytes:
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


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest.json of a store root."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no patch store at {root}: {path} is missing")
    with open(path) as handle:
        return json.load(handle)


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
        atomic.create_once(self.root / "ledger.csv", _csv_line(LEDGER_COLUMNS))

    def record(self, slide_id: str, status: str, reason: str = "", n_patches: int = 0,
               n_fallback: int = 0, seconds: float = 0.0) -> None:
        """Append one ledger row (a single O_APPEND write, safe with concurrent writers)."""
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        line = _csv_line([slide_id, status, reason, int(n_patches), int(n_fallback), f"{seconds:.3f}"])
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


def warm_up_normalizer(reference: MacenkoReference | None, device: str | torch.device = "cpu") -> float:
    """Run the Macenko kernel once on a tiny batch (numba JIT compile, CUDA context); returns the seconds."""
    start = time.perf_counter()
    macenko_normalize_batch(torch.from_numpy(_warm_up_tiles()).to(device), reference)
    return time.perf_counter() - start


def _warm_up_tiles() -> np.ndarray:
    """Two 16 px tiles of pink and purple pixels of varied density: the kernel takes its full (non-fallback) path."""
    rng = np.random.default_rng(0)
    base = np.array([[200, 120, 180], [130, 60, 150], [230, 170, 200]], dtype=np.float64)
    pixels = base[rng.integers(0, 3, size=(2, 16, 16))] * rng.uniform(0.85, 1.0, size=(2, 16, 16, 1))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _normalized_batches(
    make_batch_iterator: Callable[[], Iterator[np.ndarray]],
    mode: str,
    reference: MacenkoReference | None,
    batch_size: int,
    device: str | torch.device,
    fallback_sink: list[np.ndarray],
    macenko_params: dict | None = None,
) -> Iterator[np.ndarray]:
    """Yield the slide's batches (split to at most batch_size), Macenko-normalized when mode is macenko."""
    for batch in make_batch_iterator():
        batch = np.asarray(batch)
        for start in range(0, len(batch), batch_size):
            chunk = batch[start : start + batch_size]
            if mode == "raw":
                fallback_sink.append(np.zeros(len(chunk), dtype=bool))
                yield chunk
                continue
            if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
                raise ValueError(f"tiles must be uint8 (b, T, T, 3), got {chunk.dtype} {chunk.shape}")
            tensor = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
            normalized, fallback = macenko_normalize_batch(tensor, reference, **(macenko_params or {}))
            fallback_sink.append(fallback.cpu().numpy())
            yield normalized.cpu().numpy()


def normalize_slides(
    tile_sources: Iterable[TileSource],
    root: str | os.PathLike,
    mode: str,
    reference: MacenkoReference | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    progress: bool = True,
    patch_size: int | None = None,
    macenko_params: dict | None = None,
    store_format: str = "npy",
    encoding: str = "jpeg",
    quality: int = 90,
    shard_max_bytes: int | None = None,
    jpeg_subsampling: str = "4:2:0",
) -> pd.DataFrame:
    """Write every slide of this shard into the store (normalized when mode == 'macenko'); returns its ledger.

    `macenko_params`: Io / alpha / beta of the per-patch stain estimate (default 240 / 1 / 0.15, the paper's);
    recorded in the store's manifest, which refuses a later run with other values unless force.
    `store_format`: "npy" (this module's uncompressed store) or "shards" (`shard_store`: `encoding` jpeg | png |
    webp at `quality`, JPEG chroma `jpeg_subsampling`, tar shards of at most `shard_max_bytes`).

    `tile_sources` yields (slide_id, coords (N, 2), make_batch_iterator) where the iterator yields uint8
    (b, T, T, 3) tiles in the order of coords. A failing slide is recorded in the ledger with its reason and
    the run goes on; slides whose last ledger row is ok are skipped unless force. The patch size comes from
    `patch_size` or from the first tile batch. Returns the latest ledger rows of this shard's slides with a
    `skipped` column; the fallback total is printed when progress is on.

    When every slide of `tile_sources` (all shards, not only this one) has a ledger row, the store is finalized
    (`finalize_store`: index.csv and the manifest counts); `ledger.attrs["store_finalized"]` says whether it was.
    In macenko mode the kernel is warmed up once before the first slide, so the JIT compile time is not in any
    slide's seconds; `ledger.attrs["warmup_seconds"]` holds it (None when no slide was normalized).
    """
    if mode not in STORE_MODES:
        raise ValueError(f"mode must be one of {STORE_MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode == "macenko" and reference is None:
        reference = MacenkoReference.default()
    if mode == "raw" and reference is not None:
        raise ValueError("a reference makes no sense for mode='raw'")
    sources: dict[str, TileSource] = {}
    for source in tile_sources:
        slide_id = validate_slide_id(source[0])
        if slide_id in sources:
            raise ValueError(f"slide id {slide_id!r} appears twice in tile_sources")
        sources[slide_id] = source
    selected = shard_slide_ids(sources, shard)
    root = Path(root)
    if macenko_params is not None and set(macenko_params) - set(DEFAULT_MACENKO_PARAMS):
        raise ValueError(f"macenko_params takes {sorted(DEFAULT_MACENKO_PARAMS)}, got {sorted(macenko_params)}")
    if store_format not in STORE_FORMATS:
        raise ValueError(f"store_format must be one of {STORE_FORMATS}, got {store_format!r}")

    def open_writer(size: int):
        if store_format == "npy":
            return PatchStoreWriter(root, size, mode, reference, force=force, macenko_params=macenko_params)
        from exaonepath_core.data import shard_store

        return shard_store.ShardStoreWriter(
            root, size, mode, reference, force=force, macenko_params=macenko_params, encoding=encoding,
            quality=quality, shard_max_bytes=shard_max_bytes or shard_store.DEFAULT_SHARD_MAX_BYTES,
            subsampling=jpeg_subsampling)

    writer = None if patch_size is None else open_writer(patch_size)
    skipped: list[str] = []
    warmup_seconds = None
    for position, slide_id in enumerate(selected):
        _, coords, make_batch_iterator = sources[slide_id]
        if writer is not None and not force and writer.has_slide(slide_id):
            skipped.append(slide_id)
            continue
        if mode == "macenko" and warmup_seconds is None:
            # The first call compiles the numba kernel (or starts CUDA): tens of seconds that would otherwise
            # be charged to the first slide's ledger row.
            warmup_seconds = warm_up_normalizer(reference, device)
            if progress:
                print(f"normalize_slides: kernel warm-up (JIT compile) {warmup_seconds:.1f} s, not charged to "
                      "any slide", file=sys.stderr)
        start = time.perf_counter()
        try:
            batches = iter(make_batch_iterator())
            first = next(batches, None)
            if writer is None:
                if first is None:
                    raise ValueError("no tiles and no patch_size given: cannot tell the store's patch size")
                writer = open_writer(int(np.asarray(first).shape[1]))
                if not force and writer.has_slide(slide_id):
                    skipped.append(slide_id)
                    continue

            def replay(first=first, batches=batches):
                if first is not None:
                    yield first
                yield from batches

            flags: list[np.ndarray] = []
            row = writer.write_slide(
                slide_id, np.asarray(coords),
                _normalized_batches(replay, mode, reference, batch_size, device, flags, writer.macenko_params),
                fallback=flags,
            )
            if progress:
                print(f"[{position + 1}/{len(selected)}] {slide_id}: {row['n_patches']} patches, "
                      f"{row['n_fallback']} fallback, {row['seconds']:.1f} s", file=sys.stderr)
        except Exception as error:  # one bad slide must not stop the cohort
            reason = f"{type(error).__name__}: {error}"
            if writer is None:
                raise RuntimeError(f"slide {slide_id} failed before the store could be opened: {reason}") from error
            writer.record(slide_id, "failed", reason, seconds=time.perf_counter() - start)
            if progress:
                print(f"[{position + 1}/{len(selected)}] {slide_id}: FAILED {reason}", file=sys.stderr)
                traceback.print_exc(limit=3, file=sys.stderr)
    if writer is not None and hasattr(writer, "close"):
        writer.close()  # the shard writer's open tar gets its end-of-archive blocks
    # Every shard checks whether the whole listing is done; the last to finish writes the index and the counts
    # (finalizing is idempotent, so two shards finishing together both write the same files).
    if store_format == "npy":
        finalized = (root / "manifest.json").is_file() and is_store_complete(root, sources)
        if finalized:
            finalize_store(root)
        ledger = read_ledger(root)
    else:
        from exaonepath_core.data import shard_store

        finalized = (root / "manifest.json").is_file() and shard_store.is_shard_store_complete(root, sources)
        if finalized:
            shard_store.finalize_shard_store(root)
        ledger = shard_store.read_shard_ledger(root)[LEDGER_COLUMNS]
    ledger = ledger[ledger["slide_id"].isin(selected)].reset_index(drop=True)
    ledger["skipped"] = ledger["slide_id"].isin(skipped)
    ledger.attrs.update(store_finalized=finalized, warmup_seconds=warmup_seconds)
    if progress:
        ok = ledger["status"] == "ok"
        state = ("store finalized (index.csv, manifest counts)" if finalized
                 else "store not finalized yet: other shards' slides are missing")
        print(f"normalize_slides: {int(ok.sum())} ok ({len(skipped)} skipped as done), "
              f"{int((~ok).sum())} failed, {int(ledger.loc[ok, 'n_patches'].sum())} patches, "
              f"{int(ledger.loc[ok, 'n_fallback'].sum())} fallback; {state}", file=sys.stderr)
    return ledger


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
