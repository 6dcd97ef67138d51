"""Tile one slide: tissue mask on a thumbnail, grid at the target mpp, tissue filter, coords file, QC figure."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exaonepath_core.data.tiling.coords import coords_path, write_coords
from exaonepath_core.data.tiling.grid import grid_coordinates, tissue_fractions
from exaonepath_core.data.tiling.params import TilingParams, tile_geometry
from exaonepath_core.data.tiling.qc import plot_tiling_qc
from exaonepath_core.data.tiling.tissue import tissue_mask
from exaonepath_core.io.slides import Slide, open_slide


@dataclass
class _SlideTiles:
    """What tiling one open slide found: read geometry, mask and the tiles kept."""

    patch: int  # level-0 patch size
    step: int  # level-0 step
    read_level: int
    read_scale: float
    read_size: int
    thumbnail: np.ndarray
    mask: np.ndarray
    mask_mpp: float
    n_grid: int
    coords: np.ndarray
    fractions: np.ndarray
    max_fraction: float  # over all grid tiles, kept or not


def tile_slide(
    slide_path: str | Path | Slide,
    out_dir: str | Path,
    params: TilingParams | None = None,
    mpp_override: float | None = None,
) -> dict[str, Any]:
    """Tile one slide: mask, grid, tissue filter; write coords/<slide_id>.h5 (+ qc/<slide_id>.png).

    Returns the ledger record {slide_id, slide_path, status='ok', reason, n_tiles, seconds, coords_path, ...}.
    A slide with no tissue, or smaller than one tile, is ok with 0 tiles and says why in `reason`. Raises
    SlideError (SlideOpenError, MissingMppError) for slides that cannot be tiled; `tile_cohort` records those.
    `slide_path` may be an already open `Slide` (give its mpp override when opening it), so a caller that
    reads the tiles next (`read_tiles(..., slide=slide)`) opens and validates the file once.
    """
    params = params or TilingParams()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if isinstance(slide_path, Slide):
        if mpp_override is not None:
            raise ValueError("mpp_override applies when opening a slide: pass it to Slide()/open_slide() instead")
        return _tile_open_slide(slide_path, out_dir, params, start)
    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        record = _tile_open_slide(slide, out_dir, params, start)
    record["slide_path"] = str(slide_path)  # as the caller named it (the ledger matches on this string)
    return record


def _mask_thumbnail_size(slide: Slide, params: TilingParams) -> int:
    longest_um = max(slide.dimensions) * slide.mpp
    return int(min(params.mask_max_size, max(16, math.ceil(longest_um / params.mask_mpp))))


def _find_tiles(slide: Slide, params: TilingParams) -> _SlideTiles:
    """Mask, grid and tissue filter of an open slide (nothing written)."""
    source_mpp = slide.mpp
    patch, step = tile_geometry(source_mpp, params.target_mpp, params.tile_size, params.overlap)
    read_level, read_scale = slide.best_level_for_mpp(params.target_mpp)
    read_size = max(1, round(patch / slide.level_downsamples[read_level]))
    thumb = slide.thumbnail(_mask_thumbnail_size(slide, params))
    mask_mpp = max(slide.dimensions) * source_mpp / max(thumb.shape[:2])
    px_area_um2 = mask_mpp * mask_mpp
    mask = tissue_mask(
        thumb,
        median_size=params.median_size,
        close_radius=params.close_radius,
        min_object_px=round(params.min_object_um2 / px_area_um2),
        max_hole_px=round(params.max_hole_um2 / px_area_um2),
        reject_pens=params.reject_pens,
    )
    grid = grid_coordinates(slide.dimensions, source_mpp, params.target_mpp, params.tile_size, params.overlap)
    fractions = tissue_fractions(mask, slide.dimensions, grid, patch)
    keep = fractions >= params.min_tissue_fraction
    if params.min_tissue_fraction == 0.0:
        keep &= fractions > 0.0  # a zero threshold still means "touches tissue"
    return _SlideTiles(patch=patch, step=step, read_level=read_level, read_scale=read_scale, read_size=read_size,
                       thumbnail=thumb, mask=mask, mask_mpp=mask_mpp, n_grid=len(grid), coords=grid[keep],
                       fractions=fractions[keep], max_fraction=float(fractions.max(initial=0.0)))


def _reason(slide: Slide, params: TilingParams, found: _SlideTiles) -> str:
    """Why a slide has 0 tiles, and what about its pixel size a reader should know ('' when nothing)."""
    reasons = []
    if found.n_grid == 0:
        reasons.append(
            f"slide smaller than one tile ({slide.dimensions[0]}x{slide.dimensions[1]} px < {found.patch} px "
            f"level-0 patch for {params.tile_size} px at {params.target_mpp} um/px)"
        )
    elif not found.mask.any():
        reasons.append("no tissue detected (blank or background-only slide)")
    elif len(found.coords) == 0:
        reasons.append(
            f"no tile reaches min_tissue_fraction={params.min_tissue_fraction} "
            f"(max {found.max_fraction:.2f} over {found.n_grid} grid tiles)"
        )
    if slide.mpp_warning:
        reasons.append(slide.mpp_warning)
    if found.read_scale < 1.0 - 0.01:
        reasons.append(f"target {params.target_mpp} um/px is sharper than the scan ({slide.mpp:.4g}): upsampled")
    return "; ".join(reasons)


def _coords_attrs(slide: Slide, params: TilingParams, found: _SlideTiles, reason: str) -> dict[str, Any]:
    """The attributes of a coords file: how its tiles were found and how to read them back."""
    mask = found.mask
    return {
        "slide_path": str(slide.path.resolve()),
        "slide_id": slide.slide_id,
        "level0_patch_size": found.patch,
        "level0_step": found.step,
        "source_mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "objective_power": float(slide.objective_power or 0.0),
        "target_mpp": float(params.target_mpp),
        "tile_size": int(params.tile_size),
        "overlap": int(params.overlap),
        "read_level": int(found.read_level),
        "read_scale": float(found.read_scale),
        "read_size": int(found.read_size),
        "level0_width": int(slide.dimensions[0]),
        "level0_height": int(slide.dimensions[1]),
        "min_tissue_fraction": float(params.min_tissue_fraction),
        "mask_mpp": float(found.mask_mpp),
        "mask_tissue_fraction": float(mask.mean()) if mask.size else 0.0,
        "n_grid_tiles": found.n_grid,
        "reason": reason,
        "params_json": json.dumps(params.to_dict(), sort_keys=True),
    }


def _tile_open_slide(slide: Slide, out_dir: Path, params: TilingParams, start: float) -> dict[str, Any]:
    """`tile_slide` on an open slide handle."""
    found = _find_tiles(slide, params)
    reason = _reason(slide, params, found)
    attrs = _coords_attrs(slide, params, found, reason)
    if params.verify_tiles:
        scratch = np.empty((found.read_size, found.read_size, 3), dtype=np.uint8)
        for x, y in found.coords:
            slide.read_rgb_into(int(x), int(y), found.read_level, scratch)  # raises SlideReadError
    path = coords_path(out_dir, slide.slide_id)
    write_coords(path, found.coords, found.fractions, attrs)
    qc_path = None
    if params.qc_figure:
        qc_path = out_dir / "qc" / f"{slide.slide_id}.png"
        plot_tiling_qc(slide.path, found.coords, found.mask, qc_path, thumbnail=found.thumbnail,
                       level0_patch_size=found.patch, level0_dimensions=slide.dimensions, title_extra=reason,
                       tile_size=params.tile_size, target_mpp=params.target_mpp)
    return {
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path),
        "status": "ok",
        "reason": reason,
        "n_tiles": len(found.coords),
        "seconds": round(time.perf_counter() - start, 3),
        "coords_path": str(path),
        "qc_path": str(qc_path) if qc_path else "",
    }
