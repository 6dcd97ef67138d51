"""The figure functions the notebooks call: 2-D embeddings per arm and collapse-metric bars (seaborn).

Every figure is drawn with seaborn on a `plotting.new_figure` inside `plotting.house_style()` and written by
`plotting.save_png`, so it shares the house style, never touches pyplot's global state, and is written atomically.
"""
from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from exaonepath_core.evaluation import collapse
from exaonepath_core.io import atomic, plotting

_MAX_LEGEND_ENTRIES = 12


EMBEDDING_METHOD_NAMES = {
    "tsne": "t-SNE (after PCA to at most 50 dims) of L2-normalised features",
    "pca": "PCA (first 2 components) of L2-normalised features",
}


class Embedding2D(np.ndarray):
    """(N, 2) coordinates that remember the method that made them (`method`, a key of EMBEDDING_METHOD_NAMES).

    Slices and copies keep `method`; arithmetic and reductions return plain arrays (they are no longer the
    method's output). The figure reads `method` so callers need not pass it separately.
    """

    method: str

    def __new__(cls, coordinates: np.ndarray, method: str = ""):
        array = np.asarray(coordinates).view(cls)
        array.method = method
        return array

    def __array_finalize__(self, obj) -> None:
        self.method = getattr(obj, "method", "")

    def __array_wrap__(self, array, context=None, return_scalar=False):
        array = np.asarray(array)
        return array[()] if return_scalar else array


def embedding_2d(features: np.ndarray, method: str = "tsne", max_points: int = 3000, seed: int = 0) -> Embedding2D:
    """2-D embedding (N, 2) of features; when N > max_points a seeded random subset is embedded, other rows NaN.

    t-SNE runs on the top 50 principal components (the usual denoising step) of L2-normalised features;
    "pca" projects onto the first two components. The result records `method` (see `Embedding2D`).
    """
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"features must be (N >= 3, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN/inf")
    if method not in EMBEDDING_METHOD_NAMES:
        raise ValueError(f"method must be one of {sorted(EMBEDDING_METHOD_NAMES)}, got {method!r}")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    subset = x[chosen]
    norms = np.linalg.norm(subset, axis=1, keepdims=True)
    subset = subset / np.where(norms > 0, norms, 1.0)  # cosine geometry, like the collapse metrics
    out = np.full((n, 2), np.nan)
    if method == "pca":
        out[chosen] = PCA(2, random_state=seed).fit_transform(subset)
        return Embedding2D(out, method)
    from sklearn.manifold import TSNE

    n_components = min(50, subset.shape[1], subset.shape[0] - 1)
    reduced = PCA(n_components, random_state=seed).fit_transform(subset) if subset.shape[1] > 50 else subset
    perplexity = float(min(30.0, (subset.shape[0] - 1) / 3.0))
    out[chosen] = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    return Embedding2D(out, method)


def _scatter_by(ax, xy: np.ndarray, labels: np.ndarray | None, arm: str, what: str) -> None:
    title = f"{arm}: by {what}"
    plural = "es" if what.endswith("s") else "s"
    if labels is None:
        ax.text(0.5, 0.5, f"no {what} labels", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    import seaborn as sns

    labels = np.asarray(labels)
    shown = np.all(np.isfinite(xy), axis=1)
    values = labels[shown]
    keys, codes = np.unique(values.astype(str) if values.dtype == object else values, return_inverse=True)
    names = [str(key) for key in keys]
    size = float(np.clip(8000.0 / max(int(shown.sum()), 1), 4.0, 24.0))  # visible for hundreds, not a blob for 10^4
    with_legend = len(names) <= _MAX_LEGEND_ENTRIES
    # hue as strings with a fixed order: numeric ids are categories here, not a colour scale
    sns.scatterplot(x=xy[shown, 0], y=xy[shown, 1], hue=np.asarray(names, dtype=object)[codes.ravel()],
                    hue_order=names, palette=plotting.palette(len(names)), s=size, alpha=0.75, linewidth=0,
                    rasterized=True, legend="full" if with_legend else False, ax=ax)
    # the point count is in the figure's suptitle; the panel says how many groups the colours stand for
    ax.set_title(f"{title} ({len(names)} {what}{'' if len(names) == 1 else plural})")
    ax.set_xticks([])
    ax.set_yticks([])
    if with_legend and ax.get_legend() is not None:
        # beside the panel, so it never hides points
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), markerscale=max(1.0, 36.0 / size) ** 0.5,
                        frameon=False, fontsize=7, borderaxespad=0.2, title=None)


