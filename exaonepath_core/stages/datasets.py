"""The datasets stage 04 embeds: held-out synthetic slides (tissue labels from the answer key), held-out real
slides (unlabelled, for the collapse metrics only) and each configured downstream dataset, with a status per
dataset (present, or absent and why) for `datasets.csv`."""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from exaonepath_core.config import ProjectConfig, resolve_path
from exaonepath_core.data import cohort, patch_store, shard_store
from exaonepath_core.data.downstream.datasets import PAPER_ACCURACY, dataset_class, get_dataset
from exaonepath_core.data.synthetic.answer_key import tile_class_labels
from exaonepath_core.data.synthetic.spec import CLASS_NAMES
from exaonepath_core.data.tiling.dataset import TileDataset, tile_sets
from exaonepath_core.report import stage_tables
from exaonepath_core.stages import s02_normalize, s03_pretrain

SYNTHETIC_TASK = "synthetic_heldout"
REAL_HELDOUT_TASK = "heldout_slides"  # held-out real slides: no tissue labels, collapse metrics only
REAL_HELDOUT_SPLIT = "all"
UNLABELLED_TASKS = (REAL_HELDOUT_TASK,)


class SyntheticTileDataset:
    """Held-out synthetic tiles with a tissue class: (uint8 HWC, class, 'slide|x|y').

    Tiles whose majority class covers less than the purity threshold (mixed or background) have no label;
    they are left out and counted in `n_unlabelled` (reported in datasets.csv), never dropped silently.
    """

    def __init__(self, tile_sets: list, sidecars: dict[str, str]):
        self._tiles = TileDataset(tile_sets)
        labels = [tile_class_labels(sidecars[ts.slide_id], ts.coords, ts.level0_patch_size)
                  for ts in tile_sets if len(ts.coords)]
        labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        if len(labels) != len(self._tiles):
            raise RuntimeError(f"{len(labels)} labels for {len(self._tiles)} tiles")
        self.index = np.flatnonzero(labels >= 0)
        self.labels = labels[self.index]
        self.n_unlabelled = int((labels < 0).sum())
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        image, slide_id, x, y = self._tiles[int(self.index[i])]
        return image, int(self.labels[i]), f"{slide_id}|{int(x)}|{int(y)}"


def synthetic_probe_slides(held: pd.DataFrame) -> dict[str, list[str]]:
    """Leave-slides-out split of the held-out synthetic slides: within each site alternate slides go to
    `train` and `test`, so the tissue-class probe is scored on slides (and stains) it never saw."""
    split: dict[str, list[str]] = {"train": [], "test": []}
    for _, group in held.groupby("site", sort=True):
        ids = sorted(group["slide_id"])
        if len(ids) == 1:
            raise ValueError(f"site {group['site'].iloc[0]}: the tissue-class probe needs >= 2 held-out slides "
                             "per site (data.synthetic.heldout_slides_per_site)")
        split["train"] += ids[0::2]
        split["test"] += ids[1::2]
    return split


class HeldoutSlideTileDataset:
    """Tiles of held-out real slides, unlabelled: (uint8 HWC, -1, 'slide|x|y').

    At most `max_tiles_per_slide` tiles per slide (0 = all), a seeded subsample drawn per slide (the same tiles
    whatever other slides are present); `per_slide` counts available and kept tiles, `n_left_out` the rest.
    Tiles are read lazily through `TileDataset`, one at a time: no slide is held in memory.
    """

    name = REAL_HELDOUT_TASK
    split = REAL_HELDOUT_SPLIT
    class_names: tuple[str, ...] = ()  # unlabelled

    def __init__(self, tile_sets: list, max_tiles_per_slide: int = 0, seed: int = 0):
        if max_tiles_per_slide < 0:
            raise ValueError(f"max_tiles_per_slide must be >= 0 (0 = all), got {max_tiles_per_slide}")
        kept, rows = [], []
        for ts in tile_sets:
            n = len(ts.coords)
            if max_tiles_per_slide and n > max_tiles_per_slide:
                rng = np.random.default_rng([int(seed), zlib.crc32(ts.slide_id.encode())])
                idx = np.sort(rng.choice(n, size=max_tiles_per_slide, replace=False))
                ts = dataclasses.replace(ts, coords=ts.coords[idx], tissue_fraction=ts.tissue_fraction[idx])
            kept.append(ts)
            rows.append({"slide_id": ts.slide_id, "available": n, "kept": len(ts.coords)})
        self.max_tiles_per_slide = int(max_tiles_per_slide)
        self.per_slide = pd.DataFrame(rows, columns=["slide_id", "available", "kept"])
        self.n_available = int(self.per_slide["available"].sum())
        self.n_left_out = self.n_available - int(self.per_slide["kept"].sum())
        self._tiles = TileDataset(kept)

    def __len__(self) -> int:
        return len(self._tiles)

    def __getitem__(self, i: int):
        image, slide_id, x, y = self._tiles[int(i)]
        return image, -1, f"{slide_id}|{int(x)}|{int(y)}"

    def describe(self) -> dict[str, Any]:
        """What the feature manifest records about this dataset."""
        return {"name": self.name, "split": self.split, "n": len(self), "n_slides": len(self.per_slide),
                "n_available": self.n_available, "n_left_out_by_cap": self.n_left_out,
                "max_tiles_per_slide": self.max_tiles_per_slide, "labels": "none (-1): no tissue labels"}


