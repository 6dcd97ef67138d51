"""The cohort's figure: example tiles of every tissue class (rows) from every site (columns)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from exaonepath_core.data.synthetic.answer_key import load_class_map, tile_class_labels
from exaonepath_core.data.synthetic.spec import CLASS_NAMES
from exaonepath_core.io import plotting


def _example_tile(row: pd.Series, class_index: int, tile_px: int, target_mpp: float) -> np.ndarray | None:
    """A tile of one class from one slide (the purest, nearest the class's centre of mass), or None."""
    import openslide

    level0 = round(tile_px * target_mpp / float(row["mpp"]))
    class_map, ds = load_class_map(row["sidecar_path"])
    ys, xs = np.nonzero(class_map == class_index)
    if len(ys) == 0:
        return None
    step = max(ds, level0 // 4)
    grid = np.stack(np.meshgrid(np.arange(0, int(row["width"]) - level0 + 1, step),
                                np.arange(0, int(row["height"]) - level0 + 1, step)), -1).reshape(-1, 2)
    labels = tile_class_labels(row["sidecar_path"], grid, level0, min_purity=1.0)
    candidates = grid[labels == class_index]
    if len(candidates) == 0:
        return None
    centre = np.array([xs.mean(), ys.mean()]) * ds
    x, y = candidates[np.argmin(((candidates + level0 / 2 - centre) ** 2).sum(1))]
    with openslide.OpenSlide(str(row["path"])) as slide:
        region = slide.read_region((int(x), int(y)), 0, (level0, level0)).convert("RGB")
    return np.asarray(region.resize((tile_px, tile_px)))


def _first_example(slides: pd.DataFrame, class_index: int, tile_px: int, target_mpp: float
                   ) -> np.ndarray | None:
    """The example tile of the first slide of a site that shows this class, or None."""
    for _, slide in slides.iterrows():
        tile = _example_tile(slide, class_index, tile_px, target_mpp)
        if tile is not None:
            return tile
    return None


def plot_cohort_examples(manifest: pd.DataFrame, out_png: str | os.PathLike, tile_px: int = 96,
                         target_mpp: float = 1.0) -> Path:
    """Save a grid of example tiles: one row per tissue class, one column per site (first slide of each)."""
    sites = sorted(manifest["site"].unique())
    with plotting.house_style():
        fig = plotting.new_figure(1.6 * len(sites) + 1.2, 1.6 * len(CLASS_NAMES) + 0.6)
        axes = fig.subplots(len(CLASS_NAMES), len(sites), squeeze=False)
        for col, site in enumerate(sites):
            slides = manifest[manifest["site"] == site].sort_values("slide_id")
            for row_index, name in enumerate(CLASS_NAMES):
                ax = axes[row_index, col]
                ax.grid(False)
                for spine in ax.spines.values():  # an image grid: no axis lines around the tiles
                    spine.set_visible(False)
                tile = _first_example(slides, row_index, tile_px, target_mpp)
                if tile is not None:
                    ax.imshow(tile)
                else:
                    ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                if row_index == 0:
                    ax.set_title(str(site), fontsize=10)
                if col == 0:
                    ax.set_ylabel(name, fontsize=10)
        fig.suptitle(f"Synthetic cohort: tissue class (rows) x site stain (columns), {tile_px} px at "
                     f"{target_mpp} um/px", fontsize=10)
        fig.tight_layout()
        return plotting.save_png(fig, out_png)