def _embedding_suptitle(embeds: Mapping, method: str | None) -> str:
    """'<method>, <n> points per arm' (each arm's count when they differ; 'of N' when rows were not embedded)."""
    if method is None:
        recorded = {getattr(entry[0], "method", "") for entry in embeds.values()}
        recorded.discard("")
        if len(recorded) > 1:
            raise ValueError(f"arms were embedded with different methods {sorted(recorded)}; "
                             "side-by-side panels must share one")
        method = recorded.pop() if recorded else None
    label = EMBEDDING_METHOD_NAMES.get(method, method) if method else "2-D embedding (method not recorded)"
    counts = {}
    for arm, entry in embeds.items():
        xy = np.asarray(entry[0], dtype=float)
        drawn = int(np.all(np.isfinite(xy), axis=1).sum())
        counts[arm] = f"{drawn}" if drawn == len(xy) else f"{drawn} of {len(xy)}"
    if len(set(counts.values())) == 1:
        points = f"{next(iter(counts.values()))} points per arm"
    else:
        points = "points: " + ", ".join(f"{arm} {n}" for arm, n in counts.items())
    return f"{label}; {points}"


def plot_embeddings_by_arm(
    embeds: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]],
    out_png: str | Path,
    method: str | None = None,
) -> Path:
    """Embeddings side by side, one column per arm; rows coloured by slide, by class and by site (when known).

    `embeds` maps arm -> (xy (N, 2), slide_ids, class_labels or None, site_ids or None); NaN rows of xy
    (points not embedded) are not drawn and are counted in the suptitle, which also names the 2-D method:
    `method` when given, else the one `embedding_2d` recorded on xy (`Embedding2D.method`).
    """
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
    suptitle = _embedding_suptitle(embeds, method)
    rows = [("slide", 1)]
    if any(entry[2] is not None for entry in embeds.values()):
        rows.append(("class", 2))
    if any(entry[3] is not None for entry in embeds.values()):
        rows.append(("site", 3))
    with plotting.house_style():
        figure = plotting.new_figure(4.0 * len(embeds), 3.8 * len(rows) + 0.4)
        axes = figure.subplots(len(rows), len(embeds), squeeze=False)
        for col, (arm, entry) in enumerate(embeds.items()):
            xy = np.asarray(entry[0], dtype=float)
            for row, (what, index) in enumerate(rows):
                labels = entry[index]
                if what == "class" and labels is not None:
                    labels = np.asarray(labels)
                _scatter_by(axes[row, col], xy, labels, arm, what)
        # wrapped to the figure width, so a one-arm figure does not clip it
        figure.suptitle(textwrap.fill(suptitle, width=45 * len(embeds)), fontsize=11)
        figure.tight_layout()
        return plotting.save_png(figure, out_png)


# Short readable panel titles of the collapse metrics (keyed by collapse's metric names, which the CSV keeps); an
# unknown metric is shown by its name with spaces.
METRIC_DISPLAY_NAMES = {
    collapse.SLIDE_PROBE: "slide-ID probe accuracy",
    collapse.SLIDE_PROBE_OVER_CHANCE: "slide-ID probe accuracy / chance",
    collapse.SAME_SLIDE_NEIGHBOURS: "same-slide neighbours (k-NN fraction)",
    collapse.SILHOUETTE_SLIDE: "silhouette by slide",
    collapse.SILHOUETTE_CLASS: "silhouette by class",
    collapse.KNN_WITHIN_SLIDE: "k-NN class accuracy, same slide",
    collapse.KNN_LEAVE_ONE_SLIDE_OUT: "k-NN class accuracy, other slides",
    collapse.KNN_GAP: "k-NN class gap (same - other slides)",
    collapse.SITE_PROBE: "site-ID probe accuracy",
    collapse.SITE_PROBE_OVER_CHANCE: "site-ID probe accuracy / chance",
    collapse.SAME_SITE_NEIGHBOURS: "same-site neighbours (k-NN fraction)",
    collapse.SILHOUETTE_SITE: "silhouette by site",
}
_TITLE_CHARS_PER_INCH = 11  # at the 9 pt title size, measured so neighbouring titles keep apart
_TICK_WRAP_CHARS = 11


def metric_display_name(metric: str) -> str:
    """The readable panel title of a collapse metric (its identifier with spaces when not in the table)."""
    return METRIC_DISPLAY_NAMES.get(metric, metric.replace("_", " "))


