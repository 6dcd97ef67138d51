"""The staged runner: skip when done with the same config, --force, --only/--from, failures named with cell and error,
strict inputs under sweeps and inheriting profiles, sharded stages alone, only declared notebook parameters."""
from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from exaonepath_core.config import ConfigError
from exaonepath_core.io.config_file import save_config
from exaonepath_core.run import pipeline
from exaonepath_core.stages import registry
from exaonepath_core.stages.registry import STAGES
from exaonepath_core.stages.results import ResultsPaths, open_stage

PARAMS = 'config_path = ""\nprofile = ""\nforce = False\narm = None\n'
BODY = """
import json, pathlib, yaml
cfg = yaml.safe_load(open(config_path))
out = pathlib.Path(cfg["results_root"]) / profile / "runs.jsonl"
with open(out, "a") as fh:
    fh.write(json.dumps({"stage": STAGE, "arm": arm, "seed": cfg["seed"], "shard": cfg["tiling"]["shard"]}) + "\\n")
if cfg["seed"] == 13 and STAGE == "04":
    raise ValueError("deliberate failure in stage 04")
"""


def _tiny_notebooks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, (name, _) in STAGES.items():
        nb = nbformat.v4.new_notebook()
        p = nbformat.v4.new_code_cell(PARAMS)
        p.metadata["tags"] = ["parameters"]
        nb.cells = [p, nbformat.v4.new_code_cell(f"STAGE = {key!r}\n" + BODY)]
        nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


@pytest.fixture()
def setup(tmp_path):
    nbs = _tiny_notebooks(tmp_path / "notebooks")
    results = tmp_path / "results"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"profile": "tiny", "results_root": str(results), "arms": ["raw", "macenko"]}))
    return nbs, results, cfg


def _runs(results):
    import json

    f = results / "tiny" / "runs.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def test_runs_all_stages_then_skips_then_force(setup):
    nbs, results, cfg = setup
    status = pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    assert list(status.values()) == ["ran"] * 7
    runs = _runs(results)
    # stage 03 runs once per arm, every other stage once
    assert [r["stage"] for r in runs] == ["01", "02", "03", "03", "04", "05", "06", "07"]
    assert [r["arm"] for r in runs if r["stage"] == "03"] == ["raw", "macenko"]
    paths = ResultsPaths(results, "tiny")
    assert all(paths.done_marker(k).is_file() for k in STAGES)
    assert (paths.notebooks_dir / "03_pretrain_dino_macenko.ipynb").is_file()
    assert paths.config_path.is_file()

    status = pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    assert list(status.values()) == ["skipped"] * 7 and len(_runs(results)) == 8

    status = pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False, only=["05"], force=True)
    assert status == {"05": "ran"} and _runs(results)[-1]["stage"] == "05"


def test_config_change_reruns_from_the_affected_stage(setup):
    nbs, _results, cfg = setup
    pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    probes = {"probes.n_boot": 5}
    status = pipeline.run_pipeline(str(cfg), overrides=probes, notebook_dir=nbs, progress=False)
    assert [status[k] for k in STAGES] == ["skipped"] * 4 + ["ran"] * 3
    # speed-only keys re-run nothing; downstream roots re-run stage 04 onwards, not tiling/stores/pretraining
    status = pipeline.run_pipeline(str(cfg), overrides={**probes, "tiling.workers": 1, "pretrain.num_workers": 3},
                                   notebook_dir=nbs, progress=False)
    assert list(status.values()) == ["skipped"] * 7
    status = pipeline.run_pipeline(str(cfg), overrides={**probes, "data.downstream_roots": {"pcam": "/x"}},
                                   notebook_dir=nbs, progress=False)
    assert [status[k] for k in STAGES] == ["skipped"] * 3 + ["ran"] * 4


def test_from_stage_runs_it_and_every_later_one(setup):
    nbs, results, cfg = setup
    pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    before = len(_runs(results))
    status = pipeline.run_pipeline(str(cfg), start_from="06", force=True, notebook_dir=nbs, progress=False)
    assert status == {"06": "ran", "07": "ran"} and [r["stage"] for r in _runs(results)[before:]] == ["06", "07"]


