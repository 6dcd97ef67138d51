"""Stage 05, linear probes: L2 logistic regression and kNN on frozen features of every labelled task, with
bootstrap intervals over seeds, beside the paper's numbers. Outputs: `results/<run>/05_probes/`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from exaonepath_core.config import ProjectConfig
from exaonepath_core.evaluation import probes
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.report import stage_tables
from exaonepath_core.stages import s04_features
from exaonepath_core.stages.base import StageSpec
from exaonepath_core.stages.datasets import UNLABELLED_TASKS

SPEC = StageSpec("05", "05_linear_probes", "05_probes", ("probes",))


@dataclass
class ProbesResult:
    """What stage 05 wrote, for its notebook to show."""

    results: pd.DataFrame
    summary: pd.DataFrame
    figure: Path


def probe_feature_dirs(features_dir: Path) -> tuple[dict[str, dict[str, dict[str, Path]]], list[dict[str, str]]]:
    """{task: {backbone: {"train", "test"[, "val"]: folder}}} of the labelled feature folders a probe can use,
    and one row (task, backbone, missing) for each that lacks its train or test split (listed, never dropped)."""
    tasks: dict[str, dict[str, dict[str, Path]]] = {}
    incomplete = []
    for bdir in sorted(p for p in Path(features_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for ddir in sorted(p for p in bdir.iterdir() if p.is_dir() and p.name not in UNLABELLED_TASKS):
            splits = {s.name: s for s in ddir.iterdir() if (s / "manifest.json").is_file()}
            if not splits:  # not a feature folder (e.g. untrained_backbones/<arm>/ holds weights)
                continue
            missing = [name for name in ("train", "test") if name not in splits]
            if missing:
                incomplete.append({"task": ddir.name, "backbone": bdir.name, "missing": ", ".join(missing)})
                continue
            dirs = {"train": splits["train"], "test": splits["test"]}
            if "valid" in splits:
                dirs["val"] = splits["valid"]
            tasks.setdefault(ddir.name, {})[bdir.name] = dirs
    return tasks, incomplete


def run_all_probes(cfg: ProjectConfig, features_dir: Path, min_per_class: int = 10) -> pd.DataFrame:
    """Every task with train and test features: logistic probe and kNN over the configured seeds, long format.

    A task whose training split has fewer than `min_per_class` samples in some class (e.g. the 32-tile CRC
    subset) gets the kNN probe only, with k capped by the training size; the `note` column says so.
    Unlabelled tasks (`UNLABELLED_TASKS`: held-out real slides) are never probed; `probe_summary` lists them.
    """
    tasks, _ = probe_feature_dirs(features_dir)
    frames = []
    for task, dirs in sorted(tasks.items()):
        ytr = np.load(next(iter(dirs.values()))["train"] / "labels.npy")
        counts = np.bincount(ytr) if len(ytr) else np.zeros(1, int)
        smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0  # classes absent here do not count
        if smallest >= min_per_class:
            df = probes.run_probes(task, dirs, seeds=cfg.probes.seeds, n_boot=cfg.probes.n_boot,
                                   knn_k=cfg.probes.knn_k)
            df["note"] = ""
        else:
            k = max(1, min(cfg.probes.knn_k, len(ytr) - 1))
            df = probes.run_probes(task, dirs, seeds=cfg.probes.seeds[:1], probes=("knn",),
                                   n_boot=cfg.probes.n_boot, knn_k=k)
            df["note"] = f"kNN only (k={k}): {len(ytr)} training samples, smallest class {smallest}"
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else stage_tables.empty(stage_tables.PROBE_RESULTS_COLUMNS)




def task_chance(features_dir: Path) -> dict[str, float]:
    """Per probed task, the test accuracy of always answering the majority class (from its test labels)."""
    chance = {}
    for task, by_backbone in probe_feature_dirs(features_dir)[0].items():
        labels = np.load(next(iter(by_backbone.values()))["test"] / "labels.npy")
        if len(labels):
            chance[task] = float(np.bincount(labels).max() / len(labels))
    return chance


def probe_summary(results: pd.DataFrame, features_dir: Path) -> pd.DataFrame:
    """Top-1 accuracy per (task, backbone) beside the paper's numbers; the paper's tasks absent here say so."""
    status_csv = Path(features_dir) / "datasets.csv"
    available = {}
    if status_csv.is_file():
        table = pd.read_csv(status_csv)
        available = dict(zip(table["dataset"], table["detail"]))
    summary = probes.summary_table(results, available=available)
    skipped = [{"task": task, "backbone": "", "probe": "",
                "status": "not probed: no tissue labels (held-out real slides, collapse metrics only in stage 06)",
                "n_seeds": 0}
               for task in UNLABELLED_TASKS if str(available.get(task, "")).startswith("present")]
    if Path(features_dir).is_dir():
        skipped += [{"task": row["task"], "backbone": row["backbone"], "probe": "", "n_seeds": 0,
                     "status": f"not probed: no {row['missing']} split features (see stage 04's datasets.csv)"}
                    for row in probe_feature_dirs(features_dir)[1]]
    if skipped:
        summary = pd.concat([summary, pd.DataFrame(skipped, columns=summary.columns)], ignore_index=True)
    # a table people read: 4 decimals (no 0.7159999999999999, no std 1e-16 beside 0)
    numeric = ["mean", "std", "ci_low", "ci_high", "delta_vs_paper"]
    summary[numeric] = summary[numeric].astype(float).round(4)
    return summary


def run(cfg: ProjectConfig, paths) -> ProbesResult:
    """Every probe (long table), the summary beside the paper and the figure with each task's chance level
    (the majority-class rate of its test split)."""
    out = paths.stage_dir(SPEC.key)
    save_config(cfg, out / "config.yaml")
    features_dir = paths.stage_dir(s04_features.SPEC.key)
    results = run_all_probes(cfg, features_dir)
    atomic.write_csv(results, out / "probe_results_long.csv")
    summary = probe_summary(results, features_dir)
    atomic.write_csv(summary, out / "probe_summary.csv")
    figure = probes.plot_probe_results(results, out / "probe_results.png", chance=task_chance(features_dir))
    return ProbesResult(results, summary, Path(figure))
