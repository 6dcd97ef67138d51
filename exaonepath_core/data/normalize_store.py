"""Stage 02's writer: every slide of a shard normalized (or kept raw) into a patch store of either format.

`normalize_slides` reads each slide's tiles, Macenko-normalizes them in batches on the device when the store's
mode is macenko, and writes them through the store writer of `store_format` (`patch_store` for npy,
`shard_store` for shards); a failing slide is recorded in the ledger and the run goes on.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from exaonepath_core.config import DEFAULT_MACENKO_PARAMS, STORE_FORMATS, STORE_MODES, NormalizeSection
from exaonepath_core.data import patch_store, shard_store
from exaonepath_core.data.stain.macenko import macenko_normalize_batch
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.data.store_layout import LEDGER_COLUMNS, TileSource, shard_slide_ids, validate_slide_id

_NORMALIZE = NormalizeSection()  # the keyword defaults are the config's (normalize.batch_size, ...)


def normalize_slides(
    tile_sources: Iterable[TileSource],
    root: str | os.PathLike,
    mode: str,
    reference: MacenkoReference | None = None,
    batch_size: int = _NORMALIZE.batch_size,
    device: str | torch.device = "cpu",
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    progress: bool = True,
    patch_size: int | None = None,
    macenko_params: dict | None = None,
    store_format: str = "npy",
    encoding: str = _NORMALIZE.encoding,
    quality: int = _NORMALIZE.jpeg_quality,
    shard_max_bytes: int | None = None,
    jpeg_subsampling: str = _NORMALIZE.jpeg_subsampling,
) -> pd.DataFrame:
    """Write every slide of this shard into the store (normalized when mode == 'macenko'); returns its ledger.

    `macenko_params`: Io / alpha / beta of the per-patch stain estimate (default 240 / 1 / 0.15, the paper's);
    recorded in the store's manifest, which refuses a later run with other values unless force.
    `store_format`: "npy" (`patch_store`, uncompressed) or "shards" (`shard_store`: `encoding` jpeg | png |
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
    reference = _checked_reference(mode, batch_size, reference, macenko_params, store_format)
    sources = _sources_by_id(tile_sources)
    selected = shard_slide_ids(sources, shard)
    root = Path(root)

    def open_writer(size: int):
        if store_format == "npy":
            return patch_store.PatchStoreWriter(root, size, mode, reference, force=force,
                                                macenko_params=macenko_params)
        return shard_store.ShardStoreWriter(
            root, size, mode, reference, force=force, macenko_params=macenko_params, encoding=encoding,
            quality=quality, shard_max_bytes=shard_max_bytes or shard_store.DEFAULT_SHARD_MAX_BYTES,
            subsampling=jpeg_subsampling)

    slides = _SlideWriter(open_writer(patch_size) if patch_size is not None else None, open_writer, mode,
                          reference, batch_size, device, force, progress)
    for position, slide_id in enumerate(selected):
        slides.write(slide_id, sources[slide_id], f"[{position + 1}/{len(selected)}]")
    if slides.writer is not None and hasattr(slides.writer, "close"):
        slides.writer.close()  # the shard writer's open tar gets its end-of-archive blocks
    finalized, ledger = _finalize_if_complete(root, store_format, sources)
    ledger = ledger[ledger["slide_id"].isin(selected)].reset_index(drop=True)
    ledger["skipped"] = ledger["slide_id"].isin(slides.skipped)
    ledger.attrs.update(store_finalized=finalized, warmup_seconds=slides.warmup_seconds)
    if progress:
        _print_summary(ledger, len(slides.skipped), finalized)
    return ledger


def _checked_reference(mode: str, batch_size: int, reference: MacenkoReference | None,
                       macenko_params: dict | None, store_format: str) -> MacenkoReference | None:
    """The reference to normalize with (the standard one for macenko when none is given); ValueError for
    arguments no store takes."""
    if mode not in STORE_MODES:
        raise ValueError(f"mode must be one of {STORE_MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode == "macenko" and reference is None:
        reference = MacenkoReference.default()
    if mode == "raw" and reference is not None:
        raise ValueError("a reference makes no sense for mode='raw'")
    if macenko_params is not None and set(macenko_params) - set(DEFAULT_MACENKO_PARAMS):
        raise ValueError(f"macenko_params takes {sorted(DEFAULT_MACENKO_PARAMS)}, got {sorted(macenko_params)}")
    if store_format not in STORE_FORMATS:
        raise ValueError(f"store_format must be one of {STORE_FORMATS}, got {store_format!r}")
    return reference


def _sources_by_id(tile_sources: Iterable[TileSource]) -> dict[str, TileSource]:
    sources: dict[str, TileSource] = {}
    for source in tile_sources:
        slide_id = validate_slide_id(source[0])
        if slide_id in sources:
            raise ValueError(f"slide id {slide_id!r} appears twice in tile_sources")
        sources[slide_id] = source
    return sources


class _SlideWriter:
    """One slide after another into a store writer opened at the first slide's patch size (unless given)."""

    def __init__(self, writer, open_writer: Callable, mode: str, reference: MacenkoReference | None,
                 batch_size: int, device: str | torch.device, force: bool, progress: bool) -> None:
        self.writer, self.open_writer = writer, open_writer
        self.mode, self.reference, self.batch_size, self.device = mode, reference, batch_size, device
        self.force, self.progress = force, progress
        self.skipped: list[str] = []
        self.warmup_seconds: float | None = None

    def _done(self, slide_id: str) -> bool:
        if self.writer is not None and not self.force and self.writer.has_slide(slide_id):
            self.skipped.append(slide_id)
            return True
        return False

    def write(self, slide_id: str, source: TileSource, where: str) -> None:
        """Write one slide (or skip it as done); a failure is recorded in the ledger, not raised."""
        _, coords, make_batch_iterator = source
        if self._done(slide_id):
            return
        if self.mode == "macenko" and self.warmup_seconds is None:
            # The first call compiles the numba kernel (or starts CUDA): tens of seconds that would otherwise
            # be charged to the first slide's ledger row.
            self.warmup_seconds = warm_up_normalizer(self.reference, self.device)
            if self.progress:
                print(f"normalize_slides: kernel warm-up (JIT compile) {self.warmup_seconds:.1f} s, not charged to "
                      "any slide", file=sys.stderr)
        start = time.perf_counter()
        try:
            batches = iter(make_batch_iterator())
            first = next(batches, None)
            if self.writer is None:
                if first is None:
                    raise ValueError("no tiles and no patch_size given: cannot tell the store's patch size")
                self.writer = self.open_writer(int(np.asarray(first).shape[1]))
                if self._done(slide_id):
                    return

            def replay(first=first, batches=batches):
                if first is not None:
                    yield first
                yield from batches

            flags: list[np.ndarray] = []
            row = self.writer.write_slide(
                slide_id, np.asarray(coords),
                _normalized_batches(replay, self.mode, self.reference, self.batch_size, self.device, flags,
                                    self.writer.macenko_params),
                fallback=flags,
            )
            if self.progress:
                print(f"{where} {slide_id}: {row['n_patches']} patches, "
                      f"{row['n_fallback']} fallback, {row['seconds']:.1f} s", file=sys.stderr)
        except Exception as error:  # one bad slide must not stop the cohort
            reason = f"{type(error).__name__}: {error}"
            if self.writer is None:
                raise RuntimeError(f"slide {slide_id} failed before the store could be opened: {reason}") from error
            self.writer.record(slide_id, "failed", reason, seconds=time.perf_counter() - start)
            if self.progress:
                print(f"{where} {slide_id}: FAILED {reason}", file=sys.stderr)
                traceback.print_exc(limit=3, file=sys.stderr)


def _finalize_if_complete(root: Path, store_format: str, sources: dict) -> tuple[bool, pd.DataFrame]:
    """Finalize the store when every slide of the listing has a ledger row; (finalized, latest ledger rows).

    Every shard checks whether the whole listing is done; the last to finish writes the index and the counts
    (finalizing is idempotent, so two shards finishing together both write the same files).
    """
    if store_format == "npy":
        finalized = (root / "manifest.json").is_file() and patch_store.is_store_complete(root, sources)
        if finalized:
            patch_store.finalize_store(root)
        return finalized, patch_store.read_ledger(root)
    finalized = (root / "manifest.json").is_file() and shard_store.is_shard_store_complete(root, sources)
    if finalized:
        shard_store.finalize_shard_store(root)
    return finalized, shard_store.read_shard_ledger(root)[LEDGER_COLUMNS]


def _print_summary(ledger: pd.DataFrame, n_skipped: int, finalized: bool) -> None:
    ok = ledger["status"] == "ok"
    state = ("store finalized (index.csv, manifest counts)" if finalized
             else "store not finalized yet: other shards' slides are missing")
    print(f"normalize_slides: {int(ok.sum())} ok ({n_skipped} skipped as done), "
          f"{int((~ok).sum())} failed, {int(ledger.loc[ok, 'n_patches'].sum())} patches, "
          f"{int(ledger.loc[ok, 'n_fallback'].sum())} fallback; {state}", file=sys.stderr)


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
