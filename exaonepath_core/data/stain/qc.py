"""The stain-normalisation QC figure: slides before and after Macenko, with their fitted stain vectors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from exaonepath_core.data.stain.macenko import fit_reference
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.io import plotting


def _swatch(stain_matrix: np.ndarray) -> np.ndarray:
    """The colour of one unit of each stain, exp(-v) per channel, as two 20 px blocks side by side (H, E)."""
    colours = np.clip(np.exp(-np.asarray(stain_matrix).T), 0, 1)  # (2, 3)
    return np.repeat(np.repeat(colours[None], 20, axis=0), 20, axis=1)


def _draw_slide_row(axes, raw: np.ndarray, normalized: np.ndarray, title: str) -> None:
    """One slide's row: the tile before and after, and the stain vectors fitted to each."""
    axes[0].imshow(raw)
    axes[0].set_title(f"{title}: before", fontsize=10)
    axes[1].imshow(normalized)
    axes[1].set_title(f"{title}: after", fontsize=10)
    for axis, image, label in ((axes[2], raw, "stains before"), (axes[3], normalized, "stains after")):
        try:
            axis.imshow(_swatch(fit_reference(np.asarray(image)).stain_matrix))
            axis.set_title(f"{label}\nH | E", fontsize=9)
        except ValueError:
            axis.text(0.5, 0.5, "no tissue", ha="center", va="center")


def _draw_reference_row(axes, reference: MacenkoReference) -> None:
    """The last row: the reference's stain colours and its OD vectors and maximum concentrations as text."""
    axes[0].imshow(_swatch(reference.stain_matrix))
    axes[0].set_title("reference stain vectors: H | E", fontsize=10)
    matrix_text = "\n".join(
        f"{channel}: H {h:.3f}  E {e:.3f}" for channel, (h, e) in zip("RGB", reference.stain_matrix)
    )
    axes[1].text(0.02, 0.5, f"reference OD vectors\n{matrix_text}\nmax C: "
                 f"{reference.max_concentrations[0]:.3f}, {reference.max_concentrations[1]:.3f}",
                 family="monospace", fontsize=9, va="center")
    for axis in axes[1:]:
        axis.axis("off")


def plot_stain_qc(before: list[np.ndarray], after: list[np.ndarray], titles: list[str],
                  reference: MacenkoReference | None, out_png: str | os.PathLike) -> Path:
    """Before/after grid (one row per slide) plus swatches of each image's fitted stain vectors; saves a PNG."""
    if not (len(before) == len(after) == len(titles)) or not before:
        raise ValueError(f"need equally many before/after/titles (>= 1), got {len(before)}/{len(after)}/{len(titles)}")
    reference = MacenkoReference.default() if reference is None else reference
    rows = len(before)
    with plotting.house_style():
        figure = plotting.new_figure(12, 3 * (rows + 1))
        axes = figure.subplots(rows + 1, 4, gridspec_kw={"width_ratios": [3, 3, 1.3, 1.3]}, squeeze=False)
        for row, (raw, normalized, title) in enumerate(zip(before, after, titles)):
            _draw_slide_row(axes[row], raw, normalized, title)
        for axis in axes.ravel():
            axis.set_xticks([])
            axis.set_yticks([])
            axis.grid(False)  # images, not plots: no grid lines over them, and a full frame around each
            axis.spines[:].set_visible(True)
        _draw_reference_row(axes[rows], reference)
        figure.tight_layout()
        return plotting.save_png(figure, out_png)
