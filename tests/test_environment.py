"""Dependency ranges (pyproject.toml), the conda file that follows them, the hashed lock, and the range check."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT
from packaging.requirements import Requirement

from exaonepath_core.io import env_check

sys.path.insert(0, str(REPO_ROOT / "tools"))
import requirement_sets  # tools/ is not a package

LOCK = REPO_ROOT / "requirements.lock"
# the torch build CI tests and the lock installs (the lowest target tests the range's lower bound)
LOCKED_TORCH = ("2.14.1", "0.29.1")


def _pyproject() -> dict:
    # tomllib is standard library from Python 3.11, the oldest the package supports (tifffile needs it).
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs tomllib (Python >= 3.11)")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _declared() -> list[str]:
    """Core dependencies, then the extras the lock and environment.yml include."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    return list(project["dependencies"]) + [d for e in requirement_sets.EXTRAS_IN_LOCK for d in extras[e]]


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", line)
        if m:
            pins[requirement_sets._normalize(m.group(1))] = m.group(2)
    return pins


def test_every_dependency_states_a_tested_lower_bound_and_no_exact_pin():
    deps = _declared()
    assert len(deps) >= 25
    for dep in deps:
        req = Requirement(dep)
        assert any(s.operator == ">=" for s in req.specifier), f"{dep!r}: no '>=' lower bound"
        assert not any(s.operator in ("==", "===", "~=") for s in req.specifier), \
            f"{dep!r}: exact pins belong in requirements.lock, pyproject states ranges"
    lowest = requirement_sets.lowest_pins(REPO_ROOT / "pyproject.toml")
    assert "torch==2.14.1" in lowest and "numpy==2.0.0" in lowest and len(lowest) == len(deps)


def test_environment_yml_follows_pyproject():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert [d for d in pip_block if not d.startswith("-e")] == _declared()


def test_environment_python_version_is_supported():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    major, minor = map(int, py.split("=")[1].split(".")[:2])
    requires = _pyproject()["project"]["requires-python"]
    assert requires == ">=3.11" and (major, minor) >= (3, 11)