def test_a_stage_whose_upstream_never_ran_in_this_run_folder_is_refused_before_any_work(setup, capsys):
    nbs, results, cfg = setup
    code = pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--only", "05",
                          "--sweep", "probes.n_boot=50,100"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("stage 05_linear_probes needs stage(s) 01_tile_slides, 02_normalize_stains, 03_pretrain_dino, "
            "04_extract_features of run 'tiny__probes.n_boot=50' first") in err
    assert "run the same command (with the same --sweep) with --from 01" in err
    assert not list(results.glob("tiny__*"))  # nothing left behind


def test_failing_notebook_names_stage_cell_and_error(setup, capsys):
    nbs, results, cfg = setup
    code = pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--set", "seed=13"])
    assert code == 1
    err = capsys.readouterr().err
    assert "04_extract_features" in err and "deliberate failure in stage 04" in err and "cell" in err
    paths = ResultsPaths(results, "tiny")
    kept = paths.notebooks_dir / "04_extract_features.ipynb"
    assert kept.is_file() and "deliberate failure" in kept.read_text()
    assert paths.done_marker("03").is_file() and not paths.done_marker("04").exists()
    assert not paths.done_marker("05").exists()


def test_notebook_receives_only_the_parameters_it_declares(setup):
    nbs, results, cfg = setup
    nb = nbformat.read(nbs / "05_linear_probes.ipynb", as_version=4)
    nb.cells[0].source = 'config_path = ""\nprofile = ""\narm = None\n'  # no `force`
    nbformat.write(nb, nbs / "05_linear_probes.ipynb")
    pipeline.run_pipeline(str(cfg), only=["01", "02", "03", "04"], notebook_dir=nbs, progress=False)
    status = pipeline.run_pipeline(str(cfg), only=["05"], force=True, notebook_dir=nbs, progress=False)
    assert status == {"05": "ran"}
    executed = nbformat.read(results / "tiny" / "notebooks" / "05_linear_probes.ipynb", as_version=4)
    injected = [c.source for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "config_path" in injected[0] and "force" not in injected[0]
    nb.cells[0].source = 'profile = ""\n'
    nbformat.write(nb, nbs / "05_linear_probes.ipynb")
    with pytest.raises(ConfigError, match="must declare config_path"):
        pipeline.run_pipeline(str(cfg), only=["05"], force=True, notebook_dir=nbs, progress=False)


def test_sharded_stage_refuses_later_stages(setup, capsys):
    nbs, results, cfg = setup
    with pytest.raises(ConfigError, match=r"tiling\.shard=1/4 .*stage\(s\) 02, 03, 04, 05, 06, 07.*--only 01"):
        pipeline.run_pipeline(str(cfg), overrides={"tiling.shard": "1/4"}, notebook_dir=nbs, progress=False)
    assert not (results / "tiny" / "runs.jsonl").exists()  # refused before any notebook ran
    status = pipeline.run_pipeline(str(cfg), overrides={"tiling.shard": "1/4"}, only=["01"], notebook_dir=nbs,
                                   progress=False)
    assert status == {"01": "ran (shard)"}
    code = pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--set", "normalize.shard=0/2",
                          "--from", "02"])
    assert code == 2 and "normalize.shard=0/2" in capsys.readouterr().err
    status = pipeline.run_pipeline(str(cfg), overrides={"normalize.shard": "0/2"}, only=["01", "02"],
                                   notebook_dir=nbs, progress=False)
    assert status == {"01": "ran", "02": "ran (shard)"}


def test_paper_profile_names_every_missing_path(capsys):
    code = pipeline.main(["--profile", "paper", "--only", "01"])
    err = capsys.readouterr().err
    assert code == 2
    assert "/data/wsi/tcga" in err and "/data/downstream/pcam" in err and "msi_stad" in err


