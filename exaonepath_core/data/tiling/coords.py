"""The coords/<slide_id>.h5 file of one slide: its writer, and `TileSet`, the tiles it describes.

Datasets `coords` (N, 2) int64 level-0 top-left (x, y) and `tissue_fraction` (N,) float32; attributes say how
to read the tiles back (level0_patch_size, read_level, read_size, tile_size, target_mpp, source_mpp, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from exaonepath_core.io import atomic


def coords_path(out_dir: str | Path, slide_id: str) -> Path:
    """Where a tiling folder keeps the coordinates of `slide_id`."""
    return Path(out_dir) / "coords" / f"{slide_id}.h5"


def write_coords(path: Path, coords: np.ndarray, fractions: np.ndarray, attrs: dict[str, Any]) -> None:
    """Write a coords file atomically (None attributes stored as '')."""
    with atomic.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        f.create_dataset("tissue_fraction", data=np.asarray(fractions, dtype=np.float32).reshape(-1))
        for key, value in attrs.items():
            f.attrs[key] = "" if value is None else value


@dataclass
class TileSet:
    """The tiles of one slide as stored in coords/<slide_id>.h5."""

    slide_id: str
    slide_path: str
    coords: np.ndarray  # (N, 2) int64 level-0 top-left (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    tile_size: int
    level0_patch_size: int
    read_level: int
    read_size: int
    target_mpp: float
    source_mpp: float
    overlap: int = 0
    reason: str = ""
    coords_path: str = ""

    def __len__(self) -> int:
        return len(self.coords)


def load_tile_set(coords_h5: str | Path, slide_path: str | Path | None = None) -> TileSet:
    """Read a coords file; `slide_path` overrides the stored path (slides moved to another machine)."""
    coords_h5 = Path(coords_h5)
    with h5py.File(coords_h5, "r") as f:
        a = dict(f.attrs)
        coords = np.asarray(f["coords"][...], dtype=np.int64).reshape(-1, 2)
        fractions = np.asarray(f["tissue_fraction"][...], dtype=np.float32)

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return TileSet(
        slide_id=text(a["slide_id"]),
        slide_path=str(slide_path) if slide_path is not None else text(a["slide_path"]),
        coords=coords,
        tissue_fraction=fractions,
        tile_size=int(a["tile_size"]),
        level0_patch_size=int(a["level0_patch_size"]),
        read_level=int(a["read_level"]),
        read_size=int(a["read_size"]),
        target_mpp=float(a["target_mpp"]),
        source_mpp=float(a["source_mpp"]),
        overlap=int(a.get("overlap", 0)),
        reason=text(a.get("reason", "")),
        coords_path=str(coords_h5),
    )
