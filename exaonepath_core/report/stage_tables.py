"""The columns of every table a stage writes, so a table with no rows still has its header, and what a run
did not measure, in words, for the report.

A run on a lab's own slides before any downstream dataset is downloaded measures no probe; one whose sites have
a single slide holds none out. Each later stage and the report read such empty tables as "nothing measured" and
say why (from stage 04's `datasets.csv`), never fail on a file without columns.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

TILING_SUMMARY_COLUMNS = ("source", "split", "slides", "ok", "failed", "tiles", "zero_tile_slides")
NORMALIZE_SUMMARY_COLUMNS = ("store", "slides_ok", "slides_failed", "patches", "fallback_passed_through",
                             "fallback_fraction", "failed_reasons")
FEATURES_INDEX_COLUMNS = ("backbone", "dataset", "split", "n", "dim", "reused")
DATASET_STATUS_COLUMNS = ("dataset", "status", "detail", "n", "splits")
PROBE_RESULTS_COLUMNS = ("task", "backbone", "probe", "seed", "metric", "value", "ci_low", "ci_high", "hparam",
                         "n_train", "n_test", "note")
COLLAPSE_METRICS_COLUMNS = ("cohort", "arm", "metric", "value", "ci_low", "ci_high", "chance", "n", "note")
COLLAPSE_VERDICT_COLUMNS = ("cohort", "comparison", "metric", "value", "baseline", "delta", "outcome")

# stage 04's datasets that feed stage 06's collapse cohorts, named as the report reads them
COHORT_DATASETS = {"heldout_slides": "held-out real slides (stage 06 cohort 'real')",
                   "synthetic_heldout": "held-out synthetic slides (stage 06 cohort 'synthetic')"}


def empty(columns: tuple[str, ...]) -> pd.DataFrame:
    """A table with these columns and no rows (written as its header line)."""
    return pd.DataFrame(columns=list(columns))


def read_table(path: str | Path) -> pd.DataFrame | None:
    """A stage's CSV; None when the file does not exist, a table without rows or columns when it is empty (a
    run before this fix wrote a 1-byte file for "no rows")."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_csv_or_none(path: str | Path) -> pd.DataFrame | None:
    """A stage's CSV for the runner's warnings; None when it is absent, unreadable or empty (nothing to warn of)."""
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


def _not_present(datasets: pd.DataFrame) -> dict[str, str]:
    """{dataset: detail} of the datasets stage 04 did not embed."""
    status = datasets["status"].astype(str)
    return dict(zip(datasets.loc[status != "present", "dataset"], datasets.loc[status != "present", "detail"]))


def not_measured(stage_dirs: dict[str, Path], arms: list[str]) -> list[str]:
    """One sentence per thing this run did not measure and why (empty when everything was measured)."""
    notes: list[str] = []
    if not arms:
        notes.append("no pretraining arm (arms: []): stages 02-03 trained nothing; only untrained or extra "
                     "backbones were embedded")
    datasets = read_table(stage_dirs["04"] / "datasets.csv")
    if datasets is None or "dataset" not in datasets.columns:
        return notes + ["stage 04 wrote no datasets.csv: nothing was embedded (did stage 04 run?)"]
    absent = _not_present(datasets)
    unconfigured = sorted(name for name, why in absent.items() if str(why).startswith("absent: no root configured"))
    if unconfigured:
        notes.append(f"downstream datasets absent (no root configured in data.downstream_roots): "
                     f"{', '.join(unconfigured)}; their probes and the paper-table accuracies are not measured")
    for name, why in absent.items():
        if name not in unconfigured:
            notes.append(f"{COHORT_DATASETS.get(name, name)}: {why}")
    index = read_table(stage_dirs["04"] / "features_index.csv")
    if index is not None and index.empty:
        notes.append("no feature set was written (features_index.csv has no rows): no dataset was present")
    probes = read_table(stage_dirs["05"] / "probe_results_long.csv")
    if probes is not None and probes.empty:
        notes.append("no linear or kNN probe ran: no labelled dataset with train and test features")
    metrics = read_table(stage_dirs["06"] / "collapse_metrics.csv")
    if metrics is not None and metrics.empty:
        notes.append("no collapse metric: no held-out slide features (held-out synthetic or real slides)")
    return notes


def not_measured_html(notes: list[str]) -> str:
    """The notes as the report's "Not measured in this run" list ('' when there are none)."""
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"<p><b>Not measured in this run</b> (absent, and why):</p><ul class='missing'>{items}</ul>"
