"""The staged runner: skip when done with the same config, --force, --only/--from, failures named with cell and error."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from exaonepath_core import pipeline
from exaonepath_core.paths import STAGES, ResultsPaths

PARAMS = 'config_path = ""\nprofile = ""\nforce = False\narm = None\n'
BODY = """
import json, pathlib, yaml
cfg = yaml.safe_load(open(config_path))
out = pathlib.Path(cfg["results_root"]) / profile / "runs.jsonl"
with open(out, "a") as fh:
    fh.write(json.dumps({"stage": STAGE, "arm": arm, "seed": cfg["seed"]}) + "\\n")
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
    status = pipeline.run_pipeline(str(cfg), overrides={"probes.n_boot": 5}, notebook_dir=nbs, progress=False)
    assert [status[k] for k in STAGES] == ["skipped"] * 4 + ["ran"] * 3


def test_from_stage_runs_it_and_every_later_one(setup):
    nbs, _results, cfg = setup
    pipeline.run_pipeline(str(cfg), notebook_dir=nbs, progress=False)
    status = pipeline.run_pipeline(str(cfg), start_from="06", force=True, notebook_dir=nbs, progress=False)
    assert status == {"06": "ran", "07": "ran"}


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


def test_paper_profile_names_every_missing_path(capsys):
    code = pipeline.main(["--profile", "paper", "--only", "01"])
    err = capsys.readouterr().err
    assert code == 2
    assert "/data/wsi/tcga" in err and "/data/downstream/pcam" in err and "msi_stad" in err


def test_sweep_runs_each_value_into_its_own_folder(setup):
    nbs, results, cfg = setup
    code = pipeline.main(["--profile", str(cfg), "--notebook-dir", str(nbs), "--only", "03",
                          "--sweep", "arms=raw,stain_augmentation"])
    assert code == 0
    for arm in ("raw", "stain_augmentation"):
        folder = results / f"tiny__arms={arm}"
        assert (folder / "notebooks" / f"03_pretrain_dino_{arm}.ipynb").is_file()
