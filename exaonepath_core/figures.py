"""Plot style and the figure functions the notebooks call (Agg canvases; nothing global at import).

Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas inside `matplotlib.rc_context`,
so they do not depend on (or change) pyplot's global state or the interactive backend.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from exaonepath_core import atomic

DPI = 120
_MAX_LEGEND_ENTRIES = 12


def style_rc() -> dict:
    """The house matplotlib rc settings: readable font sizes, light grid, no top/right spines."""
    return {
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
        "savefig.bbox": "tight",
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "legend.fontsize": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "image.cmap": "viridis",
    }


def set_style() -> None:
    """Apply the house style to matplotlib's global rc (for notebooks; figure functions do not need it)."""
    import matplotlib

    matplotlib.rcParams.update(style_rc())


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, out_png: str | Path) -> Path:
    """Write the figure atomically (temporary file in the same folder, then rename; `atomic.atomic_path`)."""
    out = Path(out_png)
    with atomic.atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return out


def embedding_2d(features: np.ndarray, method: str = "tsne", max_points: int = 3000, seed: int = 0) -> np.ndarray:
    """2-D embedding (N, 2) of features; when N > max_points a seeded random subset is embedded, other rows NaN.

    t-SNE runs on the top 50 principal components (the usual denoising step) of L2-normalised features;
    "pca" projects onto the first two components.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"features must be (N >= 3, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN/inf")
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    subset = x[chosen]
    norms = np.linalg.norm(subset, axis=1, keepdims=True)
    subset = subset / np.where(norms > 0, norms, 1.0)  # cosine geometry, like the collapse metrics
    out = np.full((n, 2), np.nan)
    if method == "pca":
        out[chosen] = PCA(2, random_state=seed).fit_transform(subset)
        return out
    from sklearn.manifold import TSNE

    n_components = min(50, subset.shape[1], subset.shape[0] - 1)
    reduced = PCA(n_components, random_state=seed).fit_transform(subset) if subset.shape[1] > 50 else subset
    perplexity = float(min(30.0, (subset.shape[0] - 1) / 3.0))
    out[chosen] = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    return out


def _colours(n: int) -> np.ndarray:
    """n distinguishable RGBA colours: tab10/tab20 when they suffice, else evenly spaced hues."""
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))


def _scatter_by(ax, xy: np.ndarray, labels: np.ndarray | None, title: str) -> None:
    if labels is None:
        ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    labels = np.asarray(labels)
    shown = np.all(np.isfinite(xy), axis=1)
    values = labels[shown]
    uniques = np.unique(values.astype(str) if values.dtype == object else values)
    colours = _colours(len(uniques))
    size = float(np.clip(8000.0 / max(int(shown.sum()), 1), 4.0, 24.0))  # visible for hundreds, not a blob for 10^4
    for i, value in enumerate(uniques):
        mask = values == value
        ax.scatter(xy[shown][mask, 0], xy[shown][mask, 1], s=size, color=colours[i], label=str(value),
                   alpha=0.75, linewidths=0, rasterized=True)
    suffix = f" ({shown.sum()} of {len(xy)} points)" if shown.sum() < len(xy) else f" ({len(xy)} points)"
    ax.set_title(f"{title}: {len(uniques)}{suffix}")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(uniques) <= _MAX_LEGEND_ENTRIES:
        # beside the panel, so it never hides points
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=max(1.0, 36.0 / size) ** 0.5,
                  frameon=False, fontsize=7, borderaxespad=0.2)


def plot_embeddings_by_arm(
    embeds: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]],
    out_png: str | Path,
) -> Path:
    """Embeddings side by side, one column per arm; rows coloured by slide, by class and by site (when known).

    `embeds` maps arm -> (xy (N, 2), slide_ids, class_labels or None, site_ids or None); NaN rows of xy
    (points not embedded) are not drawn and are counted in the panel titles.
    """
    import matplotlib

    if not embeds:
        raise ValueError("embeds is empty")
    for arm, entry in embeds.items():
        if len(entry) != 4:
            raise ValueError(f"arm {arm!r}: expected (xy, slide_ids, class_labels, site_ids), got {len(entry)} items")
        xy = np.asarray(entry[0])
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"arm {arm!r}: xy must be (N, 2), got {xy.shape}")
        for name, labels in zip(("slide_ids", "class_labels", "site_ids"), entry[1:]):
            if labels is not None and len(labels) != len(xy):
                raise ValueError(f"arm {arm!r}: {name} has {len(labels)} entries for {len(xy)} points")
    rows = [("slide", 1)]
    if any(entry[2] is not None for entry in embeds.values()):
        rows.append(("class", 2))
    if any(entry[3] is not None for entry in embeds.values()):
        rows.append(("site", 3))
    with matplotlib.rc_context(style_rc()):
        figure = _new_figure(4.0 * len(embeds), 3.8 * len(rows))
        axes = figure.subplots(len(rows), len(embeds), squeeze=False)
        for col, (arm, entry) in enumerate(embeds.items()):
            xy = np.asarray(entry[0], dtype=float)
            for row, (what, index) in enumerate(rows):
                labels = entry[index]
                if what == "class" and labels is not None:
                    labels = np.asarray(labels)
                _scatter_by(axes[row, col], xy, labels, f"{arm}: by {what}")
        figure.tight_layout()
        return _save_png(figure, out_png)


def plot_collapse_bars(metrics_df: pd.DataFrame, out_png: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """A panel per metric with one bar per arm, 95% interval error bars and a dashed chance line."""
    import matplotlib

    required = {"arm", "metric", "value", "ci_low", "ci_high", "chance"}
    missing = required - set(metrics_df.columns)
    if missing:
        raise ValueError(f"metrics_df lacks columns {sorted(missing)}")
    if metrics is None:
        metrics = list(dict.fromkeys(metrics_df["metric"]))
    arms = list(dict.fromkeys(metrics_df["arm"]))
    if not metrics or not arms:
        raise ValueError("metrics_df has no metrics or no arms")
    n_cols = min(4, len(metrics))
    n_rows = math.ceil(len(metrics) / n_cols)
    colours = _colours(len(arms))
    with matplotlib.rc_context(style_rc()):
        figure = _new_figure(3.4 * n_cols, 3.0 * n_rows)
        axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            rows = metrics_df[metrics_df["metric"] == metric].set_index("arm")
            positions = np.arange(len(arms))
            for i, arm in enumerate(arms):
                if arm not in rows.index or not np.isfinite(rows.at[arm, "value"]):
                    ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
                    continue
                value, low, high = (float(rows.at[arm, c]) for c in ("value", "ci_low", "ci_high"))
                yerr = None
                if np.isfinite(low) and np.isfinite(high):
                    yerr = [[max(value - low, 0.0)], [max(high - value, 0.0)]]
                ax.bar(i, value, color=colours[i], yerr=yerr, capsize=4, edgecolor="black", linewidth=0.5)
            chances = rows["chance"].astype(float)
            chances = chances[np.isfinite(chances)]
            if len(chances):
                chance = float(chances.mean())
                ax.axhline(chance, color="black", linestyle="--", linewidth=1)
                # labelled on the line itself: a legend box would sit on the bars
                ax.annotate("chance", xy=(1.0, chance), xycoords=("axes fraction", "data"), xytext=(2, 0),
                            textcoords="offset points", va="center", ha="left", fontsize=7)
            ax.set_xticks(positions)
            ax.set_xticklabels(arms, rotation=20, ha="right")
            ax.set_title(metric.replace("_", " "), fontsize=9)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        figure.tight_layout()
        return _save_png(figure, out_png)


def _markdown_table(df: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def save_table(df: pd.DataFrame, out_csv: str | Path, out_md: str | Path | None = None) -> Path:
    """Write df as CSV (and optionally as a Markdown table), each atomically; returns the CSV path."""
    out_csv = Path(out_csv)
    atomic.write_text(out_csv, df.to_csv(index=False))
    if out_md is not None:
        atomic.write_text(Path(out_md), _markdown_table(df))
    return out_csv
