"""Requirement files derived from pyproject.toml and requirements.lock, for tools/bootstrap_venv.sh.

    python tools/requirement_sets.py lowest pyproject.toml OUT       every range's lower bound, pinned with ==
    python tools/requirement_sets.py without-torch requirements.lock OUT
        the lock less torch, torchvision and the CUDA wheels they pull in (for a venv that sees the
        environment's own torch through --system-site-packages)

Standard library only: it runs on the interpreter that creates the venv, before anything is installed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# the environment's torch brings its own CUDA stack: installing the lock's copies beside it would shadow them
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
_LOWER = re.compile(r">=\s*([^,;\s]+)")
EXTRAS_IN_LOCK = ("tensorboard", "dev")


def _normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lowest_pins(pyproject: Path) -> list[str]:
    """`name==lower` for each core and EXTRAS_IN_LOCK dependency; error on one without a `>=` bound."""
    import tomllib  # Python >= 3.11

    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    for extra in EXTRAS_IN_LOCK:
        deps += project.get("optional-dependencies", {}).get(extra, [])
    pins = []
    for dep in deps:
        name, lower = _NAME.match(dep), _LOWER.search(dep.split(";")[0])
        if name is None or lower is None:
            raise ValueError(f"{pyproject}: dependency {dep!r} has no '>=' lower bound to test")
        pins.append(f"{name.group(1)}=={lower.group(1)}")
    return pins


def lock_without_torch(lock: Path) -> tuple[list[str], list[str]]:
    """The lock's lines less the TORCH_STACK entries (each entry: a pin line and its hash continuations)."""
    kept, dropped = [], []
    skipping = False
    for line in lock.read_text().splitlines():
        starts_entry = bool(line) and not line[0].isspace() and not line.startswith(("#", "-"))
        if starts_entry:
            name = _normalize(_NAME.match(line).group(1)) if _NAME.match(line) else ""
            skipping = bool(TORCH_STACK.match(name))
            if skipping:
                dropped.append(name)
        elif line and not line[0].isspace():
            skipping = False  # a comment or option line at column 0 ends the entry
        if not skipping:
            kept.append(line)
    if "torch" not in dropped:
        raise ValueError(f"{lock}: no torch entry found; is this a pip-compile lock?")
    return kept, dropped


def main(argv: list[str]) -> int:
    """Write the requested requirement file; print what was left out."""
    if len(argv) != 3 or argv[0] not in ("lowest", "without-torch"):
        print(__doc__, file=sys.stderr)
        return 2
    command, source, out = argv[0], Path(argv[1]), Path(argv[2])
    if command == "lowest":
        lines = lowest_pins(source)
    else:
        lines, dropped = lock_without_torch(source)
        print(f"[bootstrap] left out of the lock (the environment's own): {', '.join(dropped)}")
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
