"""The tile grid of a slide at the target mpp, and the fraction of each tile that the tissue mask covers."""
from __future__ import annotations

import numpy as np

from exaonepath_core.data.tiling.params import tile_geometry


def grid_coordinates(
    level0_dimensions: tuple[int, int],
    source_mpp: float,
    target_mpp: float,
    tile_size: int,
    overlap: int = 0,
) -> np.ndarray:
    """Level-0 top-left (x, y) int64 (N, 2), row-major, of every whole tile inside the slide; (0, 2) if none."""
    patch, step = tile_geometry(source_mpp, target_mpp, tile_size, overlap)
    width, height = (int(d) for d in level0_dimensions)
    if width < patch or height < patch:
        return np.zeros((0, 2), dtype=np.int64)
    xs = np.arange(0, width - patch + 1, step, dtype=np.int64)
    ys = np.arange(0, height - patch + 1, step, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")  # y outer: consecutive tiles share the file's tile rows
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_fractions(
    mask: np.ndarray, level0_dimensions: tuple[int, int], coords: np.ndarray, level0_patch_size: int
) -> np.ndarray:
    """Fraction (N,) float32 of each tile's area covered by the mask (exact for the box-sampled mask).

    The mask's pixels are boxes of (W / mask_w) x (H / mask_h) level-0 pixels. A bilinear lookup into the
    summed-area table integrates the mask over a tile's fractional box exactly, so coarse masks give smooth,
    unbiased fractions instead of fractions rounded to whole mask pixels.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    mh, mw = mask.shape
    sat = np.zeros((mh + 1, mw + 1), dtype=np.float64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    sx = mw / level0_dimensions[0]
    sy = mh / level0_dimensions[1]

    def area_to(xf: np.ndarray, yf: np.ndarray) -> np.ndarray:
        xf = np.clip(xf, 0, mw)
        yf = np.clip(yf, 0, mh)
        x0 = np.minimum(np.floor(xf).astype(np.int64), mw - 1)
        y0 = np.minimum(np.floor(yf).astype(np.int64), mh - 1)
        tx, ty = xf - x0, yf - y0
        return (
            sat[y0, x0] * (1 - tx) * (1 - ty)
            + sat[y0, x0 + 1] * tx * (1 - ty)
            + sat[y0 + 1, x0] * (1 - tx) * ty
            + sat[y0 + 1, x0 + 1] * tx * ty
        )

    x0 = coords[:, 0] * sx
    y0 = coords[:, 1] * sy
    x1 = (coords[:, 0] + level0_patch_size) * sx
    y1 = (coords[:, 1] + level0_patch_size) * sy
    covered = area_to(x1, y1) - area_to(x0, y1) - area_to(x1, y0) + area_to(x0, y0)
    box = np.maximum((np.clip(x1, 0, mw) - np.clip(x0, 0, mw)) * (np.clip(y1, 0, mh) - np.clip(y0, 0, mh)), 1e-12)
    return np.clip(covered / box, 0.0, 1.0).astype(np.float32)
