"""Requirement files derived from pyproject.toml and requirements.lock, for tools/bootstrap_venv.sh.

    python tools/requirement_sets.py lowest pyproject.toml OUT       every range's lower bound, pinned with ==
    python tools/requirement_sets.py without-torch requirements.lock OUT
        the lock less torch, torchvision and the CUDA wheels they pull in (for a venv that sees the
        environment's own torch through --system-site-packages)
    python tools/requirement_sets.py parent-site VENV_SITE_PACKAGES    (run by the environment's interpreter)
        when that interpreter is itself a venv, write VENV_SITE_PACKAGES/_exaonepath_parent_site.pth so the new
        venv sees the parent venv's site-packages: `venv --system-site-packages` made from inside a venv sees
        only the BASE interpreter's site, not the venv's (where its torch is)
    python tools/requirement_sets.py torch-stack                       (run by the new venv's interpreter)
        print `name==version path` for each visible torch-stack distribution; exit 3 when torch is not visible

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
PARENT_SITE_PTH = "_exaonepath_parent_site.pth"
EXIT_NO_TORCH = 3


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


def parent_site_dirs() -> list[str]:
    """This interpreter's own site-packages when it runs in a venv (none for a base/conda/module install).

    The base interpreter's site is left out: a `--system-site-packages` venv adds it by itself, after these.
    """
    import site

    if sys.prefix == sys.base_prefix:
        return []
    base = (Path(sys.base_prefix).resolve(), Path(sys.base_exec_prefix).resolve())
    dirs = []
    for entry in site.getsitepackages():
        path = Path(entry).resolve()
        if path.is_dir() and not any(path.is_relative_to(b) for b in base) and str(path) not in dirs:
            dirs.append(str(path))
    return dirs


def write_parent_site_pth(venv_site: Path) -> Path | None:
    """Write venv_site/PARENT_SITE_PTH adding parent_site_dirs() (their .pth files too); its path when written.

    None when there is no parent venv (a stale file is removed) or the file already says the same.

    `import` lines of a .pth file run at start-up, and site.addsitedir also processes the parent's own .pth
    files (editable installs, distutils hacks), which a bare path line would not. Paths are appended after the
    new venv's own site-packages, so what the venv installs wins over the parent's copy.
    """
    dirs = parent_site_dirs()
    target = venv_site / PARENT_SITE_PTH
    if not dirs:
        target.unlink(missing_ok=True)
        return None
    if not venv_site.is_dir():
        raise FileNotFoundError(f"{venv_site} is not a directory (the new venv's site-packages)")
    calls = "; ".join(f"site.addsitedir({d!r})" for d in dirs)
    text = f"# written by tools/bootstrap_venv.sh: the parent venv {sys.prefix}\nimport site; {calls}\n"
    if target.is_file() and target.read_text() == text:
        return None  # as written before: nothing to say
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(target)
    return target


def torch_stack_lines() -> list[str]:
    """`name==version location` of each visible TORCH_STACK distribution, sorted by name."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = _normalize(dist.metadata["Name"] or "")
        if name and TORCH_STACK.match(name) and name not in found:  # the first on sys.path is the one imported
            found[name] = f"{name}=={dist.version} {Path(str(dist.locate_file(''))).resolve()}"
    return [found[k] for k in sorted(found)]


def main(argv: list[str]) -> int:
    """Write the requested requirement file; print what was left out."""
    if argv[:1] == ["parent-site"] and len(argv) == 2:
        pth = write_parent_site_pth(Path(argv[1]))
        if pth is not None:
            print(f"[bootstrap] {sys.prefix} is a venv: its site-packages reach the new venv through {pth}")
        return 0
    if argv == ["torch-stack"]:
        lines = torch_stack_lines()
        print("\n".join(lines))
        return 0 if any(line.startswith("torch==") for line in lines) else EXIT_NO_TORCH
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
