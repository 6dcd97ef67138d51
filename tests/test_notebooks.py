"""The stored notebooks: one per stage, a tagged parameters cell whose every parameter is used, no outputs, no
definitions, in sync with the builder; run by papermill with only `profile`, a notebook finds (or names) its config."""
from __future__ import annotations

import ast
import json

import pytest
from conftest import REPO_ROOT

from exaonepath_core.stages.registry import SPECS, STAGES

NOTEBOOKS = [REPO_ROOT / "notebooks" / f"{name}.ipynb" for name, _ in STAGES.values()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_clean_parameterised_stage(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    params = ast.parse("".join(tagged[0]["source"]))
    names = {t.id for node in params.body if isinstance(node, ast.Assign) for t in node.targets}
    assert {"config_path", "profile"} <= names
    # papermill must parse the same names (it gives up on some comments, e.g. with a quote), else the runner
    # would pass it nothing
    from exaonepath_core.run.pipeline import notebook_parameters

    assert notebook_parameters(path) == names
    # every parameter does something: read by a later cell (a parameter nothing reads misleads the user)
    read = {n.id for c in code if c is not tagged[0] for n in ast.walk(ast.parse("".join(c["source"])))
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert names <= read, f"parameters never used: {sorted(names - read)}"
    stage = path.stem[:2]
    assert names == SPECS[stage].parameters  # `force` where the stage reuses finished work, `arm` where per arm
    assert f"open_stage({stage!r}, config_path, profile)" in "".join(code[1]["source"])
    for cell in code:
        assert not cell.get("outputs") and cell.get("execution_count") is None, "stored without outputs"
        tree = ast.parse("".join(cell["source"]))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, "no function or class definitions inside notebooks (they belong in exaonepath_core)"


def test_stored_notebooks_match_the_builder(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", REPO_ROOT / "tools" / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    for built in mod.build():
        stored = REPO_ROOT / "notebooks" / built.name
        assert json.loads(built.read_text()) == json.loads(stored.read_text()), f"{built.name}: rebuild notebooks"


def test_papermill_with_only_a_profile_names_the_command_to_run_first(tmp_path):
    import papermill as pm
    import yaml
    from papermill.exceptions import PapermillExecutionError

    profile = tmp_path / "fresh.yaml"
    profile.write_text(yaml.safe_dump({"inherits": str(REPO_ROOT / "configs" / "ci.yaml"), "profile": "fresh",
                                       "results_root": str(tmp_path / "results")}))
    with pytest.raises(PapermillExecutionError) as info:
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / "05_linear_probes.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"profile": str(profile)}, kernel_name="python3", cwd=str(tmp_path),
                            progress_bar=False)
    assert info.value.ename == "ConfigError"
    assert f"./run_all.sh --profile {profile} --only 01" in info.value.evalue
    assert str(tmp_path / "results" / "fresh" / "config.yaml") in info.value.evalue
