"""The paper's claim, judged on stage 06's collapse metrics: stain normalization lowers the slide
identifiability of held-out slides (95 % intervals apart) while the tissue class stays predictable; and the
claim in words for the report."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from exaonepath_core.config import INPUT_ARMS
from exaonepath_core.evaluation import collapse
from exaonepath_core.report import stage_tables


def collapse_verdict(metrics: pd.DataFrame, class_margin: float = 0.05) -> pd.DataFrame:
    """The paper's claim as comparisons (long format), per cohort: each non-raw pretraining arm vs the raw arm,
    and the untrained initialisation fed Macenko vs raw inputs (what the normalization alone does). Extra
    backbones (timm models, the official checkpoint) are not compared: they differ in more than the input.

    Slide/site identifiability counts as `lower` only when the arm's 95 % interval lies wholly below the
    baseline's (`ci_high` < baseline `ci_low`); a lower point value whose intervals overlap is reported as
    "lower, CIs overlap" and does not count (a metric without intervals falls back to its point value, and says
    so). For the leave-one-slide-out class kNN, `kept` when it fell by at most `class_margin`. `claim_holds` per
    comparison: slide-ID probe and same-slide neighbours lower, tissue class kept. A cohort without tissue
    labels (real slides) gets the class row as "skipped: no tissue labels" and a claim_holds outcome that says
    only slide identity was checked."""
    if metrics.empty:
        return stage_tables.empty(stage_tables.COLLAPSE_VERDICT_COLUMNS)
    if "cohort" not in metrics.columns:
        return _verdict_of_cohort(metrics, class_margin)
    frames = []
    for cohort_name, part in metrics.groupby("cohort", sort=False):
        verdict = _verdict_of_cohort(part, class_margin)
        if len(verdict):
            verdict.insert(0, "cohort", cohort_name)
            frames.append(verdict)
    return pd.concat(frames, ignore_index=True) if frames else stage_tables.empty(stage_tables.COLLAPSE_VERDICT_COLUMNS)


def _lower_outcome(value: float, high: float, base: float, base_low: float) -> tuple[bool, str]:
    """Whether `value` (interval upper end `high`) is lower than `base` (lower end `base_low`) beyond their
    intervals, and the outcome text."""
    if not value < base:
        return False, "not lower"
    if any(pd.isna(x) for x in (high, base_low)):
        return True, "lower (point values; no CIs)"
    if high < base_low:
        return True, "lower (CIs apart)"
    return False, "lower, CIs overlap (not counted)"


def _verdict_of_cohort(metrics: pd.DataFrame, class_margin: float) -> pd.DataFrame:
    table = {col: metrics.pivot_table(index="metric", columns="arm", values=col, aggfunc="first", dropna=False)
             if col in metrics.columns else None for col in ("value", "ci_low", "ci_high")}
    value = table["value"]

    def bound(col: str, metric: str, arm: str) -> float:
        frame = table[col]
        return float("nan") if frame is None else frame.loc[metric, arm]

    # the claim is about our pretraining arms (same network, data and schedule, another input); an extra
    # backbone (another architecture, another training) stays in the metrics table, described, not judged
    pairs = [(arm, "raw") for arm in value.columns if arm in INPUT_ARMS and arm != "raw"]
    if {"untrained_raw", "untrained_macenko"} <= set(value.columns):
        pairs.append(("untrained_macenko", "untrained_raw"))
    if {"raw", "untrained_raw"} <= set(value.columns):
        pairs.append(("raw", "untrained_raw"))
    identity = [collapse.SLIDE_PROBE, collapse.SAME_SLIDE_NEIGHBOURS, collapse.SILHOUETTE_SLIDE,
                collapse.SITE_PROBE, collapse.SAME_SITE_NEIGHBOURS]
    rows = []
    for arm, base in pairs:
        if base not in value.columns:
            continue
        checks = []
        for m in identity:
            if m in value.index and pd.notna(value.loc[m, arm]) and pd.notna(value.loc[m, base]):
                lower, outcome = _lower_outcome(value.loc[m, arm], bound("ci_high", m, arm), value.loc[m, base],
                                                bound("ci_low", m, base))
                rows.append({"comparison": f"{arm} vs {base}", "metric": m, "value": value.loc[m, arm],
                             "baseline": value.loc[m, base], "delta": value.loc[m, arm] - value.loc[m, base],
                             "outcome": outcome})
                if m in (collapse.SLIDE_PROBE, collapse.SAME_SLIDE_NEIGHBOURS):
                    checks.append(lower)
        m = collapse.KNN_LEAVE_ONE_SLIDE_OUT
        class_checked = m in value.index and pd.notna(value.loc[m, arm]) and pd.notna(value.loc[m, base])
        if class_checked:
            kept = bool(value.loc[m, base] - value.loc[m, arm] <= class_margin)
            rows.append({"comparison": f"{arm} vs {base}", "metric": m, "value": value.loc[m, arm],
                         "baseline": value.loc[m, base], "delta": value.loc[m, arm] - value.loc[m, base],
                         "outcome": "kept" if kept else f"fell by more than {class_margin}"})
            checks.append(kept)
        else:
            rows.append({"comparison": f"{arm} vs {base}", "metric": m, "value": float("nan"),
                         "baseline": float("nan"), "delta": float("nan"), "outcome": "skipped: no tissue labels"})
        holds = bool(checks) and all(checks)
        if class_checked:
            outcome = "holds" if holds else "does not hold"
        else:  # only the slide-identity half of the claim could be tested
            outcome = "slide identity lower; class not checked (no tissue labels)" if holds else "does not hold"
        rows.append({"comparison": f"{arm} vs {base}", "metric": "claim_holds", "value": float(holds),
                     "baseline": float("nan"), "delta": float("nan"), "outcome": outcome})
    return pd.DataFrame(rows, columns=[c for c in stage_tables.COLLAPSE_VERDICT_COLUMNS if c != "cohort"])



def verdict_paragraph(collapse_dir: Path) -> str:
    """The paper's claim in words, per cohort and comparison, from stage 06's verdict table ('' without it)."""
    try:
        verdict = pd.read_csv(Path(collapse_dir) / "collapse_verdict.csv")
    except (OSError, ValueError):
        return ""
    if "metric" not in verdict.columns:
        return ""
    claims = verdict[verdict["metric"] == "claim_holds"]
    if claims.empty:
        return ""
    parts = []
    for _, row in claims.iterrows():
        cohort = f"{row['cohort']}: " if "cohort" in claims.columns else ""
        parts.append(f"{html.escape(cohort + str(row['comparison']))} &rarr; <b>{html.escape(str(row['outcome']))}</b>")
    return ("<p>The paper's claim (stain normalization lowers slide identifiability of held-out slides, 95 % "
            "intervals apart, while the tissue class stays predictable): " + "; ".join(parts)
            + ". Details: <a href='06_collapse/collapse_verdict.csv'>collapse_verdict.csv</a>.</p>")
