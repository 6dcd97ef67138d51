"""The package's shape: one direction of imports, no cycles, and files and functions a reader can take in.

The imports are read with `ast` from the source (module level AND inside functions, so a lazy import that
dodges a cycle still counts). Layers, lowest first; a module may import its own layer (without a cycle) or a
lower one, and nothing in the package imports `run`:

    config < io < data < models < pretrain < evaluation < report < stages < run

A module over MAX_MODULE_LINES lines, or a function over MAX_FUNCTION_LINES lines whose `def` line carries no
`# long: <reason>` comment, is an offender too. Every offender is printed (run with `-s` to see them); the
known ones of the issue-18 reorganisation are listed in ALLOWLIST until their branches land, and a file that no
longer offends is reported so that its entry can go.
"""
from __future__ import annotations

import ast
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "exaonepath_core"
LAYERS = ("config", "io", "data", "models", "pretrain", "evaluation", "report", "stages", "run")
TOP_LAYER = "run"  # imported by nothing in the package
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"

# Today's known offenders (file relative to the repository root -> why it may offend for now). The coordinator
# removes an entry when the branch that fixes the file merges; a new file never goes here.
ALLOWLIST: dict[str, str] = {}


@dataclass(frozen=True)
class Offender:
    kind: str  # cycle | upward | module-size | function-size
    files: tuple[str, ...]  # the files that must change (every member file, for a cycle)
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class Package:
    """Module name -> (file, imported package modules), read from a source tree."""

    root: Path  # the folder holding the package folder
    name: str
    files: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, set[str]] = field(default_factory=dict)

    def rel(self, module: str) -> str:
        return self.files[module].relative_to(self.root).as_posix()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement may bind: `from a.b import c` gives a.b.c and a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


def read_package(root: Path, name: str = PACKAGE) -> Package:
    """Parse every module of `root/name` and resolve its imports to modules of the package."""
    pkg = Package(root, name)
    trees = {}
    for path in sorted((root / name).rglob("*.py")):
        module = module_name(path, root)
        pkg.files[module] = path
        trees[module] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for module, tree in trees.items():
        is_package = pkg.files[module].name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported_names(node, module, is_package)
            if isinstance(node, ast.ImportFrom):
                # `from pkg import sub` imports the module pkg.sub when it is one, else a name of pkg
                target, *members = names
                modules = [m for m in members if m in pkg.files]
                found.update(modules or ([target] if target in pkg.files else []))
            else:
                found.update(n for n in names if n in pkg.files)
        # a package's own __init__ is imported with every submodule; it is not an edge worth reporting
        found.discard(module)
        pkg.imports[module] = {m for m in found if not module.startswith(m + ".")}
    return pkg


def layer_of(module: str, name: str = PACKAGE) -> str | None:
    """The layer of a module (`exaonepath_core.data.tiling` -> data); None for the package root."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _cycle_path(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One import loop through the first member of a cycle, for the message (a -> b -> a)."""
    inside = set(members)
    start = members[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & inside):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return members


def import_offenders(pkg: Package) -> list[Offender]:
    """Import cycles, upward imports and imports of the top layer."""
    out = []
    for members in _cycles(pkg.imports):
        short = [m.removeprefix(pkg.name + ".") for m in members]
        loop = " -> ".join(m.removeprefix(pkg.name + ".") for m in _cycle_path(pkg.imports, members))
        detail = loop if len(members) == 2 else f"{loop} (the cycle holds {', '.join(short)})"
        out.append(Offender("cycle", tuple(pkg.rel(m) for m in members), detail))
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    for module, targets in sorted(pkg.imports.items()):
        mine = layer_of(module, pkg.name)
        for target in sorted(targets):
            theirs = layer_of(target, pkg.name)
            if mine is None or theirs is None:
                continue
            if mine not in rank or theirs not in rank:
                out.append(Offender("upward", (pkg.rel(module),),
                                    f"{module} -> {target}: a module outside the layers {', '.join(LAYERS)}"))
            elif rank[theirs] > rank[mine]:
                out.append(Offender("upward", (pkg.rel(module),),
                                    f"{module} ({mine}) imports {target} ({theirs}), a higher layer"))
            elif theirs == TOP_LAYER and mine != TOP_LAYER:
                out.append(Offender("upward", (pkg.rel(module),), f"{module} imports {target}: nothing imports run"))
    for module in pkg.files:  # every layer named in the package exists in LAYERS
        layer = layer_of(module, pkg.name)
        if layer is not None and layer not in rank:
            out.append(Offender("upward", (pkg.rel(module),), f"{module} lies in no layer of {', '.join(LAYERS)}"))
    return out


def size_offenders(pkg: Package) -> list[Offender]:
    """Modules over MAX_MODULE_LINES lines; functions over MAX_FUNCTION_LINES without `# long: <reason>`."""
    out = []
    for module, path in sorted(pkg.files.items()):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = pkg.rel(module)
        if len(lines) > MAX_MODULE_LINES:
            out.append(Offender("module-size", (rel,), f"{rel}: {len(lines)} lines > {MAX_MODULE_LINES}"))
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            def_line = lines[node.lineno - 1]
            reason = def_line.partition(LONG_MARK)[2].strip() if LONG_MARK in def_line else ""
            if length > MAX_FUNCTION_LINES and not reason:
                out.append(Offender("function-size", (rel,),
                                    f"{rel}:{node.lineno} {node.name}: {length} lines > {MAX_FUNCTION_LINES} "
                                    f"(or say why on its def line: '{LONG_MARK} <reason>')"))
    return out


