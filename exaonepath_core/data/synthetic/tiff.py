"""A rendered slide as a tiled pyramidal TIFF (every level a top-level page: OpenSlide's generic-tiff).

Level 0 is rendered strip by strip; reduced levels are box-averaged from the previous one through
memory-mapped scratch arrays, so memory holds one strip, not a level.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from exaonepath_core.data.synthetic.render import SlideContext, render_rows


def _tiles_of_strip(strip: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Full tiles of one strip, left to right; edges padded by replication (no black seams in JPEG blocks)."""
    _h, w = strip.shape[:2]
    for x0 in range(0, w, tile_px):
        tile = strip[:, x0:x0 + tile_px]
        if tile.shape[0] != tile_px or tile.shape[1] != tile_px:
            pad = ((0, tile_px - tile.shape[0]), (0, tile_px - tile.shape[1]), (0, 0))
            tile = np.pad(tile, pad, mode="edge")
        yield np.ascontiguousarray(tile)


def _downsample_into(strip: np.ndarray, y0: int, factor: int, target: np.ndarray) -> None:
    """Box-average a strip of the finer level into rows y0/factor... of the coarser level array."""
    t0 = y0 // factor
    rows = min(strip.shape[0] // factor, target.shape[0] - t0)
    cols = target.shape[1]
    if rows <= 0:
        return
    block = strip[: rows * factor, : cols * factor].reshape(rows, factor, cols, factor, 3)
    mean = block.sum(axis=(1, 3), dtype=np.float32) / np.float32(factor * factor)
    target[t0:t0 + rows] = np.clip(mean + 0.5, 0, 255).astype(np.uint8)


def write_pyramid(ctx: SlideContext, path: Path, description: str) -> list[tuple[int, int]]:
    """Write the slide as a tiled pyramidal TIFF (every level a top-level page) to `path`; its level sizes."""
    import tifffile

    spec = ctx.spec
    sizes = [(spec.slide_size_px // spec.level_downsample ** k,) * 2 for k in range(spec.n_levels)]
    compression: dict[str, Any] = (
        {"compression": "jpeg", "compressionargs": {"level": spec.jpeg_quality}} if spec.compression == "jpeg"
        else {"compression": "deflate", "compressionargs": {"level": 6}})
    bigtiff = spec.slide_size_px ** 2 * 3 * 1.4 > 2 ** 31
    with tempfile.TemporaryDirectory(prefix=".pyramid-", dir=path.parent) as scratch, \
            tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        # Reduced levels go through memory-mapped scratch arrays so RAM holds one strip, not a level.
        levels: list[np.ndarray | None] = [None] + [
            np.lib.format.open_memmap(Path(scratch) / f"level{k}.npy", mode="w+", dtype=np.uint8,
                                      shape=(sizes[k][1], sizes[k][0], 3)) for k in range(1, spec.n_levels)]

        def level_tiles(k: int) -> Iterator[np.ndarray]:
            height = sizes[k][1]
            for y0 in range(0, height, spec.tile_px):
                y1 = min(height, y0 + spec.tile_px)
                strip = render_rows(ctx, y0, y1) if k == 0 else np.asarray(levels[k][y0:y1])
                if k + 1 < spec.n_levels:
                    _downsample_into(strip, y0, spec.level_downsample, levels[k + 1])
                yield from _tiles_of_strip(strip, spec.tile_px)

        for k, (w, h) in enumerate(sizes):
            mpp = spec.mpp * spec.level_downsample ** k
            tif.write(level_tiles(k), shape=(h, w, 3), dtype=np.uint8, tile=(spec.tile_px, spec.tile_px),
                      photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                      subfiletype=0 if k == 0 else 1, description=description if k == 0 else None,
                      metadata=None, software="exaonepath_core.data.synthetic", **compression)
        levels.clear()  # drop the memmaps before their scratch folder goes
    return sizes
