"""The run report: `results/<profile>/index.html` linking every figure and table with one line of context."""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from exaonepath_core.io import atomic


@dataclass
class ReportItem:
    """One figure or table of the report."""

    section: str
    path: Path
    caption: str


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def write_index_html(profile_dir: str | Path, items: list[ReportItem], title: str, preamble: str = "",
                     tables_inline: bool = True) -> Path:
    """Write index.html linking items that exist; items whose file is missing are listed as missing, not linked."""
    profile_dir = Path(profile_dir)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
         "img{max-width:100%;border:1px solid #ccc}table{border-collapse:collapse;font-size:90%}"
         "td,th{border:1px solid #ccc;padding:2px 6px}h2{border-bottom:1px solid #999}"
         ".missing{color:#a00}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>",
        preamble,
    ]
    section = None
    for item in items:
        if item.section != section:
            section = item.section
            parts.append(f"<h2>{html.escape(section)}</h2>")
        path = Path(item.path)
        if not path.is_file():
            parts.append(f"<p class='missing'>missing: {html.escape(str(path.name))} — {html.escape(item.caption)}</p>")
            continue
        rel = html.escape(_rel(path, profile_dir))
        parts.append(f"<p><a href='{rel}'>{html.escape(path.name)}</a> — {html.escape(item.caption)}</p>")
        if path.suffix.lower() == ".png":
            parts.append(f"<a href='{rel}'><img src='{rel}' alt='{html.escape(item.caption)}'></a>")
        elif path.suffix.lower() == ".csv" and tables_inline:
            try:
                df = pd.read_csv(path)
            except pd.errors.EmptyDataError:  # a 1-byte file from a run before tables kept their header
                df = pd.DataFrame()
            if df.empty:  # say so: an empty table rendered as a bare header reads like a rendering fault
                parts.append("<p class='missing'>(no rows: nothing measured; see <i>Not measured in this run</i> "
                             "above)</p>")
            elif len(df) <= 60:
                parts.append(df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0))
    parts.append("</body></html>")
    return atomic.write_text(profile_dir / "index.html", "\n".join(parts))


def linked_files(index_html: str | Path) -> list[Path]:
    """Every local file index.html links to (href/src), resolved against its folder."""
    index_html = Path(index_html)
    text = index_html.read_text()
    refs = set(re.findall(r"(?:href|src)='([^']+)'", text))
    return sorted(index_html.parent / html.unescape(r) for r in refs if "://" not in r)
