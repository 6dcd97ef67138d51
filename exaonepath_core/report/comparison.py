"""The paper's comparison: peers' status, the six-task table (published beside measured), Figure 1, and
stage 06's collapse metrics ranked per model.

Every table keeps its columns when there is nothing to put in it (no peer loaded, no downstream dataset, no
held-out slide): a header-only CSV and a figure that says what is absent, never a made-up point.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from exaonepath_core.config import INPUT_ARMS
from exaonepath_core.evaluation import collapse
from exaonepath_core.evaluation.published import EXTRA_WSIS, PUBLISHED, SIX_TASKS
from exaonepath_core.io import plotting
from exaonepath_core.models import peers
from exaonepath_core.models.backbones import resolve_backbone_spec

STATUS_COLUMNS = ["model", "title", "backbone", "status", "detail"]
COMPARISON_COLUMNS = (["model", "title", "source", "backbone", "status"] + list(SIX_TASKS)
                      + [f"{t}_ci_{end}" for t in SIX_TASKS for end in ("low", "high")]
                      + ["avg", "n_tasks", "n_parameters", "parameters_from", "n_wsis", "wsi_source"])
COLLAPSE_RANK_COLUMNS = ["cohort", "rank", "model", "kind", "slide_id_probe_accuracy", "slide_id_probe_ci_low",
                         "slide_id_probe_ci_high", "slide_probe_chance", "same_slide_neighbour_fraction",
                         "same_slide_ci_low", "same_slide_ci_high", "knn_leave_one_slide_out", "n_patches"]


def model_of_backbone(backbone: str) -> str | None:
    """The registry/published key of a stage-04 backbone folder (`peer_phikon` -> phikon; `exaonepath_*`)."""
    if backbone.startswith("peer_"):
        return backbone.removeprefix("peer_")
    if backbone.startswith("exaonepath_"):
        return "exaonepath"
    return None


def peer_status(extra_backbones: Sequence[str], backbone_names: Sequence[str]) -> pd.DataFrame:
    """One row per registered peer and EXAONEPath: measured (its feature folder exists), absent (configured but
    no weights found, with the reason) or not configured; RudolfV: published numbers only."""
    found = {model_of_backbone(b): b for b in backbone_names if model_of_backbone(b)}
    configured: dict[str, str] = {}
    for spec in extra_backbones:
        kind = spec.partition(":")[0]
        if kind == "peer":
            configured[spec.partition(":")[2].partition("=")[0]] = spec
        elif kind == "exaonepath":
            configured["exaonepath"] = spec
    rows = []
    for key in dict.fromkeys([*peers.PEERS, *PUBLISHED]):
        title = PUBLISHED[key].title if key in PUBLISHED else peers.PEERS[key].title
        if key in found:
            rows.append([key, title, found[key], "measured", f"features of {found[key]} (stage 04)"])
        elif key == "rudolfv":
            rows.append([key, title, "", "published only", PUBLISHED[key].licence])
        elif key in configured and key != "exaonepath":
            options = resolve_backbone_spec(configured[key])
            try:
                weights = peers.resolve_weights(key, options.get("path"))
                detail = f"weights {weights} found but no stage-04 features (rerun stage 04)"
            except peers.PeerWeightsAbsent as err:
                detail = str(err)
            rows.append([key, title, "", "absent", detail])
        elif key in configured:
            rows.append([key, title, "", "absent", f"{configured[key]} configured, no stage-04 features"])
        else:
            how = (f"add 'peer:{key}=/path/to/weights' to features.extra_backbones" if key in peers.PEERS
                   else "add 'exaonepath:/path/EXAONEPath.ckpt' to features.extra_backbones")
            rows.append([key, title, "", "not configured", how])
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def _parameters(key: str) -> tuple[int | None, str]:
    if key in peers.PEERS:
        return peers.count_parameters(key), "architecture as loaded (strict key/shape match)"
    if key == "exaonepath":
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        return int(sum(p.numel() for p in model.parameters())), "architecture as loaded (strict key/shape match)"
    published = PUBLISHED.get(key)
    return (published.n_parameters, "published (no public architecture)") if published else (None, "")


def _wsis(key: str) -> tuple[int | None, str]:
    if key in PUBLISHED:
        return PUBLISHED[key].n_wsis, PUBLISHED[key].wsi_source
    return EXTRA_WSIS.get(key, (None, ""))


def model_comparison_table(probe_summary: pd.DataFrame, status: pd.DataFrame,
                           probe: str = "logistic") -> pd.DataFrame:
    """The paper's table: a `published` row per model of the paper, a `measured` row per loaded model (mean
    top-1 over seeds with its 95 % interval, `probe` probe); avg only over all six tasks (else empty)."""
    rows = []
    summary = probe_summary
    if len(summary) and {"task", "backbone", "probe", "mean"} <= set(summary.columns):
        summary = summary[(summary["probe"] == probe) & summary["mean"].notna()]
        if "metric" in summary.columns:
            summary = summary[summary["metric"] == "accuracy"]
    else:
        summary = pd.DataFrame(columns=["task", "backbone", "probe", "mean", "ci_low", "ci_high"])
    for _, peer in status.iterrows():
        key = peer["model"]
        n_params, params_from = _parameters(key)
        n_wsis, wsi_source = _wsis(key)
        common = {"model": key, "title": peer["title"], "status": peer["status"], "n_parameters": n_params,
                  "parameters_from": params_from, "n_wsis": n_wsis, "wsi_source": wsi_source}
        if key in PUBLISHED:
            published = PUBLISHED[key]
            rows.append({**common, "source": "published", "backbone": "", **published.top1,
                         "avg": published.average(), "n_tasks": len(published.top1)})
        if peer["status"] == "measured":
            mine = summary[summary["backbone"] == peer["backbone"]].set_index("task")
            row = {**common, "source": "measured", "backbone": peer["backbone"]}
            for task in SIX_TASKS:
                if task in mine.index:
                    row[task] = float(mine.at[task, "mean"])
                    row[f"{task}_ci_low"] = float(mine.at[task, "ci_low"])
                    row[f"{task}_ci_high"] = float(mine.at[task, "ci_high"])
            measured = [row[t] for t in SIX_TASKS if t in row]
            row["n_tasks"] = len(measured)
            row["avg"] = float(np.mean(measured)) if len(measured) == len(SIX_TASKS) else None
            rows.append(row)
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    numeric = list(SIX_TASKS) + [c for c in COMPARISON_COLUMNS if "_ci_" in c] + ["avg"]
    table[numeric] = table[numeric].astype(float).round(4)
    return table


def plot_model_comparison(table: pd.DataFrame, out_png: str | Path) -> Path:
    """Figure 1's two panels: six-task average top-1 vs parameters and vs WSIs (log x); published points as
    filled circles, this run's measured points as open diamonds; what could not be drawn is said on the panel."""
    import seaborn as sns

    plotted = table[table["avg"].notna()].copy()
    plotted["marker_source"] = plotted["source"].map({"published": "published (paper's table)",
                                                      "measured": "measured (this run)"})
    with plotting.house_style():
        figure = plotting.new_figure(11, 4.4)
        axes = figure.subplots(1, 2)
        for ax, column, label in ((axes[0], "n_parameters", "parameters"), (axes[1], "n_wsis", "WSIs")):
            shown = plotted[plotted[column].astype(float) > 0]
            left_out = sorted(set(plotted.loc[~plotted.index.isin(shown.index), "title"]))
            if len(shown):
                sns.scatterplot(data=shown, x=column, y="avg", hue="marker_source", style="marker_source",
                                markers={"published (paper's table)": "o", "measured (this run)": "D"},
                                hue_order=["published (paper's table)", "measured (this run)"],
                                s=70, ax=ax, legend=ax is axes[0])
                for _, row in shown.iterrows():
                    ax.annotate(row["title"], (row[column], row["avg"]), xytext=(4, 3), textcoords="offset points",
                                fontsize=7)
                ax.set_xscale("log")
            notes = []
            if (table["source"] == "measured").any() and not (shown["source"] == "measured").any():
                notes.append("measured: no loaded model has all six tasks")
            elif not (table["source"] == "measured").any():
                notes.append("measured: no peer loaded in this run")
            if left_out:
                notes.append(f"not on a log axis (0 {label}): {', '.join(left_out)}")
            incomplete = sorted(set(table.loc[table["avg"].isna() & (table["source"] == "published"), "title"]))
            if incomplete:
                notes.append(f"fewer than six published tasks: {', '.join(incomplete)}")
            if notes:  # below the axis, where it cannot cover a point
                ax.text(0.0, -0.2, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="top", color="#444")
            if ax.get_legend() is not None:
                ax.get_legend().set_title(None)
            ax.margins(x=0.15, y=0.08)
            ax.set_xlabel(f"{label} (log scale)")
            ax.set_ylabel("six-task average top-1")
            ax.set_title(f"average top-1 vs {label}")
        figure.tight_layout()
        return plotting.save_png(figure, out_png)


