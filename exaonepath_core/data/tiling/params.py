"""How slides are cut into tiles: TilingParams, the level-0 tile geometry and the parameter-named folder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TilingParams:
    """How slides are cut into tiles (paper profile: 20x = 0.5 um/px, 224 px, no overlap)."""

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0  # pixels at the target mpp shared by neighbouring tiles
    min_tissue_fraction: float = 0.5
    mask_mpp: float = 8.0  # resolution of the tissue mask (CLAM segments at about 64x downsample of 40x)
    mask_max_size: int = 4096  # cap on the mask's longer side, whatever the slide size
    median_size: int = 5  # mask pixels (40 um at 8 um/px)
    close_radius: int = 2
    min_object_um2: float = 20_000.0  # tissue islands smaller than this are dust or debris
    max_hole_um2: float = 20_000.0  # holes smaller than this inside tissue are filled
    reject_pens: bool = True
    qc_figure: bool = True
    verify_tiles: bool = False  # decode every kept tile once, so corrupt tile data fails here, not in stage 02

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"target_mpp must be > 0, got {self.target_mpp}")
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size={self.tile_size}), got {self.overlap}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")
        if not self.mask_mpp > 0 or self.mask_max_size < 16:
            raise ValueError("mask_mpp must be > 0 and mask_max_size >= 16")

    def folder_name(self) -> str:
        """Output folder named after the grid, e.g. '0.50mpp_224px_0px_overlap' (CLAM habit)."""
        return f"{self.target_mpp:.2f}mpp_{self.tile_size}px_{self.overlap}px_overlap"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TilingParams:
        """Build from a mapping, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TilingParams keys: {unknown}")
        return cls(**values)


def tile_geometry(source_mpp: float, target_mpp: float, tile_size: int, overlap: int = 0) -> tuple[int, int]:
    """(level-0 patch size, level-0 step) in pixels for tiles of tile_size px at target_mpp."""
    factor = target_mpp / source_mpp
    patch = max(1, round(tile_size * factor))
    step = max(1, round((tile_size - overlap) * factor))
    return patch, step



def tiling_dir(root: str | Path, params: TilingParams) -> Path:
    """The parameter-named tiling folder under a stage folder, e.g. .../01_tiles/0.50mpp_224px_0px_overlap."""
    return Path(root) / params.folder_name()
