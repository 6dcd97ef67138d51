"""The answer key of a synthetic slide: its sidecar, its class map, and the tissue class under each tile."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from exaonepath_core.data.synthetic.spec import BACKGROUND, CLASS_NAMES


def load_sidecar(sidecar_path: str | os.PathLike) -> dict[str, Any]:
    """Read a slide's sidecar JSON."""
    return json.loads(Path(sidecar_path).read_text())


def load_class_map(sidecar_path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The slide's class map (int8, -1 background) and its downsample relative to level 0."""
    sidecar = load_sidecar(sidecar_path)
    class_map = np.load(Path(sidecar_path).parent / sidecar["class_map_path"])
    return class_map, int(sidecar["class_map_downsample"])


def tile_class_labels(sidecar_path: str | os.PathLike, coords: np.ndarray, level0_patch_size: int,
                      min_purity: float = 0.6) -> np.ndarray:
    """Majority class (int, (N,)) under each level-0 tile at `coords` (x, y top-left); -1: background/mixed.

    Counts the class-map cells whose centres fall inside the tile (the cell under the tile centre when none
    does); cells outside the slide count as background. A tile is labelled when its majority class covers at
    least `min_purity` of those cells.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be an (N, 2) array of level-0 (x, y), got shape {coords.shape}")
    if level0_patch_size <= 0:
        raise ValueError(f"level0_patch_size must be > 0, got {level0_patch_size}")
    if not 0 < min_purity <= 1:
        raise ValueError(f"min_purity must be in (0, 1], got {min_purity}")
    if len(coords) == 0:
        return np.zeros(0, dtype=np.int64)
    class_map, ds = load_class_map(sidecar_path)
    mh, mw = class_map.shape
    n_classes = len(CLASS_NAMES)
    # Summed-area table per class makes every tile O(1) whatever its size.
    onehot = (class_map[None] == np.arange(n_classes, dtype=np.int8)[:, None, None]).astype(np.int32)
    sat = np.zeros((n_classes, mh + 1, mw + 1), dtype=np.int64)
    sat[:, 1:, 1:] = onehot.cumsum(1).cumsum(2)
    x, y = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    size = float(level0_patch_size)
    c0, c1 = np.ceil(x / ds - 0.5).astype(np.int64), np.ceil((x + size) / ds - 0.5).astype(np.int64)
    r0, r1 = np.ceil(y / ds - 0.5).astype(np.int64), np.ceil((y + size) / ds - 0.5).astype(np.int64)
    small = (c1 <= c0) | (r1 <= r0)  # tile smaller than a cell: use the cell under its centre
    c0[small] = np.floor((x[small] + size / 2) / ds).astype(np.int64)
    r0[small] = np.floor((y[small] + size / 2) / ds).astype(np.int64)
    c1[small], r1[small] = c0[small] + 1, r0[small] + 1
    total = (c1 - c0) * (r1 - r0)
    cc0, cc1 = np.clip(c0, 0, mw), np.clip(c1, 0, mw)
    rr0, rr1 = np.clip(r0, 0, mh), np.clip(r1, 0, mh)
    counts = sat[:, rr1, cc1] - sat[:, rr0, cc1] - sat[:, rr1, cc0] + sat[:, rr0, cc0]  # (classes, N)
    best = counts.argmax(axis=0)
    purity = counts[best, np.arange(len(coords))] / total
    return np.where(purity >= min_purity, best, BACKGROUND).astype(np.int64)