def test_sweep_runs_each_value_into_its_own_folder(setup):
    nbs, results, cfg = setup
    code = pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--only", "01", "--only", "02",
                          "--only", "03", "--sweep", "arms=raw,stain_augmentation"])
    assert code == 0
    for arm in ("raw", "stain_augmentation"):
        folder = results / f"tiny__arms={arm}"
        assert (folder / "notebooks" / f"03_pretrain_dino_{arm}.ipynb").is_file()
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        # the folder name is run_name; the profile (and with it nothing name-dependent) is unchanged
        assert (saved["profile"], saved["run_name"], saved["arms"]) == ("tiny", f"tiny__arms={arm}", [arm])


@pytest.mark.parametrize("how", ["sweep", "lab profile"])
def test_strict_inputs_hold_under_a_sweep_and_an_inheriting_profile(tmp_path, capsys, how):
    nbs = _tiny_notebooks(tmp_path / "notebooks")
    args = ["--notebook-dir", str(nbs), "--only", "01", "--set", f"results_root={tmp_path / 'results'}"]
    if how == "sweep":
        args += ["--profile", "paper", "--sweep", "arms=raw,macenko", "--set", "normalize.stores=[raw, macenko]"]
    else:
        lab = tmp_path / "mylab.yaml"
        lab.write_text(yaml.safe_dump({"inherits": str(pipeline.REPO_ROOT / "configs" / "paper.yaml"),
                                       "profile": "mylab"}))
        args += ["--profile", str(lab)]
    code = pipeline.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "strict_inputs" in err and "/data/wsi/tcga" in err and "/data/downstream/msi_stad" in err
    assert not list((tmp_path / "results").rglob("runs.jsonl"))  # no notebook ran


def test_notebook_setup_requires_finished_upstream_stages(setup):
    _nbs, results, cfg = setup
    with pytest.raises(ConfigError, match=r"run_all\.sh --profile .*tiny\.yaml --only 01"):
        open_stage("04", "", str(cfg))
    loaded = pipeline.load_config(str(cfg))
    paths = ResultsPaths.for_profile(loaded.results_name, loaded.results_root)
    save_config(loaded, paths.config_path)
    paths.mark_done("01", "h")
    with pytest.raises(RuntimeError, match=r"02_normalize_stains, 03_pretrain_dino of run 'tiny'.*--from 02"):
        open_stage("04", "", str(cfg))
    got, got_paths = open_stage("02", str(paths.config_path))
    assert got.to_dict() == loaded.to_dict() and got_paths.profile_dir == results / "tiny"
    # without pretraining arms (untrained / extra backbones only) stages 02-03 have nothing to do
    no_arms = pipeline.load_config(str(cfg), {"arms": []})
    save_config(no_arms, paths.config_path)
    got, _ = open_stage("04", str(paths.config_path))
    assert got.arms == []


def test_kernel_runs_over_private_unix_sockets_without_tcp_warning(tmp_path, capfd):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('out = ""', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from ipykernel.kernelapp import IPKernelApp\n"
            "app = IPKernelApp.instance()\n"
            "open(out, 'w').write(app.transport + ' ' + app.ip)\n"
        ),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, tmp_path / "in.ipynb")
    record = tmp_path / "transport.txt"
    pipeline.run_notebook(tmp_path / "in.ipynb", tmp_path / "out.ipynb", {"out": str(record)}, "xx", progress=False)
    transport, ip = record.read_text().split(" ", 1)
    assert transport == "ipc" and "exaonepath-kernel-" in ip
    assert not Path(ip).parent.exists()  # the socket folder is removed with the kernel
    assert "without encryption" not in capfd.readouterr().err


