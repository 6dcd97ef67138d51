"""Dependency ranges (pyproject.toml), the conda file that follows them, the hashed lock, and the range check."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def _venv_site(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    return Path(out.strip())


def _fake_dist(site_dir: Path, name: str, version: str, module_source: str | None = None) -> None:
    """A minimal installed distribution: its dist-info, as pip leaves it, and a module when given."""
    if module_source is not None:
        (site_dir / f"{name}.py").write_text(module_source)
    info = site_dir / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_a_venv_made_from_a_venv_reaches_the_parents_site_packages_through_the_pth(tmp_path):
    # `venv --system-site-packages` from inside a venv sees only the BASE interpreter's site: a module installed
    # in the parent venv (where a cluster's torch would be) is invisible until the bootstrap writes the .pth
    parent, child = tmp_path / "parent", tmp_path / "child"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(parent)], check=True, timeout=300)
    parent_py = parent / "bin" / "python"
    _fake_dist(_venv_site(parent_py), "triton", "9.9.1", "WHERE = 'parent'\n")
    subprocess.run([str(parent_py), "-m", "venv", "--without-pip", "--system-site-packages", str(child)],
                   check=True, timeout=300)
    child_py, child_site = child / "bin" / "python", _venv_site(child / "bin" / "python")
    probe = [str(child_py), "-c", "import triton; print(triton.WHERE)"]
    assert subprocess.run(probe, check=False, capture_output=True, timeout=300).returncode != 0
    tool = str(REPO_ROOT / "tools" / "requirement_sets.py")
    said = subprocess.run([str(parent_py), tool, "parent-site", str(child_site)], check=True, capture_output=True,
                          text=True, timeout=300).stdout
    assert f"{parent} is a venv" in said and (child_site / requirement_sets.PARENT_SITE_PTH).is_file()
    assert subprocess.run(probe, check=True, capture_output=True, text=True, timeout=300).stdout.strip() == "parent"
    # the child's own copy wins over the parent's (the lock's packages over the environment's)
    _fake_dist(child_site, "triton", "9.9.2", "WHERE = 'child'\n")
    assert subprocess.run(probe, check=True, capture_output=True, text=True, timeout=300).stdout.strip() == "child"
    # a second call with nothing new says nothing; a base interpreter as PYTHON removes the file
    again = subprocess.run([str(parent_py), tool, "parent-site", str(child_site)], check=True, capture_output=True,
                           text=True, timeout=300).stdout
    assert again == ""
    base = str(Path(sys.base_prefix) / "bin" / "python3")
    subprocess.run([base, tool, "parent-site", str(child_site)], check=True, timeout=300)
    assert not (child_site / requirement_sets.PARENT_SITE_PTH).exists()


def test_torch_stack_lists_the_first_visible_copy_and_exits_3_without_torch(tmp_path):
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=300)
    site_dir = _venv_site(env / "bin" / "python")
    _fake_dist(site_dir, "triton", "9.9.1")
    tool = [str(env / "bin" / "python"), str(REPO_ROOT / "tools" / "requirement_sets.py"), "torch-stack"]
    proc = subprocess.run(tool, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == requirement_sets.EXIT_NO_TORCH, proc.stderr
    assert proc.stdout.strip() == f"triton==9.9.1 {site_dir.resolve()}"


def test_bootstrap_keep_your_torch_refuses_an_environment_without_torch(tmp_path):
    # a base interpreter's venv with no torch in its (or its base's) site: the keep-your-torch path stops
    # before installing anything, naming what to do
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(bare)], check=True,
                   timeout=300)
    if subprocess.run([str(bare / "bin" / "python"), "-c", "import torch"], check=False,
                      capture_output=True, timeout=300).returncode == 0:
        pytest.skip("the base interpreter has a torch of its own")
    # the venv made beforehand as the bootstrap makes it, less pip (ensurepip alone takes a minute under load)
    subprocess.run([str(bare / "bin" / "python"), "-m", "venv", "--without-pip", "--system-site-packages",
                    str(tmp_path / "kyt")], check=True, timeout=300)
    proc = _bootstrap(tmp_path, PYTHON=str(bare / "bin" / "python"), EXAONEPATH_SYSTEM_SITE_PACKAGES="1",
                      EXAONEPATH_VENV=str(tmp_path / "kyt"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "keeps the environment's own torch, but" in proc.stderr and "sees none" in proc.stderr
    assert not (tmp_path / "kyt" / "pip-install.log").exists()


@pytest.mark.slow
def test_bootstrap_keeps_the_environments_torch_and_exits_2_when_it_is_outside_the_range(tmp_path):
    # The environment is this interpreter's own (a venv with torch, as a cluster's module/conda env would be):
    # nothing needs downloading, since every lock package is already satisfied by it.
    from importlib import metadata

    import torch

    torch_home = Path(torch.__file__).resolve().parent.parent
    kyt = tmp_path / "kyt"
    proc = _bootstrap(tmp_path, EXAONEPATH_SYSTEM_SITE_PACKAGES="1", EXAONEPATH_VENV=str(kyt))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"keeping the environment's own torch=={metadata.version('torch')} {torch_home}" in proc.stdout
    assert "every dependency is inside its tested range" in proc.stdout and "[env_check] torch=" in proc.stdout
    where = subprocess.run([str(kyt / "bin" / "python"), "-c", "import torch; print(torch.__file__)"], check=True,
                           capture_output=True, text=True, timeout=300).stdout.strip()
    assert Path(where).resolve().is_relative_to(torch_home), "torch was reinstalled into the new venv"
    assert not list(_venv_site(kyt / "bin" / "python").glob("torch*")), "the torch stack came in again"
    again = _bootstrap(tmp_path, EXAONEPATH_SYSTEM_SITE_PACKAGES="1", EXAONEPATH_VENV=str(kyt))
    assert again.returncode == 0 and "installing" not in again.stdout, again.stdout + again.stderr
    # An environment whose torchvision is older than the range: a venv on top of this one with an old
    # torchvision's metadata first on its path. The bootstrap installs, then refuses with exit 2 naming it.
    old_env = tmp_path / "old-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(old_env)], check=True, timeout=300)
    old_py = old_env / "bin" / "python"
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "requirement_sets.py"), "parent-site",
                    str(_venv_site(old_py))], check=True, timeout=300)
    _fake_dist(_venv_site(old_py), "torchvision", "0.1.0")
    old = _bootstrap(tmp_path, PYTHON=str(old_py), EXAONEPATH_SYSTEM_SITE_PACKAGES="1",
                     EXAONEPATH_VENV=str(tmp_path / "kyt-old"))
    assert old.returncode == 2, old.stdout + old.stderr
    assert re.search(r"torchvision +installed 0\.1\.0 +tested >=\S+ +OUTSIDE the tested range", old.stdout)
    assert "torchvision 0.1.0 (tested >=" in old.stderr and "EXAONEPATH_ALLOW_UNTESTED=1" in old.stderr
    assert not (tmp_path / "kyt-old" / ".exaonepath-install-stamp").exists()
