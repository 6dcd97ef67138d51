"""Issue 21: a lab's first day with its own slides (the paper profile before datasets and GPUs).

Empty tables keep their header and the report says what was not measured; `nproc_per_node: auto` and the
GPU-count check; a rank killed by SIGKILL named as such; `./run_all.sh lab` as root; the first-day profile end
to end on real slides.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from exaonepath_core.config import ConfigError, load_config
from exaonepath_core.io import atomic
from exaonepath_core.pretrain import rank_checks
from exaonepath_core.report import html_index, stage_tables
from exaonepath_core.stages import datasets as stage_datasets
from exaonepath_core.stages import s01_tile, s02_normalize, s03_pretrain, s05_probes, s06_collapse, s07_report
from exaonepath_core.stages import verdict as stage_verdict

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# empty tables: header and columns without rows; later stages and the report read them as "nothing measured"
# ----------------------------------------------------------------------------------------------------------------
def _header_of(df: pd.DataFrame, path: Path) -> list[str]:
    atomic.write_csv(df, path)
    assert path.read_text().strip(), f"{path.name}: written without a header"
    return list(pd.read_csv(path).columns)


def test_every_stage_table_keeps_its_header_with_no_rows(tmp_path):
    cfg = load_config("first_day", {"results_root": str(tmp_path / "results")})
    no_slides = pd.DataFrame(columns=["slide_id", "path", "source", "site", "split", "sidecar"])
    no_ledger = pd.DataFrame(columns=["slide_id", "status", "reason", "n_tiles"])
    features_dir = tmp_path / "04_features"
    features_dir.mkdir()
    tables = {
        "tiling_summary": (s01_tile.tiling_summary(no_slides, no_ledger), stage_tables.TILING_SUMMARY_COLUMNS),
        "normalize_summary": (s02_normalize.normalize_summary({}), stage_tables.NORMALIZE_SUMMARY_COLUMNS),
        "features_index": (pd.DataFrame([], columns=list(stage_tables.FEATURES_INDEX_COLUMNS)),
                           stage_tables.FEATURES_INDEX_COLUMNS),
        "datasets": (stage_datasets.dataset_status_table({}), stage_tables.DATASET_STATUS_COLUMNS),
        "probe_results_long": (s05_probes.run_all_probes(cfg, features_dir), stage_tables.PROBE_RESULTS_COLUMNS),
        "collapse_metrics": (s06_collapse.collapse_by_arm(cfg, features_dir)[0], stage_tables.COLLAPSE_METRICS_COLUMNS),
        "collapse_verdict": (stage_verdict.collapse_verdict(stage_tables.empty(stage_tables.COLLAPSE_METRICS_COLUMNS)),
                             stage_tables.COLLAPSE_VERDICT_COLUMNS),
    }
    for name, (df, columns) in tables.items():
        assert df.empty, name
        assert _header_of(df, tmp_path / f"{name}.csv") == list(columns), name
    # the probe summary of no results still lists the paper's six tasks, with the reason from datasets.csv
    status = stage_datasets.dataset_status_table({"pcam": {"status": "absent: no root configured", "splits": {}, "n": 0}})
    atomic.write_csv(status, features_dir / "datasets.csv")
    summary = s05_probes.probe_summary(tables["probe_results_long"][0], features_dir)
    assert summary.loc[summary.task == "pcam", "status"].item() == "absent: no root configured"


def test_the_column_lists_match_the_tables_the_stages_write_with_rows():
    """The header of an empty table is the header the same table has with rows (no drift between the two)."""
    from exaonepath_core.evaluation import collapse, probes

    assert stage_tables.COLLAPSE_METRICS_COLUMNS == ("cohort", "arm", *collapse.TABLE_COLUMNS)
    assert stage_tables.PROBE_RESULTS_COLUMNS[:len(probes.RESULT_COLUMNS)] == probes.RESULT_COLUMNS
    slides = pd.DataFrame({"slide_id": ["a"], "source": ["slides"], "split": ["train"]})
    ledger = pd.DataFrame({"slide_id": ["a"], "status": ["ok"], "reason": [""], "n_tiles": [3]})
    assert tuple(s01_tile.tiling_summary(slides, ledger).columns) == stage_tables.TILING_SUMMARY_COLUMNS
    led = pd.DataFrame({"status": ["ok"], "n_patches": [4], "n_fallback": [1], "reason": [""]})
    assert tuple(s02_normalize.normalize_summary({"raw": led}).columns) == stage_tables.NORMALIZE_SUMMARY_COLUMNS


def _stage_dirs(root: Path) -> dict[str, Path]:
    dirs = {k: root / name for k, name in (("04", "04_features"), ("05", "05_probes"), ("06", "06_collapse"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def test_not_measured_says_which_datasets_are_absent_and_why(tmp_path):
    dirs = _stage_dirs(tmp_path)
    entries = {name: {"status": "absent: no root configured", "splits": {}, "n": 0}
               for name in ("pcam", "mhist", "crc100k", "til", "msi_crc", "msi_stad")}
    entries["heldout_slides"] = {"status": "absent: no real slide held out (no site had enough slides)",
                                 "splits": {}, "n": 0}
    atomic.write_csv(stage_datasets.dataset_status_table(entries), dirs["04"] / "datasets.csv")
    atomic.write_csv(pd.DataFrame([], columns=list(stage_tables.FEATURES_INDEX_COLUMNS)),
                              dirs["04"] / "features_index.csv")
    atomic.write_csv(stage_tables.empty(stage_tables.PROBE_RESULTS_COLUMNS),
                              dirs["05"] / "probe_results_long.csv")
    (dirs["06"] / "collapse_metrics.csv").write_text("\n")  # a run before the fix: 1 byte, no header
    notes = stage_tables.not_measured(dirs, arms=["macenko"])
    text = " | ".join(notes)
    assert "no root configured in data.downstream_roots): crc100k, mhist, msi_crc, msi_stad, pcam, til" in text
    assert "held-out real slides (stage 06 cohort 'real'): absent: no real slide held out" in text
    assert "no feature set was written" in text and "no linear or kNN probe ran" in text
    assert "no collapse metric" in text
    html_text = stage_tables.not_measured_html(notes)
    assert "Not measured in this run" in html_text and html_text.count("<li>") == len(notes)
    assert stage_tables.not_measured_html([]) == ""


def test_the_report_renders_empty_and_headerless_tables_and_says_so(tmp_path):
    with_header = tmp_path / "probe_results_long.csv"
    atomic.write_csv(stage_tables.empty(stage_tables.PROBE_RESULTS_COLUMNS), with_header)
    legacy = tmp_path / "features_index.csv"
    legacy.write_text("\n")  # what stage 04/05 wrote before: pd.read_csv raised EmptyDataError on it
    items = [html_index.ReportItem("05", with_header, "every probe"), html_index.ReportItem("04", legacy, "feature sets")]
    index = html_index.write_index_html(tmp_path, items, title="t")
    assert index.read_text().count("no rows: nothing measured") == 2


def test_report_items_list_no_collapse_figure_when_no_cohort_was_measured(tmp_path):
    from exaonepath_core.stages.results import ResultsPaths

    cfg = load_config("first_day", {"results_root": str(tmp_path)})
    paths = ResultsPaths.for_profile(cfg.results_name, cfg.results_root)
    collapse_dir = paths.stage_dir("06")
    atomic.write_csv(stage_tables.empty(stage_tables.COLLAPSE_METRICS_COLUMNS),
                              collapse_dir / "collapse_metrics.csv")
    items, _ = s07_report.report_items(cfg, paths)
    names = {Path(item.path).name for item in items}
    assert "collapse_metrics.png" not in names and "embeddings_by_arm.png" not in names
    assert "synthetic_examples.png" not in names  # data.synthetic.enabled is false: never made, not "missing"
    assert "Not measured in this run" in s07_report.report_preamble(cfg, paths)


def test_stage_warnings_read_header_only_tables_and_name_a_store_of_fallbacks_only(tmp_path):
    from exaonepath_core.run import pipeline

    cfg = load_config("first_day", {"results_root": str(tmp_path)})
    for name, columns in (("tiling_summary.csv", stage_tables.TILING_SUMMARY_COLUMNS),
                          ("normalize_summary.csv", stage_tables.NORMALIZE_SUMMARY_COLUMNS),
                          ("datasets.csv", stage_tables.DATASET_STATUS_COLUMNS)):
        atomic.write_csv(stage_tables.empty(columns), tmp_path / name)
    assert [pipeline.stage_warnings(k, tmp_path, cfg) for k in ("01", "02", "04")] == [[], [], []]
    led = pd.DataFrame({"status": ["ok", "ok"], "n_patches": [5, 7], "n_fallback": [5, 7], "reason": ["", ""]})
    atomic.write_csv(s02_normalize.normalize_summary({"raw": led.assign(n_fallback=0), "macenko": led}),
                              tmp_path / "normalize_summary.csv")
    assert pipeline.stage_warnings("02", tmp_path, cfg) == [
        ("store macenko: every one of its 12 patches was passed through unchanged (no stain estimate: "
         "background-only tiles?), so the macenko arm sees raw colours")]


def test_stage_02_stops_with_the_reason_when_no_pretraining_slide_gave_a_tile(tmp_path):
    cfg = load_config("first_day", {"results_root": str(tmp_path)})
    train = pd.DataFrame({"slide_id": ["a", "b"], "split": ["train", "train"]})
    with pytest.raises(RuntimeError, match=r"no tile to pretrain on: 2 pretraining slide\(s\), 2 failed to tile"):
        s02_normalize.check_pretraining_tiles(cfg, train, [], tmp_path)
    no_arms = load_config("first_day", {"results_root": str(tmp_path), "arms": []})
    s02_normalize.check_pretraining_tiles(no_arms, train, [], tmp_path)  # nothing to pretrain: nothing to refuse


def test_a_run_without_any_slide_is_refused_in_stage_01_naming_the_folders(tmp_path):
    from exaonepath_core.data import cohort

    (tmp_path / "empty_site").mkdir()
    cfg = load_config("first_day", {"results_root": str(tmp_path), "data.slide_dirs": [str(tmp_path / "empty_site")]})
    with pytest.raises(ValueError, match="no slide in this run: .*empty_site"):
        cohort.build_slide_table(cfg, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# nproc_per_node: auto, and more ranks than GPUs refused
# ----------------------------------------------------------------------------------------------------------------
def _gpus(monkeypatch, n: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("gpus, expected", [(0, 1), (1, 1), (4, 4)])
def test_nproc_per_node_auto_is_the_visible_gpus_and_one_without(monkeypatch, gpus, expected):
    _gpus(monkeypatch, gpus)
    assert load_config("paper").nproc_per_node == expected  # the paper profile's default is auto
    assert load_config("smoke", {"nproc_per_node": "auto"}).nproc_per_node == expected


def test_nproc_per_node_other_strings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="nproc_per_node: expected an integer, got str 'eight'"):
        load_config("smoke", {"nproc_per_node": "eight"})


def test_more_ranks_than_gpus_is_refused_in_one_line_naming_both(monkeypatch):
    _gpus(monkeypatch, 0)
    with pytest.raises(ConfigError) as err:
        rank_checks.check_nproc_per_node(8, "auto")
    message = str(err.value)
    assert "\n" not in message
    assert "nproc_per_node is 8 but this machine has 0 visible GPU(s)" in message
    assert "--set nproc_per_node=auto" in message
    _gpus(monkeypatch, 2)
    with pytest.raises(ConfigError, match="nproc_per_node is 4 but this machine has 2 visible GPU"):
        rank_checks.check_nproc_per_node(4, "cuda")
    rank_checks.check_nproc_per_node(2, "auto")  # one rank per GPU
    rank_checks.check_nproc_per_node(1, "auto", gpus=0)  # one CPU process
    rank_checks.check_nproc_per_node(4, "cpu", gpus=0)  # CPU ranks on purpose (gloo)


def test_the_runner_refuses_before_any_stage(monkeypatch, tmp_path, capsys):
    from exaonepath_core.run import pipeline

    _gpus(monkeypatch, 0)
    rc = pipeline.main(["--profile", "smoke", "--set", f"results_root={tmp_path}", "--set", "nproc_per_node=8"])
    assert rc == 2
    assert "nproc_per_node is 8 but this machine has 0 visible GPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "smoke" / "01_tiles").exists()  # refused before stage 01, not after hours of it


# ----------------------------------------------------------------------------------------------------------------
# a rank killed by SIGKILL (the kernel's OOM killer) is named as such, with its log
# ----------------------------------------------------------------------------------------------------------------
# Loaded by every Python the test's children start (PYTHONPATH): the trainer run_pretraining starts is killed
# by a real SIGKILL, as the kernel's OOM killer does, whatever command run_pretraining builds (plain or torchrun)
KILLER_SITECUSTOMIZE = """import os, signal, time
mode, rank = os.environ.get("FIRSTDAY_KILL"), os.environ.get("RANK")
if mode == "single" or (mode == "rank1" and rank == "1"):
    print(f"rank {rank or 0} allocating", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "rank1" and rank is not None:  # the other ranks wait until torchrun stops them
    time.sleep(120)
"""


def _kill_children(tmp_path: Path, monkeypatch, mode: str) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLER_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FIRSTDAY_KILL", mode)
    out = tmp_path / "arm"
    out.mkdir()
    (out / "pretrain.yaml").write_text("{}\n")
    return out


def test_a_single_process_killed_by_sigkill_is_reported_as_likely_out_of_memory(tmp_path, monkeypatch):
    out = _kill_children(tmp_path, monkeypatch, "single")
    with pytest.raises(RuntimeError) as err:
        s03_pretrain.run_pretraining(out / "pretrain.yaml", out, nproc_per_node=1)
    first = str(err.value).splitlines()[0]
    assert "rank 0 was killed (likely out of memory; SIGKILL)" in first
    assert str(out / "train_stdout.log") in first


def test_a_torchrun_rank_killed_by_sigkill_is_named_with_its_own_log(tmp_path, monkeypatch):
    out = _kill_children(tmp_path, monkeypatch, "rank1")
    (out / "train_stdout.log").write_text("an earlier run's lines: exitcode  : -9 (pid: 1)\n")
    with pytest.raises(RuntimeError) as err:
        s03_pretrain.run_pretraining(out / "pretrain.yaml", out, nproc_per_node=2)
    first = str(err.value).splitlines()[0]
    assert "rank(s) 1 killed (likely out of memory; SIGKILL); rank(s) 0 then stopped by torchrun" in first, first
    rank_log = rank_checks.rank_log(out / rank_checks.TORCHRUN_LOG_DIR, 1)
    assert rank_log is not None and f"rank 1: {rank_log}" in first
    assert "rank 1 allocating" in rank_log.with_name("stdout.log").read_text()


def test_with_rank_logs_adds_torchruns_log_flags_only_to_torchrun(tmp_path):
    plain = ["python", "-m", "exaonepath_core.pretrain.cli", "--config", "c.yaml"]
    assert rank_checks.with_rank_logs(plain, tmp_path) == plain
    torchrun = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *plain[1:]]
    assert rank_checks.with_rank_logs(torchrun, tmp_path)[:5] == [
        "python", "-m", "torch.distributed.run", f"--log-dir={tmp_path}", "--tee=3"]


def test_failed_ranks_parses_torchruns_summary_and_other_exits():
    summary = ("Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-02_19:25:50\n  host      : h\n"
               "  rank      : 9 (local_rank: 1)\n  exitcode  : -9 (pid: 4836)  (SIGKILL)\n")
    assert rank_checks.failed_ranks(summary) == {9: (1, -9)}
    text = rank_checks.describe_failure(1, summary, Path("train_stdout.log"))
    assert "rank(s) 9 killed (likely out of memory; SIGKILL)" in text
    assert rank_checks.describe_failure(-int(signal.SIGTERM), "", Path("l.log")).startswith(
        "pretraining was stopped by SIGTERM")
    plain = rank_checks.describe_failure(1, "  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 5)\n",
                                         Path("l.log"))
    assert plain == "pretraining exited with code 1 (rank 0: exit code 1); read l.log"


# ----------------------------------------------------------------------------------------------------------------
# ./run_all.sh lab as root
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (REPO_ROOT / ".venv" / "bin" / "jupyter").exists(), reason="no .venv/bin/jupyter")
def test_run_all_lab_serves_the_notebooks_as_root_or_not(tmp_path):
    port, token = _free_port(), "firstdaytest"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [str(REPO_ROOT / "run_all.sh"), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        body, deadline = None, time.time() + 90
        while body is None and time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}", timeout=5) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(1)
        if body is None:
            proc.kill()
            pytest.fail(f"./run_all.sh lab did not serve (exit {proc.poll()}):\n{proc.stdout.read().decode()[-3000:]}")
        assert '"exaonepath"' in body  # the project's kernel, "Python (exaonepath)", registered by bootstrap
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# end to end: the first-day profile on real slides, two sites, no downstream dataset
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ViT-B/16 at 224 px, 2 arms x 2 steps on CPU, plus features: ~3.5 min on 2 shared cores
def test_first_day_profile_end_to_end_on_real_slides(tmp_path, shared_data):
    """The issue's scenario: copies of the CMU slides under other names in two site folders, the paper recipe
    shortened (configs/first_day.yaml), no downstream dataset, stages 01-07 complete."""
    from exaonepath_core.run import pipeline

    wsi = shared_data / "wsi"
    sources = [wsi / "CMU-1-Small-Region.svs", wsi / "CMU-1-Small-Region.svs",
               wsi / "CMU-1-Small-Region_pyramid_generic.tiff"]
    sites = []
    for site in ("lab_site_a", "lab_site_b"):
        folder = tmp_path / "slides" / site
        folder.mkdir(parents=True)
        for i, src in enumerate(sources):
            os.symlink(src, folder / f"{site}_slide{i}{src.suffix}")
        sites.append(str(folder))
    shutil.rmtree(tmp_path / "results", ignore_errors=True)
    rc = pipeline.main(["--profile", "first_day", "--set", f"data.slide_dirs=[{','.join(sites)}]",
                        "--set", f"results_root={tmp_path / 'results'}"])
    assert rc == 0
    from exaonepath_core.stages.registry import STAGES
    from exaonepath_core.stages.results import ResultsPaths

    paths = ResultsPaths.for_profile("first_day", str(tmp_path / "results"))
    assert [k for k in STAGES if not paths.done_marker(k).is_file()] == []  # stages 01-07 complete
    run = paths.profile_dir
    datasets = pd.read_csv(run / "04_features" / "datasets.csv").set_index("dataset")
    assert datasets.loc["heldout_slides", "status"] == "present"
    assert (datasets.drop(index="heldout_slides")["detail"] == "absent: no root configured").all()
    assert len(pd.read_csv(run / "05_probes" / "probe_results_long.csv")) == 0  # header only
    metrics = pd.read_csv(run / "06_collapse" / "collapse_metrics.csv")
    real = metrics[metrics.cohort == "real"]
    assert set(real.arm) == {"raw", "macenko"}
    assert real.loc[real.metric == "slide_id_probe_accuracy", "value"].notna().all()
    index = (run / "index.html").read_text()
    assert "Not measured in this run" in index
    assert "no root configured in data.downstream_roots): crc100k, mhist, msi_crc, msi_stad, pcam, til" in index
    assert not [p for p in html_index.linked_files(run / "index.html") if not p.exists()]