def heldout_in_pretraining_stores(slides: pd.DataFrame, normalize_dir: Path) -> dict[str, list[str]]:
    """Held-out slides that a pretraining store under `normalize_dir` nevertheless holds (ledger status ok),
    per store. Stage 02 writes only train slides, but a store reused from a run with another held-out
    choice keeps the slides it wrote then; `write_pretrain_config` excludes them from pretraining."""
    held = set(slides.loc[slides.split == "heldout", "slide_id"])
    found: dict[str, list[str]] = {}
    for store_dir in sorted(p.parent for p in Path(normalize_dir).glob("*/manifest.json")):
        # .npy stores keep a ledger.csv, shard stores one record per slide, storeless indexes a slide list
        if (store_dir / "ledger.csv").is_file():
            ledger = patch_store.read_ledger(store_dir)
        elif (store_dir / "records").is_dir():
            ledger = shard_store.read_shard_ledger(store_dir)
        elif (store_dir / "slides.json").is_file():
            ids = json.loads((store_dir / "slides.json").read_text())["slide_ids"]
            ledger = pd.DataFrame({"slide_id": ids, "status": "ok"})
        else:
            continue
        leaked = sorted(held & set(ledger.loc[ledger.status == "ok", "slide_id"])) if len(ledger) else []
        if leaked:
            found[store_dir.name] = leaked
    return found


def _excluded_by_every_arm(cfg: ProjectConfig, pretrain_dir: Path) -> set[str]:
    """Slides that every arm's pretraining config excludes (empty when an arm has no config yet)."""
    excluded: set[str] | None = None
    for arm in cfg.arms:
        config_path = Path(pretrain_dir) / arm / "pretrain.yaml"
        if not config_path.is_file():
            return set()
        ids = set((yaml.safe_load(config_path.read_text()) or {}).get("exclude_slide_ids") or [])
        excluded = ids if excluded is None else excluded & ids
    return excluded or set()


def real_heldout_dataset(cfg: ProjectConfig, slides: pd.DataFrame, tiles_dir: Path | None
                         ) -> dict[str, Any] | None:
    """The `heldout_slides` entry of stage 04 (None when the run has no real slides): the held-out real
    slides' tiles with the per-slide cap, and a status that counts slides, sites, tiles, tiles left out by
    the cap, slides without coordinates and sites that could not hold out any slide."""
    real = slides[slides.source == "slides"]
    if real.empty:
        return None
    held = real[real.split == "heldout"]
    summary = cohort.real_heldout_summary(slides, int(cfg.data.heldout_slides_per_site))
    no_held = summary[summary.heldout == 0]
    sites_note = (f"; {len(no_held)} site(s) without held-out slides (too few slides): "
                  f"{', '.join(no_held.site.astype(str)[:10])}" if len(no_held) and cfg.data.heldout_slides_per_site
                  else "")
    if held.empty:
        how = ("data.heldout_slides_per_site is 0 and data.heldout_list is empty"
               if not (cfg.data.heldout_slides_per_site or cfg.data.heldout_list) else "no site had enough slides")
        return {"status": f"absent: no real slide held out ({how}){sites_note}", "splits": {}, "n": 0}
    sets = tile_sets(held, tiles_dir)
    n_missing = len(held) - len(sets)
    ds = HeldoutSlideTileDataset(sets, int(cfg.features.max_tiles_per_heldout_slide), cfg.seed)
    cap = cfg.features.max_tiles_per_heldout_slide
    counts = (f"{len(sets)} slides from {held.site.nunique()} sites, unlabelled (no tissue labels: class metrics "
              f"skipped); {len(ds)} of {ds.n_available} tiles, {ds.n_left_out} left out by the cap of "
              f"{cap or 'all'} per slide; {n_missing} held-out slide(s) without tile coordinates{sites_note}")
    if len(ds) == 0 or len(sets) < 2:
        return {"status": f"absent: the collapse metrics need tiles of >= 2 held-out slides ({counts})",
                "splits": {}, "n": 0}
    return {"status": f"present ({counts})", "splits": {REAL_HELDOUT_SPLIT: ds}, "n": len(ds)}


