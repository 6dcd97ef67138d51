"""Stage 07, figures and tables: the paper's table and Figure 1 beside this run's measurements, every stage's
figures and tables with one line of context, and `results/<run>/index.html` linking them."""
from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path

import pandas as pd

from exaonepath_core.config import REPO_ROOT, ProjectConfig, pick_device
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.report import comparison, html_index, stage_tables
from exaonepath_core.report.html_index import ReportItem
from exaonepath_core.stages.base import StageSpec
from exaonepath_core.stages.s06_collapse import collapse_figure_paths
from exaonepath_core.stages.verdict import verdict_paragraph

SPEC = StageSpec("07", "07_figures_and_tables", "07_report", ())


def report_items(cfg: ProjectConfig, paths) -> tuple[list, dict[str, pd.DataFrame]]:
    """Every figure and table of the run with one line of context, and the tables stage 07 writes."""
    s = {k: paths.stage_dir(k, create=False) for k in ("01", "02", "03", "04", "05", "06", "07")}
    items: list[ReportItem] = []
    tiles_json = s["01"] / "tiles.json"
    tiles_dir = Path(json.loads(tiles_json.read_text())["tiles_dir"]) if tiles_json.is_file() else s["01"]
    items.append(ReportItem("01 Tiling", s["01"] / "tiling_summary.csv", "slides, failures and tiles per source"))
    for qc in sorted(tiles_dir.glob("qc/*.png"), key=lambda p: (not p.stem.startswith("CMU"), p.name))[:4]:
        items.append(ReportItem("01 Tiling", qc, f"tissue mask and tile grid of {qc.stem}"))
    if cfg.data.synthetic.enabled:  # else not generated: no "missing" line for a figure the run never makes
        items.append(ReportItem("01 Tiling", s["01"] / "synthetic_examples.png",
                                "synthetic cohort: tissue classes (rows) by site (columns)"))
    items.append(ReportItem("02 Stain normalization", s["02"] / "normalize_summary.csv",
                            "patches per store and degenerate patches passed through (counted, not dropped)"))
    items.append(ReportItem("02 Stain normalization", s["02"] / "stain_qc.png", "before / after Macenko"))
    curves = []
    for arm in cfg.arms:
        items.append(ReportItem("03 DINO pretraining", s["03"] / arm / "training_curves.png",
                                f"arm {arm}: loss, schedules, teacher entropy"))
        sp = s["03"] / arm / "summary.json"
        if sp.is_file():
            curves.append({"arm": arm, **json.loads(sp.read_text())})
    tables: dict[str, pd.DataFrame] = {}
    if curves:
        tables["pretraining_summary"] = pd.DataFrame(curves)
        items.append(ReportItem("03 DINO pretraining", s["07"] / "pretraining_summary.csv",
                                "steps, first/last loss, teacher entropy, img/s per arm"))
    items.append(ReportItem("04 Features", s["04"] / "datasets.csv", "datasets present or absent (with reason)"))
    items.append(ReportItem("04 Features", s["04"] / "features_index.csv", "feature sets written"))
    items.append(ReportItem("05 Linear probes", s["05"] / "probe_summary.csv",
                            "top-1 accuracy per task and backbone beside the paper's reported numbers"))
    items.append(ReportItem("05 Linear probes", s["05"] / "probe_results.png", "probe metrics with 95% intervals"))
    items.append(ReportItem("05 Linear probes", s["05"] / "probe_results_long.csv", "every probe, seed and metric"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_verdict.csv",
                            "the paper's claim per cohort and arm vs raw: slide identifiability lower, tissue "
                            "class kept (not checked on real slides: no tissue labels)"))
    cohorts = ["synthetic"]  # no table: its figures are listed as missing
    found = stage_tables.read_table(s["06"] / "collapse_metrics.csv")
    if found is not None and found.empty:
        cohorts = []  # nothing measured: no figure to list (the preamble's "not measured" list says why)
    elif found is not None and "cohort" in found.columns:
        cohorts = list(dict.fromkeys(found["cohort"]))
    for cohort_name in cohorts:
        bars, scatter = collapse_figure_paths(s["06"], cohort_name)
        what = ("held-out synthetic slides" if cohort_name == "synthetic"
                else f"held-out {cohort_name} slides (no tissue labels)")
        items.append(ReportItem("06 Feature collapse", bars, f"collapse metrics per arm: {what}"))
        items.append(ReportItem("06 Feature collapse", scatter,
                                f"embeddings coloured by slide, class and site, one column per arm: {what}"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_metrics.csv", "all collapse metrics"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_by_model.csv",
                            "every backbone (peers included) ranked by slide identifiability, per cohort"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_by_model.png",
                            "slide-ID probe and same-slide neighbours per model, in rank order"))
    items.append(ReportItem("Model comparison (paper's table and Figure 1)", s["07"] / "model_comparison.csv",
                            "published top-1 of every model of the paper beside this run's measured rows "
                            "(95 % intervals); avg only over all six tasks"))
    items.append(ReportItem("Model comparison (paper's table and Figure 1)", s["07"] / "model_comparison.png",
                            "six-task average vs parameters and vs WSIs (log x): published circles, measured "
                            "diamonds"))
    items.append(ReportItem("Model comparison (paper's table and Figure 1)", s["07"] / "peer_status.csv",
                            "each registered peer: measured, absent (why) or not configured"))
    summary_csv = s["05"] / "probe_summary.csv"
    if summary_csv.is_file():
        tables["paper_table"] = pd.read_csv(summary_csv)
        items.insert(0, ReportItem("Headline", s["07"] / "paper_table.csv",
                                   "six-task table beside the paper (absent datasets marked absent)"))
    for nb in sorted(paths.notebooks_dir.glob("*.ipynb")):
        items.append(ReportItem("Executed notebooks", nb, "executed copy with outputs"))
    return items, tables


