"""The stored notebooks: one per stage, a tagged parameters cell, no outputs, no definitions, in sync with the builder."""
from __future__ import annotations

import ast
import json

import pytest
from conftest import REPO_ROOT

from exaonepath_core.paths import STAGES

NOTEBOOKS = [REPO_ROOT / "notebooks" / f"{name}.ipynb" for name, _ in STAGES.values()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_a_clean_parameterised_stage(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    params = ast.parse("".join(tagged[0]["source"]))
    names = {t.id for node in params.body if isinstance(node, ast.Assign) for t in node.targets}
    assert {"config_path", "profile", "force"} <= names
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