def test_a_config_change_moves_the_stale_outputs_aside_instead_of_resuming_from_them(setup, capsys):
    nbs, results, cfg = setup
    pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    paths = ResultsPaths(results, "tiny")
    for stage in ("01", "02", "04"):  # stand-ins for a ledger, a patch store, feature folders
        (paths.stage_dir(stage) / "made_before.txt").write_text("old config")
    status = pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False, overrides={"normalize.beta": 0.3})
    assert status["01"] == "skipped" and status["02"] == "ran"
    out = capsys.readouterr().out
    assert "02_normalize_stains: its outputs were built from another config; moved aside" in out
    assert (paths.stage_dir("01") / "made_before.txt").is_file()  # upstream of the change: kept in place
    for stage in ("02", "04"):  # the changed stage and everything below it start clean, the old outputs kept
        folder = paths.stage_dir(stage, create=False)
        assert not (folder / "made_before.txt").exists()
        moved = list(folder.parent.glob(f"{folder.name}.superseded-*"))
        assert len(moved) == 1 and (moved[0] / "made_before.txt").read_text() == "old config"
    # an interrupted stage (inputs recorded, no done-marker) with the same config resumes in place
    (paths.stage_dir("05") / "partial.txt").write_text("same config")
    paths.clear_done("05")
    moved_before = set(results.glob("tiny/*.superseded-*"))
    pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False, overrides={"normalize.beta": 0.3})
    assert (paths.stage_dir("05") / "partial.txt").is_file()
    assert set(results.glob("tiny/*.superseded-*")) == moved_before


def test_unwritable_results_root_and_ctrl_c_end_with_a_message(setup, capsys, monkeypatch):
    nbs, results, cfg = setup

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(results / "tiny"))

    monkeypatch.setattr(pipeline, "save_config", refuse)
    assert pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {results / 'tiny'}: Permission denied" in err and "results_root" in err
    assert "Traceback" not in err
    monkeypatch.undo()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_notebook", interrupt)
    assert pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_strict_inputs_check_dataset_layouts_before_any_stage(tmp_path):
    from exaonepath_core.config import load_config

    (tmp_path / "slides").mkdir()
    crc = tmp_path / "crc" / "NCT-CRC-HE-100K"
    for name in ("ADI", "BACK"):  # seven of the nine class folders missing
        (crc / name).mkdir(parents=True)
    cfg = load_config("paper", {"data.slide_dirs": [str(tmp_path / "slides")],
                                "data.downstream_roots": {"crc100k": str(tmp_path / "crc")}})
    with pytest.raises(ConfigError, match=r"not readable as laid out[\s\S]*data.downstream_roots.crc100k: unreadable"):
        pipeline.check_paper_inputs(cfg)
    pipeline.check_paper_inputs(load_config("paper", {"data.slide_dirs": [str(tmp_path / "slides")],
                                                      "data.downstream_roots": {}}))  # nothing to check: passes


def test_shards_share_the_stage_folder_and_the_run_without_a_shard_completes_it(setup, capsys):
    """The SLURM-array workflow: shards write into one stage folder, none marks it done, none moves another's
    outputs aside, each reads its own config; the run without a shard then finishes the stage in place."""
    nbs, results, cfg = setup
    paths = ResultsPaths(results, "tiny")
    for i in range(2):
        status = pipeline.run_pipeline(str(cfg), overrides={"tiling.shard": f"{i}/2"}, only=["01"],
                                       notebook_dir=nbs, progress=False)
        assert status == {"01": "ran (shard)"}
        (paths.stage_dir("01") / f"slides_of_shard_{i}.txt").write_text("tiled")
    assert not paths.done_marker("01").exists()
    assert not list(results.glob("tiny/*.superseded-*"))  # the shards did not take each other for another config
    assert [r["shard"] for r in _runs(results)] == ["0/2", "1/2"]  # each notebook read its own shard's config
    for i in range(2):
        assert yaml.safe_load((paths.profile_dir / f"config.tiling-shard{i}of2.yaml").read_text())["tiling"][
            "shard"] == f"{i}/2"
        assert (paths.notebooks_dir / f"01_tile_slides.tiling-shard{i}of2.ipynb").is_file()
    assert "marked done by a run without the shard" in capsys.readouterr().out
    status = pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    assert status["01"] == "ran" and paths.done_marker("01").is_file()
    assert sorted(p.name for p in paths.stage_dir("01").glob("slides_of_shard_*")) == [
        "slides_of_shard_0.txt", "slides_of_shard_1.txt"]  # completed in place, not moved aside
    assert not list(results.glob("tiny/*.superseded-*"))


