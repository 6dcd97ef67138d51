"""Installed versions against the tested ranges, and the CUDA build in use.

    python -m exaonepath_core.io.env_check      exit 0: every dependency inside its tested range; 2: some are not

For environments that bring their own torch (conda, an HPC module, a container) and install this package with
`pip install -e . --no-deps`: it names each dependency that is missing or outside the range in pyproject.toml.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

DIST_NAME = "exaonepath_core"
# extras checked when installed (a missing one is a note, not a failure); dev is for the test suite only
OPTIONAL_EXTRAS = ("tensorboard",)
EXIT_OUTSIDE_RANGE = 2


@dataclass(frozen=True)
class VersionFinding:
    """One declared dependency and what is installed for it."""

    name: str
    specifier: str
    installed: str | None
    extra: str | None  # None: a core dependency

    @property
    def in_range(self) -> bool:
        """True when installed and inside the tested range (pre-releases count as inside)."""
        if self.installed is None:
            return False
        try:
            version = Version(self.installed)
        except InvalidVersion:
            return False
        spec = Requirement(f"{self.name}{self.specifier}").specifier
        # local labels (2.14.1+cu128) are builds of the same release: compare the public version
        return spec.contains(Version(version.public), prereleases=True)

    @property
    def is_problem(self) -> bool:
        """A core dependency missing or out of range, or an installed extra out of range."""
        if self.extra is not None and self.installed is None:
            return False
        return not self.in_range


def declared_requirements(pyproject: Path | None = None) -> list[Requirement]:
    """The package's requirements: from its installed metadata, else from pyproject.toml next to the package."""
    if pyproject is None:
        try:
            lines = metadata.requires(DIST_NAME) or []
        except metadata.PackageNotFoundError:
            pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        else:
            return [Requirement(line) for line in lines]
    import tomllib  # Python >= 3.11; an installed package (the usual case) never reaches here

    if not pyproject.is_file():
        raise FileNotFoundError(f"{DIST_NAME} is not installed and {pyproject} does not exist")
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra, deps in project.get("optional-dependencies", {}).items():
        lines += [f"{dep}; extra == '{extra}'" for dep in deps]
    try:
        return [Requirement(line) for line in lines]
    except InvalidRequirement as err:
        raise ValueError(f"{pyproject}: bad dependency entry: {err}") from None


def _extra_of(req: Requirement) -> str | None:
    """The extra a requirement belongs to (None for a core one)."""
    if req.marker is None:
        return None
    for extra in (*OPTIONAL_EXTRAS, "dev"):
        if req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            return extra
    return None


def check_versions(requirements: list[Requirement]) -> list[VersionFinding]:
    """Compare core and OPTIONAL_EXTRAS requirements with the installed distributions."""
    findings = []
    for req in requirements:
        extra = _extra_of(req)
        if extra is not None and extra not in OPTIONAL_EXTRAS:
            continue
        if extra is None and req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # a platform marker that excludes this machine
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = None
        findings.append(VersionFinding(req.name, str(req.specifier), installed, extra))
    return findings


def _driver_version() -> str | None:
    """The NVIDIA driver release from nvidia-smi (None without one)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    versions = sorted({line.strip() for line in out.splitlines() if line.strip()})
    return ",".join(versions) or None


def cuda_build_summary() -> dict[str, str | None]:
    """torch's version and CUDA/cuDNN/NCCL build, the driver and the visible GPUs, as strings."""
    import torch

    info: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None,
                                   "nccl": None, "driver": None, "gpus": None}
    if torch.version.cuda is None:
        return info
    if torch.backends.cudnn.is_available():
        info["cudnn"] = str(torch.backends.cudnn.version())
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_properties(i).name for i in range(torch.cuda.device_count())]
        info["gpus"] = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        try:
            nccl = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (RuntimeError, AttributeError):
            info["nccl"] = None  # a build without NCCL
    info["driver"] = _driver_version()
    return info


def cuda_build_line() -> str:
    """cuda_build_summary() as one line for a start-up banner."""
    info = cuda_build_summary()
    if info["cuda"] is None:
        return f"torch {info['torch']} (CPU-only build)"
    return " ".join(f"{key}={value or 'n/a'}" for key, value in info.items())


def format_findings(findings: list[VersionFinding]) -> str:
    """A table of the findings, problems first."""
    rows = sorted(findings, key=lambda f: (not f.is_problem, f.name.lower()))
    width = max((len(f.name) for f in rows), default=4)
    lines = []
    for f in rows:
        if f.installed is None:
            state = "MISSING" if f.is_problem else f"not installed (optional: pip install '.[{f.extra}]')"
        else:
            state = "ok" if f.in_range else "OUTSIDE the tested range"
        lines.append(f"  {f.name:<{width}}  installed {f.installed or '-':<14} tested {f.specifier:<18} {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the version table and the CUDA build; exit 2 when a dependency is missing or out of range."""
    parser = argparse.ArgumentParser(prog="python -m exaonepath_core.io.env_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", type=Path, default=None,
                        help="read the ranges from this pyproject.toml instead of the installed metadata")
    args = parser.parse_args(argv)
    findings = check_versions(declared_requirements(args.pyproject))
    problems = [f for f in findings if f.is_problem]
    print(f"[env_check] Python {sys.version.split()[0]} at {sys.executable}")
    print(format_findings(findings))
    if any(f.name == "torch" and f.installed for f in findings):
        print(f"[env_check] {cuda_build_line()}")
    if problems:
        names = ", ".join(f"{f.name} {f.installed or '(missing)'} (tested {f.specifier})" for f in problems)
        print(f"[env_check] {len(problems)} dependenc{'y' if len(problems) == 1 else 'ies'} outside the tested "
              f"ranges: {names}. The run may still work; results are only vouched for inside the ranges "
              "(the tested set: pip install --require-hashes -r requirements.lock; to keep an environment's own "
              "torch, load or install a torch/torchvision pair inside the ranges instead).",
              file=sys.stderr)
        return EXIT_OUTSIDE_RANGE
    print("[env_check] every dependency is inside its tested range")
    return 0


if __name__ == "__main__":
    sys.exit(main())
