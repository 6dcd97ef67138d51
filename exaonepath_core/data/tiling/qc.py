"""The QC figure of one tiled slide: its thumbnail, the tissue mask (green) and the tiles kept (blue squares).

Drawn in the house style and written by `io/plotting` (`new_figure`, `house_style`, `save_png`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from exaonepath_core.data.tiling.coords import TileSet
from exaonepath_core.io import plotting
from exaonepath_core.io.slides import open_slide, slide_id_from_path

MASK_RGBA = (0.0, 0.8, 0.2, 0.30)
TILE_EDGE = (0.1, 0.3, 1.0, 0.8)


def plot_tiling_qc(
    slide_path: str | Path,
    tile_set_or_coords: TileSet | np.ndarray,
    mask: np.ndarray | None,
    out_png: str | Path,
    thumbnail: np.ndarray | None = None,
    level0_patch_size: int | None = None,
    level0_dimensions: tuple[int, int] | None = None,
    title_extra: str = "",
    max_size: int = 1024,
    tile_size: int | None = None,
    target_mpp: float | None = None,
) -> Path:
    """Save a PNG: slide thumbnail, tissue mask overlay (green) and the tiles kept (blue squares), with a legend.

    The title gives the tile count and size: `tile_size` px at `target_mpp` um/px when known (read from a
    TileSet, or passed), and always the level-0 patch size in pixels.
    """
    if isinstance(tile_set_or_coords, TileSet):
        coords = tile_set_or_coords.coords
        level0_patch_size = tile_set_or_coords.level0_patch_size
        tile_size = tile_set_or_coords.tile_size if tile_size is None else tile_size
        target_mpp = tile_set_or_coords.target_mpp if target_mpp is None else target_mpp
    else:
        coords = np.asarray(tile_set_or_coords, dtype=np.int64).reshape(-1, 2)
        if level0_patch_size is None:
            raise ValueError("level0_patch_size is required when passing raw coordinates")
    if thumbnail is None or level0_dimensions is None:
        with open_slide(slide_path, require_mpp=False) as slide:
            level0_dimensions = slide.dimensions
            if thumbnail is None:
                thumbnail = slide.thumbnail(max_size)
    if tile_size is not None and target_mpp is not None:
        size = f"{tile_size} px at {target_mpp:g} um/px = {level0_patch_size} px at level 0"
    else:
        size = f"{level0_patch_size} px at level 0"
    title = f"{slide_id_from_path(slide_path)}: {len(coords)} tiles of {size}"
    if title_extra:
        title += f"\n{title_extra[:90]}"
    th, tw = thumbnail.shape[:2]
    with plotting.house_style():
        fig = plotting.new_figure(6.5, 6.5 * th / tw + 0.9)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(thumbnail, interpolation="bilinear")
        handles = _draw_mask(ax, mask, tw, th)
        handles.append(_draw_tiles(ax, coords, level0_patch_size, (tw / level0_dimensions[0], th / level0_dimensions[1])))
        ax.set_xlim(-0.5, tw - 0.5)
        ax.set_ylim(th - 0.5, -0.5)
        ax.set_axis_off()
        # below the thumbnail, so it never covers tissue
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                  frameon=False, fontsize=8, handlelength=1.5)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return plotting.save_png(fig, out_png)


def _draw_mask(ax, mask: np.ndarray | None, tw: int, th: int) -> list:
    """Overlay the mask (when given) on the thumbnail's pixel grid; its legend entry, or none."""
    from matplotlib.patches import Patch

    if mask is None:
        return []
    mask = np.asarray(mask, dtype=bool)
    if mask.any():
        overlay = np.zeros(mask.shape + (4,), dtype=np.float32)
        overlay[mask] = MASK_RGBA
        ax.imshow(overlay, extent=(-0.5, tw - 0.5, th - 0.5, -0.5), interpolation="nearest")
    share = 100.0 * mask.mean() if mask.size else 0.0
    return [Patch(facecolor=MASK_RGBA, edgecolor=MASK_RGBA[:3], label=f"tissue mask ({share:.0f}% of slide)")]


def _draw_tiles(ax, coords: np.ndarray, level0_patch_size: int, scale: tuple[float, float]):
    """Outline every kept tile (level-0 coordinates scaled to thumbnail pixels); their legend entry."""
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    if len(coords):
        sx, sy = scale
        x0 = coords[:, 0] * sx - 0.5
        y0 = coords[:, 1] * sy - 0.5
        w, h = level0_patch_size * sx, level0_patch_size * sy
        corners = [np.stack([x0, y0], 1), np.stack([x0 + w, y0], 1), np.stack([x0 + w, y0 + h], 1),
                   np.stack([x0, y0 + h], 1)]
        ax.add_collection(PolyCollection(np.stack(corners, axis=1), facecolors="none", edgecolors=TILE_EDGE,
                                         linewidths=0.5))
    return Patch(facecolor="none", edgecolor=TILE_EDGE, label=f"tiles kept ({len(coords)})")