def test_a_second_runner_on_the_same_folder_is_refused_but_shards_run_side_by_side(setup, capsys):
    nbs, results, cfg = setup
    folder = results / "tiny"
    with pipeline.hold_run_folder(folder) as alone:
        assert alone
        assert pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs)]) == 4
        err = capsys.readouterr().err
        assert f"another ./run_all.sh is working on {folder} (pid {os.getpid()}" in err
        assert "--set run_name=" in err and "Traceback" not in err
        assert not _runs(results)  # refused before any stage
        with pytest.raises(pipeline.RunBusy), pipeline.hold_run_folder(folder, "tiling-shard0of2"):
            pass
    assert (folder / ".run_all.lock").read_text() == ""  # the holder's line goes with the lock
    with pipeline.hold_run_folder(folder, "tiling-shard0of2") as alone0, \
            pipeline.hold_run_folder(folder, "tiling-shard1of2") as alone1:
        assert not alone0 and not alone1
        with pytest.raises(pipeline.RunBusy, match="pid"), pipeline.hold_run_folder(folder, "tiling-shard1of2"):
            pass
        with pytest.raises(pipeline.RunBusy, match="working on"), pipeline.hold_run_folder(folder):
            pass
    with pipeline.hold_run_folder(folder) as alone:  # every lock released
        assert alone


def test_temp_files_of_a_killed_run_are_removed_by_the_next_run(setup, capsys):
    nbs, results, cfg = setup
    paths = ResultsPaths(results, "tiny")
    stage = paths.stage_dir("02")
    old = time.time() - 2 * pipeline.STALE_TEMP_AGE_S
    stale_file = stage / ".shard-00003.npy.k2j3h1ab.tmp"
    stale_file.write_bytes(b"x" * 4096)
    stale_dir = stage / ".features.ab12cd_9.tmp"
    (stale_dir / "part").mkdir(parents=True)
    (stale_dir / "part" / "rows.npy").write_bytes(b"y" * 1024)
    trash = stage / ".features.cd34ef56.old"
    trash.mkdir()
    fresh = stage / ".ledger.csv.zz99yy88.tmp"  # a write going on (e.g. a notebook opened by hand)
    fresh.write_text("being written")
    superseded = paths.profile_dir / "04_features.superseded-20260101-000000-abc"
    superseded.mkdir()
    kept_in_superseded = superseded / ".x.tmp"
    kept_in_superseded.write_text("left as moved aside")
    keep = [stage / ".inputs.json", stage / "ledger.csv", stage / ".notes.old", stage / ".train.lock"]
    for p in keep:
        p.write_text("{}")
    for p in [stale_file, stale_dir, stale_dir / "part", stale_dir / "part" / "rows.npy", trash, *keep,
              kept_in_superseded]:
        os.utime(p, (old, old))
    expected_bytes = sum(p.lstat().st_size for p in [stale_file, stale_dir, stale_dir / "part",
                                                      stale_dir / "part" / "rows.npy", trash])
    assert pipeline.remove_stale_temp_files(paths.profile_dir) == (3, expected_bytes)
    assert not stale_file.exists() and not stale_dir.exists() and not trash.exists()
    assert fresh.is_file() and kept_in_superseded.is_file() and all(p.is_file() for p in keep)
    # the runner does it on start when it holds the folder alone, and says so
    stale_file.write_bytes(b"x" * 4096)
    os.utime(stale_file, (old, old))
    pipeline.run_pipeline(str(cfg), only=["01"], notebook_dir=nbs, progress=False)
    assert not stale_file.exists() and fresh.is_file()
    assert "removed 1 temp file(s)/folder(s)" in capsys.readouterr().out