def _wrap_identifier(name: str, width: int) -> str:
    """Break an identifier like `stain_augmentation` into lines of about `width` chars at '_', '-', '/', ':' or spaces."""
    parts = [p for p in re.split(r"(?<=[_\-/: ])", name) if p]
    lines, line = [], ""
    for part in parts:
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return "\n".join(lines)


def _labels_overlap(labels) -> bool:
    """Whether any two visible text labels' drawn boxes intersect (after a canvas draw)."""
    boxes = [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _collapse_panel(ax, rows: pd.DataFrame, metric: str, arms: list, colours: list, tick_labels: list[str],
                    title_width: int) -> None:
    """One metric's panel: a seaborn bar per arm ('n/a' where not measured), 95% intervals, the chance line."""
    import seaborn as sns

    values = rows["value"].reindex(arms).astype(float)
    bars = pd.DataFrame({"arm": [str(arm) for arm in arms], "value": values.to_numpy()})
    sns.barplot(data=bars, x="arm", y="value", hue="arm", order=bars["arm"], hue_order=bars["arm"],
                palette=colours, errorbar=None, legend=False, edgecolor="black", linewidth=0.5, ax=ax)
    positions = np.arange(len(arms))
    for i in np.flatnonzero(~np.isfinite(values.to_numpy())):
        ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
    low, high = (rows[c].reindex(arms).astype(float).to_numpy() for c in ("ci_low", "ci_high"))
    with_interval = np.isfinite(values.to_numpy()) & np.isfinite(low) & np.isfinite(high)
    if with_interval.any():
        value = values.to_numpy()[with_interval]
        yerr = np.vstack([value - low[with_interval], high[with_interval] - value]).clip(min=0.0)
        ax.errorbar(positions[with_interval], value, yerr=yerr, fmt="none", ecolor="black", elinewidth=1, capsize=4)
    chances = rows["chance"].astype(float)
    chances = chances[np.isfinite(chances)]
    if len(chances):
        chance = float(chances.mean())
        ax.axhline(chance, color="black", linestyle="--", linewidth=1)
        # labelled on the line itself: a legend box would sit on the bars
        ax.annotate("chance", xy=(1.0, chance), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", va="center", ha="left", fontsize=7)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_xticks(positions)
    ax.set_xticklabels(tick_labels, fontsize=8)
    ax.set_title(textwrap.fill(metric_display_name(metric), title_width), fontsize=9)


def plot_collapse_bars(metrics_df: pd.DataFrame, out_png: str | Path, metrics: Sequence[str] | None = None) -> Path:
    """A panel per metric with one bar per arm, 95% interval error bars and a dashed chance line.

    Panel titles are readable names (`METRIC_DISPLAY_NAMES`); arm names on the x axis are wrapped at '_' and
    the panels widen with the number of arms, so tick labels and titles do not overlap (rotated as a last resort).
    """
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
    tick_labels = [_wrap_identifier(str(arm), _TICK_WRAP_CHARS) for arm in arms]
    tick_lines = max(label.count("\n") + 1 for label in tick_labels)
    panel_width = max(3.4, 0.85 * len(arms) + 0.8)  # about 0.85 inch per wrapped arm name
    with plotting.house_style():
        colours = plotting.palette(len(arms))
        figure = plotting.new_figure(panel_width * n_cols, (2.8 + 0.15 * tick_lines) * n_rows)
        axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics):
            rows = metrics_df[metrics_df["metric"] == metric].set_index("arm")
            if rows.index.duplicated().any():
                raise ValueError(f"metric {metric!r} has several rows for arm(s) "
                                 f"{sorted(map(str, set(rows.index[rows.index.duplicated()])))}; one per arm expected")
            _collapse_panel(ax, rows, metric, arms, colours, tick_labels, int(_TITLE_CHARS_PER_INCH * panel_width))
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        figure.tight_layout()
        figure.canvas.draw()
        if any(_labels_overlap(ax.get_xticklabels()) for ax in axes[: len(metrics)]):
            for ax in axes[: len(metrics)]:  # a word longer than the wrap width: rotate rather than overlap
                ax.set_xticklabels(tick_labels, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
            figure.tight_layout()
        return plotting.save_png(figure, out_png)


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
    out_csv = atomic.write_csv(df, out_csv)
    if out_md is not None:
        atomic.write_text(Path(out_md), _markdown_table(df))
    return out_csv
