"""The one house style and the one PNG writer for every figure of the package (seaborn on Agg canvases).

Every module that draws (QC plots of tiling and stain normalisation, training curves, probe and collapse
figures) makes its figure with `new_figure` inside `house_style()` and writes it with `save_png`, so all
figures share fonts, palette and DPI, pyplot's global state is never touched, and a killed write leaves no
half-written PNG (`atomic.atomic_path`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from exaonepath_core.io import atomic

DPI = 120


def style_rc() -> dict:
    """The house rc settings: seaborn's "whitegrid" theme at "notebook" scale with readable sizes."""
    import seaborn as sns

    rc = dict(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("notebook", font_scale=0.85))
    rc.update({
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "grid.alpha": 0.3,
        "image.cmap": "viridis",
        "legend.fontsize": 8,
    })
    return rc


@contextlib.contextmanager
def house_style() -> Iterator[None]:
    """Draw inside this context: matplotlib rc and seaborn's palette as the house style, restored afterwards."""
    import matplotlib
    import seaborn as sns

    with matplotlib.rc_context(style_rc()), sns.color_palette("colorblind"):
        yield


def palette(n: int) -> list[tuple[float, float, float]]:
    """n distinguishable colours: the house palette ("colorblind") when it has enough, else evenly spaced hues."""
    import seaborn as sns

    house = sns.color_palette("colorblind")
    return list(house[:n]) if n <= len(house) else list(sns.color_palette("husl", n))


def set_style() -> None:
    """Apply the house style globally (for notebooks and interactive use; figure functions do not need it)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind", rc=style_rc())


def new_figure(width: float, height: float):
    """A `matplotlib.figure.Figure` on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, out_png: str | Path, dpi: int = DPI) -> Path:
    """Write `figure` as a PNG atomically (temp file in the same folder, then rename); returns the path."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return out