def allowed(offender: Offender, allowlist: dict[str, str]) -> bool:
    """A cycle is allowed only when every member file is listed; any other offence when its file is."""
    return all(f in allowlist for f in offender.files)


def report(offenders: list[Offender], allowlist: dict[str, str]) -> list[Offender]:
    """Print every offender (allowlisted ones marked) and return those not allowed."""
    failing = [o for o in offenders if not allowed(o, allowlist)]
    for o in offenders:
        print(("  allowlisted " if o not in failing else "  OFFENDER    ") + str(o), file=sys.stderr)
    return failing


@pytest.fixture(scope="module")
def package() -> Package:
    return read_package(REPO_ROOT)


def test_no_import_cycle_and_no_upward_import(package):
    failing = report(import_offenders(package), ALLOWLIST)
    assert not failing, "import offenders:\n" + "\n".join(map(str, failing))


def test_modules_and_functions_are_small(package):
    failing = report(size_offenders(package), ALLOWLIST)
    assert not failing, "size offenders:\n" + "\n".join(map(str, failing))


def test_config_imports_no_package_module_outside_itself(package):
    config = [m for m in package.files if layer_of(m) == "config"]
    assert f"{PACKAGE}.config.vocabulary" in config  # the config package, not a flat module with another name
    outside = {m: sorted(t for t in package.imports[m] if layer_of(t) != "config") for m in config}
    assert not any(outside.values()), outside


def test_allowlist_names_existing_files_and_reports_the_cleared_ones(package):
    offending = {f for o in import_offenders(package) + size_offenders(package) for f in o.files}
    for rel in ALLOWLIST:
        assert (REPO_ROOT / rel).is_file(), f"ALLOWLIST names {rel}, which does not exist: remove the entry"
    cleared = sorted(set(ALLOWLIST) - offending)
    if cleared:  # not a failure: the entry only waits for the coordinator to remove it
        warnings.warn(f"ALLOWLIST entries that no longer offend (remove them): {', '.join(cleared)}", stacklevel=1)


# ------------------------------------------------------------------------------------------------------------
# The checker itself, on a small package written here: each kind of new offender fails
# ------------------------------------------------------------------------------------------------------------
def _write_package(root: Path, modules: dict[str, str]) -> Package:
    for rel, text in {"__init__.py": "", **modules}.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root / PACKAGE).parents:
            (root / PACKAGE / parent / "__init__.py").touch()
        path.write_text(text)
    return read_package(root)


def test_a_clean_package_has_no_offender(tmp_path):
    pkg = _write_package(tmp_path, {
        "config.py": "import json\n",
        "io/atomic.py": "from exaonepath_core import config\n",
        "data/a.py": "from exaonepath_core.io import atomic\nfrom . import b\n",
        "data/b.py": "from exaonepath_core.config import X\n",
        "run/cli.py": "from exaonepath_core.data import a\n",
    })
    assert import_offenders(pkg) == [] and size_offenders(pkg) == []
    assert pkg.imports["exaonepath_core.data.a"] == {"exaonepath_core.io.atomic", "exaonepath_core.data.b"}


def test_a_new_cycle_fails_even_through_an_in_function_import(tmp_path):
    pkg = _write_package(tmp_path, {
        "config.py": "",
        "data/a.py": "from exaonepath_core.data.b import f\n",
        "data/b.py": "def f():\n    from exaonepath_core.data import a  # dodges the cycle at import time\n",
    })
    offenders = import_offenders(pkg)
    assert [o.kind for o in offenders] == ["cycle"]
    assert offenders[0].detail == "data.a -> data.b -> data.a"
    assert report(offenders, {}) == offenders
    # allowlisting one member of a cycle is not enough: every member file must be listed
    assert report(offenders, {"exaonepath_core/data/a.py": "x"}) == offenders
    assert report(offenders, dict.fromkeys(offenders[0].files, "x")) == []


def test_a_new_upward_import_fails(tmp_path):
    pkg = _write_package(tmp_path, {
        "config.py": "def load():\n    from exaonepath_core.data import a\n",
        "data/a.py": "import exaonepath_core.models.m\n",
        "models/m.py": "",
        "stages/s.py": "from exaonepath_core.run import cli\n",
        "run/cli.py": "",
        "misc/x.py": "",
    })
    details = sorted(o.detail for o in import_offenders(pkg))
    assert any("config (config) imports exaonepath_core.data.a (data)" in d for d in details)
    assert any("stages.s (stages) imports exaonepath_core.run.cli (run)" in d for d in details)
    assert any("misc.x lies in no layer" in d for d in details)
    assert any("data.a (data) imports exaonepath_core.models.m (models)" in d for d in details)
    assert len(details) == 5, details  # misc/__init__.py and misc/x.py


def test_a_long_module_or_function_fails_unless_its_def_says_why(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    pkg = _write_package(tmp_path, {
        "config.py": f"def long_one():\n{body}\n\ndef stated():  {LONG_MARK} one table, read top to bottom\n{body}",
        "io/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
        "io/empty_reason.py": f"def f():  {LONG_MARK}\n{body}",
    })
    details = [o.detail for o in size_offenders(pkg)]
    assert len(details) == 3, details
    assert any("config.py:1 long_one: 81 lines" in d for d in details)
    assert any(f"io/big.py: {MAX_MODULE_LINES + 1} lines" in d for d in details)
    assert any("empty_reason.py:1 f" in d for d in details)  # a mark without a reason is no reason
