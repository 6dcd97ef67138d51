"""Write notebooks/*.ipynb (stored without outputs) from their sources notebooks/src/<notebook>.py.

A source is plain Python (linted by ruff with the package) in cells marked `# %%`: `# %% [markdown]` starts a
markdown cell whose lines are comments (`# ` stripped), `# %% tags=["parameters"]` the cell papermill injects
values below. One notebook per stage of `exaonepath_core.stages.registry`. After editing a source, run
`.venv/bin/python tools/build_notebooks.py`; tests/test_notebooks.py checks the stored notebooks match, carry a
tagged `parameters` cell, no outputs and no function or class definitions.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

from exaonepath_core.io import atomic
from exaonepath_core.stages.registry import SPECS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "notebooks" / "src"  # read from the checkout even when ROOT is pointed elsewhere
_MARKER = re.compile(r"^# %%(?P<rest>.*)$")


def parse_cells(text: str, source: str = "<source>") -> list[tuple[str, str, list[str]]]:
    """(kind 'md' | 'code', cell text, tags) per `# %%` cell of a source; text before the first marker is an
    error (it would belong to no cell)."""
    cells: list[tuple[str, list[str], list[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        match = _MARKER.match(line)
        if match:
            rest = match["rest"].strip()
            kind = "md" if rest.startswith("[markdown]") else "code"
            tags = re.findall(r'"([^"]+)"', rest.partition("tags=")[2]) if "tags=" in rest else []
            cells.append((kind, [], tags))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"{source}:{number}: text before the first `# %%` cell marker")
    out = []
    for kind, lines, tags in cells:
        if kind == "md":
            bad = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
            if bad:
                raise ValueError(f"{source}: a markdown cell holds a line that is not a comment: {bad[0]!r}")
            lines = [ln[2:] if ln.startswith("# ") else ln[1:] for ln in lines]
        out.append((kind, "\n".join(lines).strip("\n"), tags))
    return out


def build_notebook(name: str, source: Path) -> nbformat.NotebookNode:
    """The notebook of one source, with stable cell ids (rebuilding gives the same bytes)."""
    nb = nbformat.v4.new_notebook()
    for i, (kind, text, tags) in enumerate(parse_cells(source.read_text(), str(source))):
        cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
        if tags:
            cell.metadata["tags"] = tags
        cell.id = f"{name[:2]}-cell-{i}"
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def build() -> list[Path]:
    """Write every stage's notebook (atomically: a reader never sees half a notebook); returns their paths."""
    written = []
    for spec in SPECS.values():
        text = nbformat.writes(build_notebook(spec.notebook, SOURCES / f"{spec.notebook}.py"))
        path = ROOT / "notebooks" / f"{spec.notebook}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(atomic.write_text(path, text if text.endswith("\n") else text + "\n"))
    return written


if __name__ == "__main__":
    for p in build():
        print(p.relative_to(ROOT))