def _metric_row(part: pd.DataFrame, metric: str) -> pd.Series | None:
    rows = part[part["metric"] == metric]
    return rows.iloc[0] if len(rows) else None


def backbone_kind(arm: str) -> str:
    """What a stage-06 arm is: our pretraining arm, the untrained initialisation, a peer or another backbone."""
    if arm in INPUT_ARMS:
        return "pretraining arm"
    if arm.startswith("untrained_"):
        return "untrained initialisation"
    if model_of_backbone(arm):
        return "peer model"
    return "extra backbone"


def collapse_by_model(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per cohort, every backbone ranked by slide identifiability (slide-ID probe accuracy over chance, most
    slide-identifiable first), beside its same-slide neighbour fraction and leave-one-slide-out class kNN."""
    if metrics.empty or not {"cohort", "arm", "metric", "value"} <= set(metrics.columns):
        return pd.DataFrame(columns=COLLAPSE_RANK_COLUMNS)
    rows = []
    for (cohort, arm), part in metrics.groupby(["cohort", "arm"], sort=False):
        probe = _metric_row(part, collapse.SLIDE_PROBE)
        same = _metric_row(part, collapse.SAME_SLIDE_NEIGHBOURS)
        knn = _metric_row(part, collapse.KNN_LEAVE_ONE_SLIDE_OUT)

        def get(row: pd.Series | None, column: str) -> float:
            return float(row[column]) if row is not None and column in row and pd.notna(row[column]) else math.nan

        rows.append({"cohort": cohort, "model": arm, "kind": backbone_kind(arm),
                     "slide_id_probe_accuracy": get(probe, "value"), "slide_id_probe_ci_low": get(probe, "ci_low"),
                     "slide_id_probe_ci_high": get(probe, "ci_high"), "slide_probe_chance": get(probe, "chance"),
                     "same_slide_neighbour_fraction": get(same, "value"), "same_slide_ci_low": get(same, "ci_low"),
                     "same_slide_ci_high": get(same, "ci_high"), "knn_leave_one_slide_out": get(knn, "value"),
                     "n_patches": get(probe, "n")})
    table = pd.DataFrame(rows)
    table["_over"] = table["slide_id_probe_accuracy"] - table["slide_probe_chance"].fillna(0.0)
    table["_cohort"] = table["cohort"].map({c: i for i, c in enumerate(dict.fromkeys(table["cohort"]))})
    table = table.sort_values(["_cohort", "_over"], ascending=[True, False], na_position="last", kind="stable")
    table["rank"] = table.groupby("cohort").cumcount() + 1
    return table[COLLAPSE_RANK_COLUMNS].reset_index(drop=True)


_KINDS = ("pretraining arm", "untrained initialisation", "peer model", "extra backbone")
_KIND_COLOURS = (0, 7, 3, 2)  # blue, grey, red, green of the house ("colorblind") palette
_RANK_PANELS = (("slide_id_probe_accuracy", "slide_id_probe_ci_low", "slide_id_probe_ci_high", "slide-ID probe accuracy"),
                ("same_slide_neighbour_fraction", "same_slide_ci_low", "same_slide_ci_high",
                 "same-slide neighbour fraction"))


def _ranked_panel(ax, part: pd.DataFrame, columns: tuple[str, str, str, str], cohort: str, colours: dict,
                  with_legend: bool) -> None:
    """One cohort's panel: a point per model (rank order, top = rank 1) with its 95 % interval, coloured by kind."""
    import seaborn as sns

    value, low, high, title = columns
    points = part.assign(y=np.arange(len(part)))
    finite = points[np.isfinite(points[value].astype(float))]
    if len(finite):
        sns.scatterplot(data=finite, x=value, y="y", hue="kind", hue_order=[k for k in _KINDS if k in set(part["kind"])],
                        palette=colours, s=40, legend=False, ax=ax, zorder=3)
        bounded = finite[np.isfinite(finite[low].astype(float)) & np.isfinite(finite[high].astype(float))]
        for _, row in bounded.iterrows():  # one call per model: error-bar caps take a single colour
            xerr = [[max(row[value] - row[low], 0)], [max(row[high] - row[value], 0)]]
            ax.errorbar(row[value], row["y"], xerr=xerr, fmt="none", capsize=3, ecolor=colours[row["kind"]])
    for y in points.loc[~points.index.isin(finite.index), "y"]:
        ax.text(0, y, "n/a", va="center", fontsize=7)
    if value == "slide_id_probe_accuracy" and part["slide_probe_chance"].notna().any():
        ax.axvline(float(part["slide_probe_chance"].mean()), color="black", linestyle="--", lw=1)
    ax.set_yticks(points["y"])
    ax.set_yticklabels(part["model"], fontsize=8)
    ax.set_ylim(-0.5, len(part) - 0.5)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(f"{cohort}: {title}", fontsize=9)
    if with_legend:  # every kind of the cohort, even one with no finite value in this panel
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", ls="", color=colours[k], label=k) for k in _KINDS if k in set(part["kind"])]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # off the points


def plot_collapse_by_model(ranked: pd.DataFrame, out_png: str | Path) -> Path:
    """One row of panels per cohort: slide-ID probe accuracy and same-slide neighbour fraction per model (95 %
    intervals), in rank order, coloured by kind; a text panel when no cohort was measured."""
    cohorts = list(dict.fromkeys(ranked["cohort"])) if len(ranked) else []
    n_models = max([int((ranked["cohort"] == c).sum()) for c in cohorts] or [1])
    with plotting.house_style():
        house = plotting.palette(max(_KIND_COLOURS) + 1)
        colours = {kind: house[i] for kind, i in zip(_KINDS, _KIND_COLOURS)}
        figure = plotting.new_figure(10, max(2.2, 0.32 * n_models + 1.2) * max(1, len(cohorts)))
        axes = figure.subplots(max(1, len(cohorts)), 2, squeeze=False)
        if not cohorts:
            for ax in axes.ravel():
                ax.set_axis_off()
            axes[0, 0].text(0, 0.5, "no collapse cohort measured: no held-out slide features "
                                    "(see 04_features/datasets.csv)", fontsize=10)
        for row_axes, cohort in zip(axes, cohorts):
            part = ranked[ranked["cohort"] == cohort].sort_values("rank", ascending=False)
            for ax, columns in zip(row_axes, _RANK_PANELS):
                _ranked_panel(ax, part, columns, cohort, colours, with_legend=ax is row_axes[1])
        figure.tight_layout()
        return plotting.save_png(figure, out_png)


def comparison_note(status: pd.DataFrame, datasets: Mapping[str, str]) -> str:
    """A sentence for the report: which peers were measured, which are absent, which of the six tasks exist."""
    measured = list(status.loc[status["status"] == "measured", "title"])
    absent = list(status.loc[status["status"] == "absent", "title"])
    present = [t for t in SIX_TASKS if str(datasets.get(t, "")).startswith("present")]
    return (f"measured: {', '.join(measured) or 'none'}; configured but absent: {', '.join(absent) or 'none'}; "
            f"six-task datasets present: {', '.join(present) or 'none'}")