def test_lock_pins_every_declared_dependency_inside_its_range_with_hashes():
    text = LOCK.read_text()
    pins = _lock_pins()
    entries = [line for line in text.splitlines() if line and not line[0].isspace() and not line.startswith("#")]
    assert len(entries) == len(pins) > 100, "every lock entry is `name==version \\` followed by hashes"
    assert text.count("--hash=sha256:") >= len(pins)
    for dep in _declared():
        req = Requirement(dep)
        name = requirement_sets._normalize(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
    assert (pins["torch"], pins["torchvision"]) == LOCKED_TORCH
    assert "setuptools" in pins  # --require-hashes installs need the build backend in the lock too


def test_lock_without_torch_drops_the_cuda_stack_only(tmp_path):
    kept, dropped = requirement_sets.lock_without_torch(LOCK)
    assert {"torch", "torchvision", "triton"} <= set(dropped)
    assert all(requirement_sets.TORCH_STACK.match(name) for name in dropped)
    kept_text = "\n".join(kept)
    out = tmp_path / "no-torch.txt"
    out.write_text(kept_text + "\n")
    kept_pins = {requirement_sets._normalize(m.group(1))
                 for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", kept_text, re.MULTILINE)}
    assert kept_pins == set(_lock_pins()) - set(dropped)
    assert "numpy" in kept_pins and "timm" in kept_pins
    # every kept pin keeps its hashes: a --require-hashes install of the filtered file stays valid
    assert kept_text.count("--hash=sha256:") >= len(kept_pins)
    no_torch_lock = tmp_path / "bad.lock"
    no_torch_lock.write_text("numpy==2.4.6 \\\n    --hash=sha256:00\n")
    with pytest.raises(ValueError, match="no torch entry"):
        requirement_sets.lock_without_torch(no_torch_lock)


def test_lowest_pins_refuse_a_dependency_without_lower_bound(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["numpy>=2.0", "pandas"]\n')
    with pytest.raises(ValueError, match="'pandas' has no '>=' lower bound"):
        requirement_sets.lowest_pins(pyproject)


def test_env_check_passes_inside_the_ranges_and_exits_2_naming_what_is_outside(tmp_path):
    import numpy

    inside = tmp_path / "inside.toml"
    inside.write_text('[project]\nname = "x"\ndependencies = ["numpy>=1.0", "pyyaml>=5.1"]\n'
                      '[project.optional-dependencies]\ntensorboard = ["surely-not-installed-pkg>=1"]\n')
    assert env_check.main(["--pyproject", str(inside)]) == 0  # a missing optional extra is only a note
    outside = tmp_path / "outside.toml"
    outside.write_text('[project]\nname = "x"\n'
                       'dependencies = ["numpy>=99", "pyyaml>=5.1", "surely-not-installed-pkg>=1"]\n')
    proc = subprocess.run([sys.executable, "-m", "exaonepath_core.io.env_check", "--pyproject", str(outside)],
                          check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == env_check.EXIT_OUTSIDE_RANGE, proc.stdout + proc.stderr
    assert f"numpy {numpy.__version__} (tested >=99)" in proc.stderr
    assert "surely-not-installed-pkg (missing)" in proc.stderr
    assert re.search(r"numpy +installed \S+ +tested >=99 +OUTSIDE the tested range", proc.stdout)


def test_version_finding_compares_the_public_version_of_a_local_build():
    cuda_build = env_check.VersionFinding("torch", ">=2.13.0", "2.14.1+cu128", None)
    assert cuda_build.in_range and not cuda_build.is_problem
    assert env_check.VersionFinding("torch", ">=2.13.0", "2.8.0+cu126", None).is_problem
    assert not env_check.VersionFinding("tensorboard", ">=2.21", None, "tensorboard").is_problem
    assert env_check.VersionFinding("tensorboard", ">=2.21", "2.10.0", "tensorboard").is_problem


def test_installed_package_metadata_states_the_ranges():
    declared = {requirement_sets._normalize(Requirement(d).name) for d in _pyproject()["project"]["dependencies"]}
    findings = env_check.check_versions(env_check.declared_requirements())
    core = {requirement_sets._normalize(f.name) for f in findings if f.extra is None}
    assert core == declared, "reinstall the package (pip install --no-deps -e .) after changing pyproject.toml"


def test_cuda_build_line_names_the_torch_build():
    import torch

    line = env_check.cuda_build_line()
    assert torch.__version__ in line
    if torch.version.cuda is not None:
        assert f"cuda={torch.version.cuda}" in line and "driver=" in line and "nccl=" in line


def _bootstrap(tmp_path, **env) -> subprocess.CompletedProcess:
    """Source tools/bootstrap_venv.sh as run_tests.sh does, with the given EXAONEPATH_* settings."""
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "-c", f"source {REPO_ROOT / 'tools' / 'bootstrap_venv.sh'}"], env=full_env,
                          check=False, capture_output=True, text=True, timeout=300)


def test_bootstrap_refuses_an_unknown_install_mode_and_a_venv_of_the_other_kind(tmp_path):
    proc = _bootstrap(tmp_path, EXAONEPATH_INSTALL="newest", EXAONEPATH_VENV=str(tmp_path / "v"))
    assert proc.returncode == 2 and "EXAONEPATH_INSTALL must be 'lock' or 'lowest', got 'newest'" in proc.stderr
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "plain")], check=True, timeout=300)
    proc = _bootstrap(tmp_path, EXAONEPATH_SYSTEM_SITE_PACKAGES="1", EXAONEPATH_VENV=str(tmp_path / "plain"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{tmp_path / 'plain'} exists without --system-site-packages" in proc.stderr