def feature_datasets(cfg: ProjectConfig, tiles_stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Datasets to embed: held-out synthetic slides (when generated), held-out real slides (when the run has
    real slide folders) and each configured downstream root.

    Raises when a held-out slide sits in a pretraining store of this run (see `heldout_in_pretraining_stores`).
    """
    out: dict[str, dict[str, Any]] = {}
    slides = cohort.read_slide_table(Path(tiles_stage_dir) / "slides.csv")
    leaked = heldout_in_pretraining_stores(slides, Path(tiles_stage_dir).parent / s02_normalize.SPEC.folder)
    excluded = _excluded_by_every_arm(cfg, Path(tiles_stage_dir).parent / s03_pretrain.SPEC.folder)
    leaked = {store: [s for s in ids if s not in excluded] for store, ids in leaked.items()}
    leaked = {store: ids for store, ids in leaked.items() if ids}
    if leaked:
        raise RuntimeError("held-out slides are in the pretraining patch store(s), so the collapse metrics would "
                           "measure slides the model trained on: " +
                           "; ".join(f"{store}: {', '.join(ids[:10])}" for store, ids in leaked.items()) +
                           f". A run with another held-out choice wrote them there (a store keeps every slide it "
                           f"wrote, even with --force): delete {Path(tiles_stage_dir).parent / s02_normalize.SPEC.folder}/"
                           f"<store> and rerun from stage 02 (./run_all.sh --from 02).")
    held = slides[(slides.source == "synthetic") & (slides.split == "heldout")]
    tiles_dir = None
    if (slides.split == "heldout").any():  # tiles.json names the parameter-named tiling folder of stage 01
        tiles_dir = Path(json.loads((Path(tiles_stage_dir) / "tiles.json").read_text())["tiles_dir"])
    if len(held):
        sidecars = dict(zip(held.slide_id, held.sidecar))
        splits, n_missing = {}, 0
        for name, ids in synthetic_probe_slides(held).items():
            chosen = held[held.slide_id.isin(ids)]
            sets = tile_sets(chosen, tiles_dir)
            n_missing += len(chosen) - len(sets)  # failed in stage 01 (its ledger says why): counted, not hidden
            splits[name] = SyntheticTileDataset(sets, sidecars)
        unlabelled = sum(ds.n_unlabelled for ds in splits.values())
        out[SYNTHETIC_TASK] = {"status": f"present ({unlabelled} mixed/background tiles without a class left out; "
                                         f"{n_missing} held-out slide(s) without tile coordinates)",
                               "splits": splits, "n": sum(len(v) for v in splits.values())}
    real_entry = real_heldout_dataset(cfg, slides, tiles_dir)
    if real_entry is not None:
        out[REAL_HELDOUT_TASK] = real_entry
    for name, root in cfg.data.downstream_roots.items():
        root_path = resolve_path(root)
        try:
            cls = dataset_class(name)
            wanted = [s for s in cls.probe_splits if s is not None]
            splits = {split: get_dataset(name, root_path, split, strict=cfg.strict_inputs)
                      for split in wanted}
            if cfg.features.max_samples_per_split:
                splits = {k: _subset(v, cfg.features.max_samples_per_split, cfg.seed) for k, v in splits.items()}
            out[name] = {"status": "present", "splits": splits, "n": sum(len(v) for v in splits.values())}
        # What the adapters raise for an absent or incomplete dataset (DatasetLayoutError is an OSError;
        # unknown split: ValueError; unknown name: KeyError): reported, never faked. Anything else is a bug.
        except (OSError, ValueError, KeyError) as err:
            kind = "unreadable" if root_path.exists() else "absent"  # there, but not laid out as expected
            out[name] = {"status": f"{kind}: {type(err).__name__}: {str(err).splitlines()[0]}", "splits": {},
                         "n": 0}
    for name in PAPER_ACCURACY:
        out.setdefault(name, {"status": "absent: no root configured", "splits": {}, "n": 0})
    return out


def _subset(ds, n: int, seed: int):
    """At most n samples (stratified when the adapter supports it), for quick profiles."""
    if len(ds) <= n:
        return ds
    if hasattr(ds, "subset"):
        return ds.subset(n, seed)
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return torch.utils.data.Subset(ds, idx.tolist())


def dataset_status_table(datasets: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per dataset: present/absent (with the reason) and sample counts per split."""
    rows = []
    for name, entry in datasets.items():
        rows.append({"dataset": name, "status": entry["status"].split(":")[0].split(" (")[0],
                     "detail": entry["status"], "n": entry["n"],
                     "splits": ",".join(f"{k}={len(v)}" for k, v in entry["splits"].items())})
    return pd.DataFrame(rows, columns=list(stage_tables.DATASET_STATUS_COLUMNS))

