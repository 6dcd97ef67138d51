"""Stage 06, WSI-specific feature collapse, measured on the held-out slides of each cohort present (synthetic:
tissue labels known; real: slide and site only), the paper's claim judged per cohort, every backbone ranked.
Outputs: `results/<run>/06_collapse/`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from exaonepath_core.config import ProjectConfig
from exaonepath_core.data import cohort
from exaonepath_core.evaluation import collapse, features
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.report import comparison, figures, stage_tables
from exaonepath_core.stages import s01_tile, s04_features
from exaonepath_core.stages.base import StageSpec
from exaonepath_core.stages.datasets import REAL_HELDOUT_TASK, SYNTHETIC_TASK, UNLABELLED_TASKS
from exaonepath_core.stages.verdict import collapse_verdict

SPEC = StageSpec("06", "06_feature_collapse", "06_collapse", ("collapse",))

# Collapse cohorts: feature task -> `cohort` value in the stage-06 tables (synthetic first: its figures keep
# the historical file names collapse_metrics.png / embeddings_by_arm.png).
COLLAPSE_COHORTS = {SYNTHETIC_TASK: "synthetic", REAL_HELDOUT_TASK: "real"}


@dataclass
class CollapseResult:
    """What stage 06 wrote, for its notebook to show."""

    metrics: pd.DataFrame
    verdict: pd.DataFrame
    figures: list[Path]


def slide_of(ids: np.ndarray) -> np.ndarray:
    """The slide id of each feature sample id ('slide|x|y')."""
    return np.array([s.split("|", 1)[0] for s in ids])


def _slides_table(features_dir: Path) -> pd.DataFrame | None:
    """Stage 01's slide table of the run whose stage-04 folder is `features_dir` (None when absent)."""
    p = Path(features_dir).parent / s01_tile.SPEC.folder / "slides.csv"
    return cohort.read_slide_table(p) if p.is_file() else None