def test_failures_counted_in_a_stage_table_are_printed_and_kept_in_its_marker(setup, capsys):
    nbs, results, cfg = setup
    nb = nbformat.read(nbs / "01_tile_slides.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import pandas as pd\n"
        "d = pathlib.Path(cfg['results_root']) / profile / '01_tiles'\n"
        "d.mkdir(parents=True, exist_ok=True)\n"
        "pd.DataFrame([{'source': 'lab', 'split': 'pretrain', 'slides': 4, 'ok': 2, 'failed': 2, 'tiles': 80,\n"
        "               'zero_tile_slides': 1},\n"
        "              {'source': 'all', 'split': 'all', 'slides': 4, 'ok': 2, 'failed': 2, 'tiles': 80,\n"
        "               'zero_tile_slides': 1}]).to_csv(d / 'tiling_summary.csv', index=False)\n"))
    nbformat.write(nb, nbs / "01_tile_slides.ipynb")
    pipeline.run_pipeline(str(cfg), only=["01"], notebook_dir=nbs, progress=False)
    out = capsys.readouterr().out
    assert "[run_all] WARNING 01_tile_slides: 2 of 4 slide(s) failed to tile" in out
    assert "[run_all] WARNING 01_tile_slides: 1 slide(s) gave no tile" in out
    assert "finished in" in out and "with 2 warning(s) (above)" in out
    assert "[run_all] 2 warning(s) in this run:\n  01_tile_slides: 2 of 4 slide(s) failed" in out
    paths = ResultsPaths(results, "tiny")
    assert len(paths.done_info("01")["warnings"]) == 2
    pipeline.run_pipeline(str(cfg), only=["01"], notebook_dir=nbs, progress=False)
    assert "skipped; its run had 2 warning(s): 2 of 4 slide(s) failed" in capsys.readouterr().out


def test_stage_warnings_read_the_normalize_and_dataset_tables(tmp_path):
    from exaonepath_core.config import load_config

    cfg = load_config("smoke", {"data.downstream_roots": {"pcam_subset": "/data/pcam", "crc100k": "/data/crc"}})
    (tmp_path / "normalize_summary.csv").write_text(
        "store,slides_ok,slides_failed,patches,fallback_passed_through,fallback_fraction,failed_reasons\n"
        "raw,3,0,300,0,0.0,\nmacenko,2,1,200,4,0.02,SlideReadError: Premature end of JPEG file\n")
    assert pipeline.stage_warnings("02", tmp_path, cfg) == [(
        f"store macenko: 1 slide(s) could not be read and are not in it (SlideReadError: Premature end of JPEG "
        f"file; see {tmp_path / 'normalize_summary.csv'})")]
    (tmp_path / "datasets.csv").write_text(
        "dataset,status,detail,n,splits\npcam_subset,present,present,300,train=100\n"
        "crc100k,absent,absent: DatasetLayoutError: no images for class(es) BACK,0,\n")
    assert pipeline.stage_warnings("04", tmp_path, cfg) == [(
        "dataset crc100k (data.downstream_roots: /data/crc) was not loaded: absent: DatasetLayoutError: no images "
        "for class(es) BACK")]
    assert pipeline.stage_warnings("05", tmp_path, cfg) == []


