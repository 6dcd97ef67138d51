"""environment.yml (conda users) and pyproject.toml (pip) pin the same versions."""
from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO_ROOT


def _pyproject() -> dict:
    # tomllib is standard library from Python 3.11; the package also supports 3.10, where these checks skip.
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs tomllib (Python >= 3.11)")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _pyproject_pins() -> dict[str, str]:
    data = _pyproject()
    deps = list(data["project"]["dependencies"]) + list(data["project"]["optional-dependencies"]["dev"])
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^;\s]+)", dep.strip())
        assert m, f"pyproject dependency not pinned with ==: {dep!r}"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def _environment_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for dep in pip_block:
        if dep.startswith("-e"):
            continue
        name, version = dep.split("==")
        pins[name.lower()] = version
    return pins


def test_every_dependency_is_pinned_and_torch_pair_is_the_tested_one():
    pins = _pyproject_pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert len(pins) >= 20


def test_environment_yml_matches_pyproject():
    assert _environment_pins() == _pyproject_pins()


def test_environment_python_version_is_supported():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    major, minor = map(int, py.split("=")[1].split(".")[:2])
    requires = _pyproject()["project"]["requires-python"]
    assert requires == ">=3.10" and (major, minor) >= (3, 10)