def _load_task_features(task_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(X, labels, sample ids) of every split of one task of one backbone, concatenated; None when absent."""
    parts = [features.load_features(d) for d in sorted(Path(task_dir).glob("*")) if (d / "manifest.json").is_file()]
    if not parts:
        return None
    return (np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts]),
            np.concatenate([np.asarray(p[1]) for p in parts]),
            np.concatenate([np.asarray(p[2]) for p in parts]))


def collapse_by_arm(cfg: ProjectConfig, features_dir: Path) -> tuple[pd.DataFrame, dict]:
    """Collapse metrics of every backbone on every collapse cohort present, plus 2-D embeddings for the figures.

    Cohorts (`COLLAPSE_COHORTS`): `synthetic` (held-out synthetic slides, tissue labels known) and `real`
    (held-out real slides, no tissue labels: the class metrics are rows with NaN and a `skipped:` note).
    Returns (long table with a leading `cohort` column, {cohort: {arm: (xy, slide_ids, labels, sites)}}).
    """
    slides = _slides_table(features_dir)
    slide_site = dict(zip(slides.slide_id, slides.site)) if slides is not None else {}
    frames, embeds = [], {}
    backbone_dirs = sorted(p for p in Path(features_dir).iterdir() if p.is_dir())
    for task, cohort_name in COLLAPSE_COHORTS.items():
        labelled = task not in UNLABELLED_TASKS
        for bdir in backbone_dirs:
            loaded = _load_task_features(bdir / task)
            if loaded is None:
                continue
            X, y, ids = loaded
            slide_ids = slide_of(ids)
            sites = np.array([slide_site.get(s, "?") for s in slide_ids])
            df = collapse.collapse_metrics(X, slide_ids, class_labels=y if labelled else None, site_ids=sites,
                                           k=cfg.collapse.k, n_boot=cfg.collapse.n_boot, seed=cfg.seed)
            if not labelled:  # say why, in the words of the issue, rather than "no class labels given"
                df.loc[df.metric.isin(collapse.CLASS_METRICS), "note"] = "skipped: no tissue labels (real slides)"
            arm = bdir.name.removeprefix("dino_")
            df.insert(0, "arm", arm)
            df.insert(0, "cohort", cohort_name)
            frames.append(df)
            xy_idx = np.random.default_rng(cfg.seed).permutation(len(X))[: cfg.collapse.max_points]
            xy = figures.embedding_2d(X[xy_idx], method=cfg.collapse.embedding,
                                      max_points=cfg.collapse.max_points, seed=cfg.seed)
            labels = None
            if labelled:
                names = _class_names_of(bdir / task)
                labels = np.array([names[c] if 0 <= c < len(names) else "unlabelled" for c in y[xy_idx]]) \
                    if names else y[xy_idx]
            embeds.setdefault(cohort_name, {})[arm] = (xy, slide_ids[xy_idx], labels, sites[xy_idx])
    metrics = pd.concat(frames, ignore_index=True) if frames else stage_tables.empty(stage_tables.COLLAPSE_METRICS_COLUMNS)
    return metrics, embeds


def write_collapse_by_model(metrics: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """`collapse_by_model.csv` (every backbone, peers included, ranked by slide identifiability per cohort) and
    its figure; header-only table and a figure saying so when nothing was measured."""
    ranked = comparison.collapse_by_model(metrics)
    csv = atomic.write_csv(ranked, Path(out_dir) / "collapse_by_model.csv")
    return csv, comparison.plot_collapse_by_model(ranked, Path(out_dir) / "collapse_by_model.png")


def collapse_figure_paths(out_dir: Path, cohort_name: str) -> tuple[Path, Path]:
    """(metric bars, embeddings) PNG paths of one cohort; the synthetic cohort keeps the historical names."""
    suffix = "" if cohort_name == "synthetic" else f"_{cohort_name}"
    return Path(out_dir) / f"collapse_metrics{suffix}.png", Path(out_dir) / f"embeddings_by_arm{suffix}.png"


def write_collapse_figures(metrics: pd.DataFrame, embeds: dict, out_dir: Path) -> list[Path]:
    """Per cohort: metric bars (metrics with a value for some arm; skipped ones are in the CSV) and the
    embeddings by slide / class / site, one column per arm. Returns the PNGs written."""
    written = []
    for cohort_name in dict.fromkeys(metrics["cohort"]) if len(metrics) else []:
        part = metrics[metrics.cohort == cohort_name]
        shown = [m for m in dict.fromkeys(part.metric) if part.loc[part.metric == m, "value"].notna().any()]
        bars, scatter = collapse_figure_paths(out_dir, cohort_name)
        written.append(figures.plot_collapse_bars(part, bars, metrics=shown))
        if embeds.get(cohort_name):
            written.append(figures.plot_embeddings_by_arm(embeds[cohort_name], scatter))
    return written


def _class_names_of(task_dir: Path) -> list[str]:
    for manifest in sorted(Path(task_dir).glob("*/manifest.json")):
        names = json.loads(manifest.read_text()).get("class_names")
        if names:
            return list(names)
    return []


def run(cfg: ProjectConfig, paths) -> CollapseResult:
    """The metrics of every backbone on every cohort, the verdict, the ranking by model and the figures."""
    out = paths.stage_dir(SPEC.key)
    save_config(cfg, out / "config.yaml")
    metrics, embeds = collapse_by_arm(cfg, paths.stage_dir(s04_features.SPEC.key))
    atomic.write_csv(metrics, out / "collapse_metrics.csv")
    verdict = collapse_verdict(metrics)
    atomic.write_csv(verdict, out / "collapse_verdict.csv")
    write_collapse_by_model(metrics, out)  # every backbone, peers included, ranked by slide identifiability
    return CollapseResult(metrics, verdict, write_collapse_figures(metrics, embeds, out))
