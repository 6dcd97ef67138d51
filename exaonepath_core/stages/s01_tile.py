"""Stage 01, tile slides: the run's slide table, tissue grids with a per-slide ledger, QC images, and the
synthetic cohort's example grid. Outputs: `results/<run>/01_tiles/`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from exaonepath_core.config import ProjectConfig, parse_shard
from exaonepath_core.data import cohort
from exaonepath_core.data.synthetic.plots import plot_cohort_examples
from exaonepath_core.data.tiling.params import TilingParams
from exaonepath_core.data.tiling.run import tile_cohort
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.report import stage_tables
from exaonepath_core.stages.base import StageSpec

SPEC = StageSpec("01", "01_tile_slides", "01_tiles", ("profile", "seed", "data", "tiling"), reuses_work=True)


@dataclass
class TileResult:
    """What stage 01 wrote, for its notebook to show."""

    slides: pd.DataFrame
    ledger: pd.DataFrame
    summary: pd.DataFrame
    tiles_dir: Path
    qc_images: list[Path]
    synthetic_examples: Path | None


def tiling_summary(slides: pd.DataFrame, ledger: pd.DataFrame) -> pd.DataFrame:
    """Slides, ok, failed and tiles per (source, split): the cohort summary table of stage 01."""
    merged = slides.merge(ledger[["slide_id", "status", "reason", "n_tiles"]], on="slide_id", how="left")
    merged["status"] = merged["status"].fillna("not run (other shard)")
    merged["n_tiles"] = merged["n_tiles"].fillna(0).astype(int)
    rows = []
    for (source, split), g in merged.groupby(["source", "split"], sort=True):
        ok = g["status"] == "ok"
        rows.append({"source": source, "split": split, "slides": len(g), "ok": int(ok.sum()),
                     "failed": int((g["status"] == "failed").sum()), "tiles": int(g.loc[ok, "n_tiles"].sum()),
                     "zero_tile_slides": int((ok & (g["n_tiles"] == 0)).sum())})
    total = pd.DataFrame(rows, columns=list(stage_tables.TILING_SUMMARY_COLUMNS))
    if len(total):
        total.loc[len(total)] = {"source": "all", "split": "all", "slides": int(total.slides.sum()),
                                 "ok": int(total.ok.sum()), "failed": int(total.failed.sum()),
                                 "tiles": int(total.tiles.sum()),
                                 "zero_tile_slides": int(total.zero_tile_slides.sum())}
    return total


def tiling_params(cfg: ProjectConfig) -> TilingParams:
    """The grid of this run (its folder name keys the tiles under 01_tiles/)."""
    return TilingParams(target_mpp=cfg.tiling.target_mpp, tile_size=cfg.tiling.tile_size,
                               overlap=cfg.tiling.overlap, min_tissue_fraction=cfg.tiling.min_tissue_fraction,
                               verify_tiles=cfg.tiling.verify_tiles)


def tiles_dir_of(stage_dir: Path) -> Path:
    """The parameter-named tiling folder that stage 01 recorded in its `tiles.json`."""
    return Path(json.loads((Path(stage_dir) / "tiles.json").read_text())["tiles_dir"])


def run(cfg: ProjectConfig, paths, force: bool = False) -> TileResult:
    """Collect the slides, tile them (a rerun skips finished slides; `force` redoes them), write the summary,
    the QC image list (CMU slide first) and the synthetic cohort's example grid."""
    out = paths.stage_dir(SPEC.key)
    save_config(cfg, out / "config.yaml")
    slides = cohort.build_slide_table(cfg)
    atomic.write_csv(slides, out / "slides.csv")
    params = tiling_params(cfg)
    tiles_dir = out / params.folder_name()
    overrides = {p: cfg.data.mpp_override for p in slides.path} if cfg.data.mpp_override else None
    ledger = tile_cohort(list(slides.path), tiles_dir, params, workers=cfg.tiling.workers,
                                shard=parse_shard(cfg.tiling.shard), force=force, mpp_overrides=overrides)
    atomic.write_json(out / "tiles.json", {"tiles_dir": str(tiles_dir), "params": params.folder_name()})
    summary = tiling_summary(slides, ledger)
    atomic.write_csv(summary, out / "tiling_summary.csv")
    qc = sorted(tiles_dir.glob("qc/*.png"))
    qc_images = sorted(qc, key=lambda p: (not p.stem.startswith("CMU"), p.name))[: cfg.tiling.qc_figures]
    examples = None
    if cfg.data.synthetic.enabled:
        manifest = pd.read_csv(cohort.synthetic_cohort_dir(cfg) / "manifest.csv")
        examples = plot_cohort_examples(manifest, out / "synthetic_examples.png")
    return TileResult(slides, ledger, summary, tiles_dir, qc_images, examples)


def warnings(stage_dir: Path, cfg: ProjectConfig) -> list[str]:
    """Failed slides and slides without a tile, from `tiling_summary.csv` (one line each)."""
    out = []
    summary = stage_tables.read_csv_or_none(Path(stage_dir) / "tiling_summary.csv")
    if summary is not None and len(summary):
        total = summary[summary["source"] == "all"]
        row = (total if len(total) else summary).iloc[-1]
        where = f"{Path(stage_dir) / 'tiling_summary.csv'} and the ledger.csv beside the tiles"
        if int(row["failed"]):
            out.append(f"{int(row['failed'])} of {int(row['slides'])} slide(s) failed to tile (see {where})")
        if int(row.get("zero_tile_slides", 0)):
            out.append(f"{int(row['zero_tile_slides'])} slide(s) gave no tile (no tissue at the threshold; see "
                       f"{where})")
    return out