def test_sweep_values_may_be_lists_and_a_broken_list_is_a_config_error(setup, capsys):
    nbs, results, cfg = setup
    code = pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--only", "01",
                          "--sweep", "probes.seeds=[0],[0,1]"])
    assert code == 0
    for seeds in ([0], [0, 1]):
        folder = results / f"tiny__probes.seeds={str(seeds).replace(' ', '')}"
        assert yaml.safe_load((folder / "config.yaml").read_text())["probes"]["seeds"] == seeds
    capsys.readouterr()
    assert pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--sweep", "probes.seeds=[0,[1"]) == 2
    err = capsys.readouterr().err
    assert "not a comma-separated YAML list" in err and "Traceback" not in err


def test_outputs_under_a_corrupt_marker_are_moved_aside_and_unmarked_ones_kept(setup):
    nbs, results, cfg = setup
    paths = ResultsPaths(results, "tiny")
    pipeline.run_pipeline(str(cfg), only=["01"], notebook_dir=nbs, progress=False)
    chash = registry.stage_config_hash(pipeline.load_config(str(cfg)), "01")
    assert paths.built_from("01") == chash
    (paths.stage_dir("01") / "made_before.txt").write_text("unknown config")
    paths.inputs_marker("01").write_text('{"config_hash": ')  # cut off mid-write by a full disk, say
    paths.done_marker("01").unlink()
    assert paths.built_from("01") == "unreadable-marker"
    moved = paths.supersede_outputs("01", chash)
    assert moved is not None and moved.name.endswith("-unreadable") and (moved / "made_before.txt").is_file()
    (paths.stage_dir("01") / "by_hand.txt").write_text("no marker at all")
    assert paths.built_from("01") is None and paths.supersede_outputs("01", chash) is None


def _prepare_after_barrier(root: str, barrier, results) -> None:
    paths = ResultsPaths(Path(root), "tiny")
    barrier.wait()
    try:
        pipeline.prepare_stage_folder(paths, "01", "new-config-hash")
        (paths.stage_dir("01", create=False) / f"work_{os.getpid()}.txt").write_text("shard output")
        results.put("ok")
    except (OSError, ValueError) as exc:  # reported to the parent, which fails the test with it
        results.put(f"{type(exc).__name__}: {exc}")


def test_shards_starting_together_move_the_old_outputs_aside_once(tmp_path):
    """Without the setup lock, one shard moved the other's fresh folder aside (or crashed) in most trials."""
    import multiprocessing as mp

    paths = ResultsPaths(tmp_path, "tiny")
    paths.mark_inputs("01", "old-config-hash")
    (paths.stage_dir("01") / "old_output.txt").write_text("old config")
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_prepare_after_barrier, args=(str(tmp_path), barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert outcomes == ["ok"] * 6, outcomes
    moved = list(paths.profile_dir.glob("01_tiles.superseded-*"))
    assert len(moved) == 1 and [p.name for p in moved[0].iterdir() if p.suffix == ".txt"] == ["old_output.txt"]
    assert len(list(paths.stage_dir("01").glob("work_*.txt"))) == 6  # every shard's output in the one folder
    assert paths.built_from("01") == "new-config-hash"


# The smoke and paper profiles' stage hashes as of the stage-module split (issue 18): a change here reruns, and
# moves aside, every existing run folder's stages, so it must be a deliberate config change, never a refactor.
PINNED_STAGE_HASHES = {
    "smoke": {"01": "0ee28c1a09f0e1af", "02": "aa0977d39203651d", "03": "2fd1417c65455a4e",
              "04": "235a8618cb33c8fc", "05": "9221e82c8c9c349d", "06": "be7c48c9cd14c593",
              "07": "be7c48c9cd14c593"},
    "paper": {"01": "f0b4b383cc18a786", "02": "a465c82b9929af59", "03": "bb72a0edfcf603e2",
              "04": "b40b40800a03ee4b", "05": "99715ae8ba9b5d26", "06": "ead86be61bdb443f",
              "07": "ead86be61bdb443f"},
}


@pytest.mark.parametrize("profile", sorted(PINNED_STAGE_HASHES))
def test_stage_hashes_are_those_of_existing_run_folders(profile, monkeypatch):
    # the pinned values are those of the profiles' own defaults (smoke's dataset roots expand this variable)
    monkeypatch.delenv("EXAONEPATH_TEST_DATA", raising=False)
    cfg = pipeline.load_config(profile)
    assert {key: registry.stage_config_hash(cfg, key) for key in STAGES} == PINNED_STAGE_HASHES[profile]


def test_the_registry_lists_every_stage_module_once_in_order():
    from exaonepath_core.stages import s03_pretrain

    keys = [m.SPEC.key for m in registry.MODULES]
    assert keys == sorted(keys) == list(STAGES) and len(set(keys)) == len(keys)
    assert all(registry.module(m.SPEC.notebook) is m and callable(m.run) for m in registry.MODULES)
    # stage 03 records the patch store's config with the runner's stage-02 hash
    cfg = pipeline.load_config("smoke", {"normalize.batch_size": 7})
    assert s03_pretrain.patches_config_hash(cfg) == registry.stage_config_hash(cfg, "02")
    assert s03_pretrain.patches_config_hash(cfg) != registry.stage_config_hash(pipeline.load_config("smoke"), "02")