def write_model_comparison(cfg: ProjectConfig, paths) -> tuple[Path, Path]:
    """Stage 07's `model_comparison.csv` (published rows beside this run's measured ones) and `.png` (Figure 1),
    plus `peer_status.csv` (measured / absent with the reason / not configured per registered model)."""
    features_dir, out = paths.stage_dir("04", create=False), paths.stage_dir("07")
    backbones = sorted(p.name for p in features_dir.iterdir() if p.is_dir()) if features_dir.is_dir() else []
    status = comparison.peer_status(cfg.features.extra_backbones, backbones)
    atomic.write_csv(status, out / "peer_status.csv")
    summary_csv = paths.stage_dir("05", create=False) / "probe_summary.csv"
    summary = pd.read_csv(summary_csv) if summary_csv.is_file() and summary_csv.stat().st_size > 1 else pd.DataFrame()
    table = comparison.model_comparison_table(summary, status)
    csv = atomic.write_csv(table, out / "model_comparison.csv")
    return csv, comparison.plot_model_comparison(table, out / "model_comparison.png")


def report_preamble(cfg: ProjectConfig, paths) -> str:
    """A paragraph: profile, git state, time per stage from the done-markers."""
    try:  # check=False: outside a git checkout the report still renders, with "?" for the commit
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, check=False)
        sha = proc.stdout.strip() if proc.returncode == 0 else "?"
    except OSError:  # no git executable
        sha = "?"
    times = []
    for key, (nb, _) in paths.stages.items():
        marker = paths.done_marker(key)
        if marker.is_file():
            times.append(f"{nb}: {json.loads(marker.read_text()).get('seconds', '?')} s")
    run = "" if cfg.results_name == cfg.profile else f" (run <b>{html.escape(cfg.results_name)}</b>)"
    return (f"<p>Profile <b>{html.escape(cfg.profile)}</b>{run}, git {html.escape(sha)}, device {pick_device(cfg.device)}. "
            f"Stage times: {html.escape('; '.join(times) or 'n/a')}. Resolved config: "
            f"<a href='config.yaml'>config.yaml</a>.</p>" + verdict_paragraph(paths.stage_dir("06", create=False))
            + stage_tables.not_measured_html(stage_tables.not_measured(
                {k: paths.stage_dir(k, create=False) for k in ("04", "05", "06")}, list(cfg.arms))))


def run(cfg: ProjectConfig, paths) -> tuple[Path, list, dict[str, pd.DataFrame]]:
    """The model comparison, the tables and `index.html`; every file it links must exist. Returns (index
    path, report items, tables)."""
    out = paths.stage_dir(SPEC.key)
    save_config(cfg, out / "config.yaml")
    write_model_comparison(cfg, paths)  # the paper's table and Figure 1, published beside measured
    items, tables = report_items(cfg, paths)
    for name, df in tables.items():
        atomic.write_csv(df, out / f"{name}.csv")
    index = html_index.write_index_html(paths.profile_dir, items,
                                        title=f"EXAONEPath compendium — {cfg.results_name} run",
                                        preamble=report_preamble(cfg, paths))
    missing = [p for p in html_index.linked_files(index) if not p.exists()]
    if missing:
        raise RuntimeError(f"index.html links files that do not exist: {missing}")
    return index, items, tables
