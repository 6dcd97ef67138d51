"""Stage 02, normalize stains: the Macenko reference, the pretraining slides' tiles written once into one patch
store per input (`raw`, `macenko`), the storeless coordinate index and a before/after QC grid.
Outputs: `results/<run>/02_normalize/`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from exaonepath_core.config import ProjectConfig, parse_shard, pick_device, resolve_path
from exaonepath_core.data import cohort, storeless
from exaonepath_core.data.normalize_store import normalize_slides
from exaonepath_core.data.stain.macenko import fit_reference, macenko_normalize_batch
from exaonepath_core.data.stain.qc import plot_stain_qc
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.data.tiling.dataset import read_tiles, tile_sets, tile_sources
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.report import stage_tables
from exaonepath_core.stages import s01_tile
from exaonepath_core.stages.base import StageSpec

SPEC = StageSpec("02", "02_normalize_stains", "02_normalize", ("normalize",), reuses_work=True, needs_arms=True)


@dataclass
class NormalizeResult:
    """What stage 02 wrote, for its notebook to show."""

    reference: MacenkoReference
    summary: pd.DataFrame
    storeless_patches: int
    stain_qc: Path | None


def stain_reference(cfg: ProjectConfig):
    """The Macenko reference: the standard H&E one, or fitted once to `normalize.reference_image`."""
    if not cfg.normalize.reference_image:
        return MacenkoReference.default()
    image = np.asarray(Image.open(resolve_path(cfg.normalize.reference_image)).convert("RGB"))
    return fit_reference(image, **cfg.normalize.macenko_params())


def normalize_summary(ledgers: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per store: slides ok/failed, patches, fallback (degenerate patches passed through unchanged)."""
    rows = []
    for mode, led in ledgers.items():
        ok = led["status"] == "ok"
        n = int(led.loc[ok, "n_patches"].sum())
        fb = int(led.loc[ok, "n_fallback"].sum())
        rows.append({"store": mode, "slides_ok": int(ok.sum()), "slides_failed": int((~ok).sum()),
                     "patches": n, "fallback_passed_through": fb, "fallback_fraction": round(fb / n, 4) if n else 0.0,
                     "failed_reasons": "; ".join(sorted(set(led.loc[~ok, "reason"].astype(str))))})
    return pd.DataFrame(rows, columns=list(stage_tables.NORMALIZE_SUMMARY_COLUMNS))


def check_pretraining_tiles(cfg: ProjectConfig, train_slides: pd.DataFrame, train_sets: list, tiles_dir: Path) -> None:
    """Stop stage 02 with the reason when no pretraining slide gave a tile (every slide failed or had no tissue):
    an empty store would otherwise fail later, inside the trainer or the QC figure, without saying why."""
    if not cfg.arms or sum(len(ts.coords) for ts in train_sets):
        return
    empty_sets = sum(1 for ts in train_sets if len(ts.coords) == 0)
    raise RuntimeError(
        f"no tile to pretrain on: {len(train_slides)} pretraining slide(s), {len(train_slides) - len(train_sets)} "
        f"failed to tile and {empty_sets} had no tissue at tiling.min_tissue_fraction={cfg.tiling.min_tissue_fraction} "
        f"(reasons per slide in {Path(tiles_dir) / 'ledger.csv'}); check data.slide_dirs / data.slide_list "
        f"(a site's held-out slides, data.heldout_slides_per_site, are not pretrained on)")


def qc_examples(tile_sets: list, reference, n_slides: int = 6) -> tuple[list, list, list]:
    """One tissue-rich tile per slide (sites spread out) before and after Macenko, for the QC grid."""
    chosen = _spread(tile_sets, n_slides)
    before, titles = [], []
    for ts in chosen:
        if len(ts.coords) == 0:
            continue
        best = int(np.argmax(ts.tissue_fraction)) if len(ts.tissue_fraction) else 0
        batch = next(iter(read_tiles(ts, indices=[best], batch_size=1)))
        before.append(batch[0])
        titles.append(ts.slide_id)
    if not before:
        return [], [], []
    out, _ = macenko_normalize_batch(torch.from_numpy(np.stack(before)), reference)
    return before, list(out.numpy()), titles


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def write_stores(cfg: ProjectConfig, sources: list, out: Path, reference, force: bool) -> dict[str, pd.DataFrame]:
    """Every store of `normalize.stores` (a rerun skips finished slides; `force` redoes them): {mode: ledger}."""
    ledgers = {}
    for mode in cfg.normalize.stores:
        ledgers[mode] = normalize_slides(
            sources, out / mode, mode=mode, reference=reference if mode == "macenko" else None,
            batch_size=cfg.normalize.batch_size, device=pick_device(cfg.device),
            shard=parse_shard(cfg.normalize.shard), force=force,
            macenko_params=cfg.normalize.macenko_params(), store_format=cfg.normalize.store_format,
            encoding=cfg.normalize.encoding, quality=cfg.normalize.jpeg_quality,
            jpeg_subsampling=cfg.normalize.jpeg_subsampling, shard_max_bytes=cfg.normalize.shard_max_mb << 20)
    return ledgers


def run(cfg: ProjectConfig, paths, force: bool = False) -> NormalizeResult:
    """The reference, the stores, the storeless index (the stage-01 coordinates in one compact index, for
    `pretrain.data_source: storeless`), the summary table and the QC grid (none without a pretraining tile)."""
    out = paths.stage_dir(SPEC.key)
    save_config(cfg, out / "config.yaml")
    tiles_stage = paths.stage_dir(s01_tile.SPEC.key)
    slides = cohort.read_slide_table(tiles_stage / "slides.csv")
    tiles_dir = s01_tile.tiles_dir_of(tiles_stage)
    reference = stain_reference(cfg)
    reference.to_json(out / "reference.json")
    train_sets = tile_sets(slides[slides.split == "train"], tiles_dir)
    check_pretraining_tiles(cfg, slides[slides.split == "train"], train_sets, tiles_dir)
    sources = tile_sources(train_sets, batch_size=cfg.normalize.batch_size)
    ledgers = write_stores(cfg, sources, out, reference, force)
    n_storeless = storeless.write_storeless_index(train_sets, out / "storeless")
    summary = normalize_summary(ledgers)
    atomic.write_csv(summary, out / "normalize_summary.csv")
    before, after, titles = qc_examples(train_sets, reference, n_slides=6)
    qc = plot_stain_qc(before, after, titles, reference, out / "stain_qc.png") if before else None
    return NormalizeResult(reference, summary, n_storeless, qc)


def warnings(stage_dir: Path, cfg: ProjectConfig) -> list[str]:
    """Stores missing slides that could not be read, and a macenko store whose every patch passed through."""
    out = []
    summary = stage_tables.read_csv_or_none(Path(stage_dir) / "normalize_summary.csv")
    if summary is None:
        return out
    for _, row in summary[summary["slides_failed"] > 0].iterrows():
        reasons = str(row.get("failed_reasons", ""))
        out.append(f"store {row['store']}: {int(row['slides_failed'])} slide(s) could not be read and are not "
                   f"in it ({reasons[:300]}{' ...' if len(reasons) > 300 else ''}; see "
                   f"{Path(stage_dir) / 'normalize_summary.csv'})")
    for _, row in summary[(summary["patches"] > 0) & (summary["fallback_passed_through"] == summary["patches"])
                          & (summary["store"] == "macenko")].iterrows():
        out.append(f"store macenko: every one of its {int(row['patches'])} patches was passed through unchanged "
                   "(no stain estimate: background-only tiles?), so the macenko arm sees raw colours")
    return out
