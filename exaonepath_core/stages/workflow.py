"""Glue between stages: what the notebooks call to wire one stage's outputs into the next.

Each function here is small and reads only what an earlier stage wrote (`slides.csv`, tile coordinates,
patch stores, teacher exports, feature folders), so a stage can be rerun alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exaonepath_core.config import (
    INPUT_ARMS,
    REPO_ROOT,
    RESUME_MUTABLE_KEYS,
    PretrainConfig,
    ProjectConfig,
    pick_device,
    resolve_path,
    store_for_arm,
)
from exaonepath_core.io import atomic
from exaonepath_core.pretrain import rank_checks
from exaonepath_core.report import stage_tables

SYNTHETIC_TASK = "synthetic_heldout"
REAL_HELDOUT_TASK = "heldout_slides"  # held-out real slides: no tissue labels, collapse metrics only
REAL_HELDOUT_SPLIT = "all"
# Collapse cohorts: feature task -> `cohort` value in the stage-06 tables (synthetic first: its figures keep
# the historical file names collapse_metrics.png / embeddings_by_arm.png).
COLLAPSE_COHORTS = {SYNTHETIC_TASK: "synthetic", REAL_HELDOUT_TASK: "real"}
UNLABELLED_TASKS = (REAL_HELDOUT_TASK,)
FEATURES_INDEX_COLUMNS = list(stage_tables.FEATURES_INDEX_COLUMNS)  # stage 04's features_index.csv


# --------------------------------------------------------------------------------------------------------------
# small I/O
# --------------------------------------------------------------------------------------------------------------
def write_csv_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """CSV via temp file + rename."""
    return atomic.write_csv(df, path)


def device(cfg: ProjectConfig) -> str:
    """The run's device ('cuda' when present and device=auto)."""
    return pick_device(cfg.device)


# --------------------------------------------------------------------------------------------------------------
# stage 01/02
# --------------------------------------------------------------------------------------------------------------
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


def stain_reference(cfg: ProjectConfig):
    """The Macenko reference: the standard H&E one, or fitted once to `normalize.reference_image`."""
    from exaonepath_core.data.stain.macenko import fit_reference
    from exaonepath_core.data.stain.reference import MacenkoReference

    if not cfg.normalize.reference_image:
        return MacenkoReference.default()
    from PIL import Image

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
    import torch

    from exaonepath_core.data.stain.macenko import macenko_normalize_batch
    from exaonepath_core.data.tiling.dataset import read_tiles

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


# --------------------------------------------------------------------------------------------------------------
# stage 03
# --------------------------------------------------------------------------------------------------------------
def write_pretrain_config(cfg: ProjectConfig, arm: str, normalize_dir: Path, out_dir: Path) -> Path:
    """The flat pretraining YAML of one arm: same settings and seed for every arm, only the input differs."""
    import yaml

    settings = dict(cfg.pretrain)
    data_source = cfg.pretrain_setting("data_source")
    # storeless tiles are raw: the macenko arm then normalizes them on the training device
    on_the_fly = arm == "macenko" and (bool(cfg.pretrain_setting("normalize_on_the_fly"))
                                       or data_source == "storeless")
    store = store_for_arm(arm, on_the_fly, data_source)
    slides_csv = Path(normalize_dir).parent / "01_tiles" / "slides.csv"
    heldout = []
    if slides_csv.is_file():
        from exaonepath_core.data import cohort

        slides = cohort.read_slide_table(slides_csv)
        heldout = sorted(slides.loc[slides.split == "heldout", "slide_id"])
    settings.update(
        exclude_slide_ids=heldout,  # never trained on, even from a store reused across held-out choices
        data_root=str(Path(normalize_dir) / store),
        input_arm=arm,
        normalize_on_the_fly=on_the_fly,
        macenko_reference=str(Path(normalize_dir) / "reference.json"),
        output_dir=str(out_dir),
        seed=cfg.seed,
        device=cfg.device,
    )
    PretrainConfig.from_mapping(settings)  # validate now, with the key named, rather than in the subprocess
    _supersede_changed_run(cfg, Path(out_dir), settings)
    path = Path(out_dir) / "pretrain.yaml"
    text = yaml.safe_dump(settings, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return path  # unchanged: keep its time, so a finished run is recognised and reused
    return atomic.write_text(path, text)


def _supersede_changed_run(cfg: ProjectConfig, out_dir: Path, settings: dict[str, Any]) -> None:
    """Move an arm's earlier run aside when it was trained with other settings or from other patches.

    What must match to resume: every pretraining setting a resumed run may not change (training's
    RESUME_MUTABLE_KEYS may change: max_steps, checkpoint frequency, workers, ...) and the config of the
    stages that made its patch store (data, tiling, normalize). As with the runner's stage folders, a run of
    unknown inputs (no record) is kept; the trainer's own resume check still guards it.
    """
    from exaonepath_core.run.pipeline import stage_config_hash

    record = {"settings": {k: v for k, v in settings.items() if k not in RESUME_MUTABLE_KEYS},
              "patches_config_hash": stage_config_hash(cfg, "02")}
    record = json.loads(json.dumps(record))  # tuples -> lists, as read back
    record_path = out_dir / "run_inputs.json"
    has_run = any((out_dir / name).is_file() for name in ("checkpoint.pth", "teacher_backbone.pth"))
    old = json.loads(record_path.read_text()) if has_run and record_path.is_file() else record
    if old != record:
        changed = sorted(k for k in set(old["settings"]) | set(record["settings"])
                         if old["settings"].get(k) != record["settings"].get(k))
        if old.get("patches_config_hash") != record["patches_config_hash"]:
            changed.append("the patch store's config (data / tiling / normalize)")
        target = atomic.move_aside(out_dir)
        print(f"[pretrain] {out_dir.name}: trained with other settings ({', '.join(changed)}); the earlier run "
              f"moved aside to {target} (delete it when no longer needed); training from scratch", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(record_path, record)


def _die_with_parent() -> None:
    """(Linux, in the child before exec) SIGTERM the trainer when the process that started it dies.

    Killing the runner's process group misses the notebook kernel's children (the kernel has its own session);
    without this the trainer, or torchrun and its workers, would go on writing the run folder beside a rerun.
    """
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_pretraining(pretrain_yaml: Path, out_dir: Path, nproc_per_node: int = 1, force: bool = False,
                    nnodes: int = 1, rdzv_endpoint: str = "") -> dict:
    """Run `exaonepath_core.pretrain.training` in a subprocess (torchrun when nproc > 1); resume when a checkpoint exists.

    `nnodes` > 1 joins torchrun's c10d rendezvous at `rdzv_endpoint` (this node is one of them; the others run
    `python -m exaonepath_core.pretrain.launch` with the same settings, see tools/slurm/pretrain.sbatch).

    A finished run (teacher export present and newer than the config) is reused unless `force`.
    The subprocess's output goes to `train_stdout.log`; on failure its tail is raised in the error.
    """
    out_dir = Path(out_dir)
    teacher = out_dir / "teacher_backbone.pth"
    summary_path = out_dir / "summary.json"
    if not force and teacher.is_file() and summary_path.is_file() and \
            summary_path.stat().st_mtime >= Path(pretrain_yaml).stat().st_mtime:
        return {**json.loads(summary_path.read_text()), "reused": True}
    args = ["--config", str(pretrain_yaml)]
    if not force and (out_dir / "checkpoint.pth").is_file():
        args.append("--resume")
    from exaonepath_core.pretrain.launch import torchrun_command

    cmd = torchrun_command(args, nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)
    log_path = out_dir / "train_stdout.log"
    cmd = rank_checks.with_rank_logs(cmd, out_dir / rank_checks.TORCHRUN_LOG_DIR)  # named when a rank dies
    print("running:", " ".join(cmd), flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_start = log_path.stat().st_size if log_path.is_file() else 0  # the log is appended to across resumes
    with open(log_path, "a") as log:
        # check=False: a failed run is reported below with the tail of its log, which check=True would hide.
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, check=False,
                              preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
    if proc.returncode != 0:
        with open(log_path, "rb") as log:
            log.seek(log_start)
            this_run = log.read().decode(errors="replace")
        what = rank_checks.describe_failure(proc.returncode, this_run, log_path, out_dir / rank_checks.TORCHRUN_LOG_DIR)
        raise RuntimeError(f"{what}; last lines of {log_path}:\n{tail}")
    records = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    first = records[: max(1, len(records) // 10)]
    last = records[-max(1, len(records) // 10):]
    # training.train wrote summary.json (git state, world size, entropies, paths): keep all of it and add the
    # stage's view, smoothed over the first/last tenth of the log (one step's loss is noisy)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({
        "steps": int(records[-1].get("step", len(records))) if records else 0,
        "seconds": round(time.time() - t0, 1),
        "loss_first": float(np.mean([r["loss"] for r in first])) if records else float("nan"),
        "loss_last": float(np.mean([r["loss"] for r in last])) if records else float("nan"),
        "teacher_entropy_last": (float(np.mean([r.get("teacher_entropy", np.nan) for r in last]))
                                 if records else None),
        # training's median step rate (first step left out): robust to a loaded machine's spikes
        "img_per_s": summary.get("median_img_per_s"),
        "resumed": "--resume" in args,
    })
    atomic.write_json(summary_path, summary)
    print(tail)
    return summary


# --------------------------------------------------------------------------------------------------------------
# stage 04
# --------------------------------------------------------------------------------------------------------------
def backbone_specs(cfg: ProjectConfig, pretrain_dir: Path, features_dir: Path | None = None) -> dict[str, str]:
    """Backbones to embed with: each arm's teacher, the untrained initialisation (when asked) and
    `features.extra_backbones`."""
    specs = {f"dino_{arm}": f"ours:{Path(pretrain_dir) / arm / 'teacher_backbone.pth'}" for arm in cfg.arms}
    if cfg.features.include_untrained and features_dir is not None:
        specs.update(untrained_backbones(cfg, Path(features_dir) / "untrained_backbones",
                                         Path(pretrain_dir).parent / "02_normalize" / "reference.json"))
    for spec in cfg.features.extra_backbones:
        kind, _, target = spec.partition(":")
        if kind == "peer" and not _peer_weights_present(spec):
            continue  # listed as absent (with the reason) by peer_status; never replaced by random weights
        base = (f"peer_{target.partition('=')[0]}" if kind == "peer" else f"{kind}_{Path(target).stem}").replace(
            "/", "_")
        name = base
        if name in specs and Path(target).parent.name:  # two EXAONEPath.ckpt in different folders
            name = f"{kind}_{Path(target).parent.name}_{Path(target).stem}".replace("/", "_")
        n = 2
        while name in specs:  # never replace an earlier backbone
            name, n = f"{base}_{n}", n + 1
        specs[name] = spec
    return specs


def _peer_weights_present(spec: str) -> bool:
    """Whether a `peer:` spec's weights file can be found locally (prints why not)."""
    from exaonepath_core.models import peers
    from exaonepath_core.models.backbones import resolve_backbone_spec

    options = resolve_backbone_spec(spec)
    try:
        peers.resolve_weights(options["peer"], options.get("path"))
    except peers.PeerWeightsAbsent as err:
        print(f"[features] {spec}: absent ({err})", flush=True)
        return False
    return True


def untrained_backbones(cfg: ProjectConfig, out_dir: Path, reference_json: Path) -> dict[str, str]:
    """The pretraining arms' common starting point (same seed, same timm initialisation as `training.train`),
    exported twice: fed raw inputs and fed Macenko-normalized inputs. Comparing a trained arm with these
    separates what DINO learned from what the input transformation alone does to slide identifiability."""
    import torch

    from exaonepath_core.models.backbones import create_backbone

    pcfg = PretrainConfig.from_mapping(dict(cfg.pretrain))
    torch.manual_seed(cfg.seed)  # training.train seeds the same way before building the student
    model = create_backbone(pcfg.arch, pcfg.global_crop_size, pcfg.patch_size, drop_path_rate=pcfg.drop_path_rate)
    reference = json.loads(Path(reference_json).read_text()) if Path(reference_json).is_file() else None
    specs = {}
    for arm in ("raw", "macenko"):
        folder = Path(out_dir) / arm
        folder.mkdir(parents=True, exist_ok=True)
        weights = atomic.torch_save(model.state_dict(), folder / "teacher_backbone.pth")
        meta = {"arch": pcfg.arch, "patch_size": pcfg.patch_size or 16, "img_size": pcfg.global_crop_size,
                "embed_dim": int(model.num_features), "arm": arm, "macenko": arm == "macenko",
                "macenko_reference": reference if arm == "macenko" else None, "name": f"untrained_{arm}",
                "note": "untrained initialisation (seed as in pretraining)"}
        atomic.write_json(folder / "teacher_backbone.json", meta)
        specs[f"untrained_{arm}"] = f"ours:{weights}"
    return specs


def load_backbone_with_transform(spec: str, cfg: ProjectConfig):
    """Model (eval, on the run's device), its batch transform and info. Each backbone carries its own
    preprocessing: our macenko arm's teacher (its export records the arm and reference) and the official
    EXAONEPath checkpoint see Macenko-normalized inputs, the others raw inputs."""
    from exaonepath_core.models import backbones
    from exaonepath_core.models.backbones import resolve_backbone_spec

    options = resolve_backbone_spec(spec)  # paths read as the config check read them (repository root, ~)
    if options["kind"] == "exaonepath" and options.get("macenko_reference") is None:
        # the official checkpoint sees the run's Macenko reference, the one our macenko arm was trained with
        options["macenko_reference"] = stain_reference(cfg).to_dict()
        if not cfg.normalize.reference_image:
            print(f"[features] note: {spec} gets Macenko with the standard H&E reference; EXAONEPath's own code "
                  "fits its normaliser to one TCGA crop (target_TCGA-55-A48X_coords_[19440  9824]_[4096 4096].png "
                  "in its repository): set normalize.reference_image to that image to feed it the colours it "
                  "was trained on", flush=True)
    model, info = backbones.load_backbone(options)
    if options["kind"] == "peer":  # a peer keeps its authors' recipe (resize, crop, mean/std)
        return model.to(device(cfg)).eval(), backbones.make_transform(info), info
    # the run's evaluation recipe, the same for every backbone (features.center_crop_fraction), and the run's
    # Macenko estimate (normalize.Io / alpha / beta, as the macenko store was written) for those that normalize
    crop = info.preprocess.crop
    info.preprocess = dataclasses.replace(
        info.preprocess, crop=crop, resize=round(crop / cfg.features.center_crop_fraction),
        macenko_params=cfg.normalize.macenko_params() if info.preprocess.macenko else None)
    return model.to(device(cfg)).eval(), backbones.make_transform(info), info


class SyntheticTileDataset:
    """Held-out synthetic tiles with a tissue class: (uint8 HWC, class, 'slide|x|y').

    Tiles whose majority class covers less than the purity threshold (mixed or background) have no label;
    they are left out and counted in `n_unlabelled` (reported in datasets.csv), never dropped silently.
    """

    def __init__(self, tile_sets: list, sidecars: dict[str, str]):
        from exaonepath_core.data.synthetic.answer_key import tile_class_labels
        from exaonepath_core.data.synthetic.spec import CLASS_NAMES
        from exaonepath_core.data.tiling.dataset import TileDataset

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
    Tiles are read lazily through `tiling.dataset.TileDataset`, one at a time: no slide is held in memory.
    """

    name = REAL_HELDOUT_TASK
    split = REAL_HELDOUT_SPLIT
    class_names: tuple[str, ...] = ()  # unlabelled

    def __init__(self, tile_sets: list, max_tiles_per_slide: int = 0, seed: int = 0):
        import dataclasses
        import zlib

        from exaonepath_core.data.tiling.dataset import TileDataset

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
    from exaonepath_core.data import patch_store

    held = set(slides.loc[slides.split == "heldout", "slide_id"])
    found: dict[str, list[str]] = {}
    from exaonepath_core.data import shard_store

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
    import yaml

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
    from exaonepath_core.data import cohort
    from exaonepath_core.data.tiling.dataset import tile_sets

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
    from exaonepath_core.data import cohort
    from exaonepath_core.data.downstream.datasets import PAPER_ACCURACY, dataset_class, get_dataset
    from exaonepath_core.data.tiling.dataset import tile_sets

    out: dict[str, dict[str, Any]] = {}
    slides = cohort.read_slide_table(Path(tiles_stage_dir) / "slides.csv")
    leaked = heldout_in_pretraining_stores(slides, Path(tiles_stage_dir).parent / "02_normalize")
    excluded = _excluded_by_every_arm(cfg, Path(tiles_stage_dir).parent / "03_pretrain")
    leaked = {store: [s for s in ids if s not in excluded] for store, ids in leaked.items()}
    leaked = {store: ids for store, ids in leaked.items() if ids}
    if leaked:
        raise RuntimeError("held-out slides are in the pretraining patch store(s), so the collapse metrics would "
                           "measure slides the model trained on: " +
                           "; ".join(f"{store}: {', '.join(ids[:10])}" for store, ids in leaked.items()) +
                           f". A run with another held-out choice wrote them there (a store keeps every slide it "
                           f"wrote, even with --force): delete {Path(tiles_stage_dir).parent / '02_normalize'}/"
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
    import torch

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


# --------------------------------------------------------------------------------------------------------------
# stage 05
# --------------------------------------------------------------------------------------------------------------
def _slide_of(ids: np.ndarray) -> np.ndarray:
    return np.array([s.split("|", 1)[0] for s in ids])


def probe_feature_dirs(features_dir: Path) -> tuple[dict[str, dict[str, dict[str, Path]]], list[dict[str, str]]]:
    """{task: {backbone: {"train", "test"[, "val"]: folder}}} of the labelled feature folders a probe can use,
    and one row (task, backbone, missing) for each that lacks its train or test split (listed, never dropped)."""
    tasks: dict[str, dict[str, dict[str, Path]]] = {}
    incomplete = []
    for bdir in sorted(p for p in Path(features_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for ddir in sorted(p for p in bdir.iterdir() if p.is_dir() and p.name not in UNLABELLED_TASKS):
            splits = {s.name: s for s in ddir.iterdir() if (s / "manifest.json").is_file()}
            if not splits:  # not a feature folder (e.g. untrained_backbones/<arm>/ holds weights)
                continue
            missing = [name for name in ("train", "test") if name not in splits]
            if missing:
                incomplete.append({"task": ddir.name, "backbone": bdir.name, "missing": ", ".join(missing)})
                continue
            dirs = {"train": splits["train"], "test": splits["test"]}
            if "valid" in splits:
                dirs["val"] = splits["valid"]
            tasks.setdefault(ddir.name, {})[bdir.name] = dirs
    return tasks, incomplete


def run_all_probes(cfg: ProjectConfig, features_dir: Path, min_per_class: int = 10) -> pd.DataFrame:
    """Every task with train and test features: logistic probe and kNN over the configured seeds, long format.

    A task whose training split has fewer than `min_per_class` samples in some class (e.g. the 32-tile CRC
    subset) gets the kNN probe only, with k capped by the training size; the `note` column says so.
    Unlabelled tasks (`UNLABELLED_TASKS`: held-out real slides) are never probed; `probe_summary` lists them.
    """
    from exaonepath_core.evaluation import probes

    tasks, _ = probe_feature_dirs(features_dir)
    frames = []
    for task, dirs in sorted(tasks.items()):
        ytr = np.load(next(iter(dirs.values()))["train"] / "labels.npy")
        counts = np.bincount(ytr) if len(ytr) else np.zeros(1, int)
        smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0  # classes absent here do not count
        if smallest >= min_per_class:
            df = probes.run_probes(task, dirs, seeds=cfg.probes.seeds, n_boot=cfg.probes.n_boot,
                                   knn_k=cfg.probes.knn_k)
            df["note"] = ""
        else:
            k = max(1, min(cfg.probes.knn_k, len(ytr) - 1))
            df = probes.run_probes(task, dirs, seeds=cfg.probes.seeds[:1], probes=("knn",),
                                   n_boot=cfg.probes.n_boot, knn_k=k)
            df["note"] = f"kNN only (k={k}): {len(ytr)} training samples, smallest class {smallest}"
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else stage_tables.empty(stage_tables.PROBE_RESULTS_COLUMNS)


def _slides_table(cfg: ProjectConfig) -> pd.DataFrame | None:
    from exaonepath_core.data import cohort
    from exaonepath_core.io.paths import ResultsPaths

    p = ResultsPaths.for_profile(cfg.results_name, cfg.results_root).stage_dir("01", create=False) / "slides.csv"
    return cohort.read_slide_table(p) if p.is_file() else None


def task_chance(features_dir: Path) -> dict[str, float]:
    """Per probed task, the test accuracy of always answering the majority class (from its test labels)."""
    chance = {}
    for task, by_backbone in probe_feature_dirs(features_dir)[0].items():
        labels = np.load(next(iter(by_backbone.values()))["test"] / "labels.npy")
        if len(labels):
            chance[task] = float(np.bincount(labels).max() / len(labels))
    return chance


def probe_summary(results: pd.DataFrame, features_dir: Path) -> pd.DataFrame:
    """Top-1 accuracy per (task, backbone) beside the paper's numbers; the paper's tasks absent here say so."""
    from exaonepath_core.evaluation import probes

    status_csv = Path(features_dir) / "datasets.csv"
    available = {}
    if status_csv.is_file():
        table = pd.read_csv(status_csv)
        available = dict(zip(table["dataset"], table["detail"]))
    summary = probes.summary_table(results, available=available)
    skipped = [{"task": task, "backbone": "", "probe": "",
                "status": "not probed: no tissue labels (held-out real slides, collapse metrics only in stage 06)",
                "n_seeds": 0}
               for task in UNLABELLED_TASKS if str(available.get(task, "")).startswith("present")]
    if Path(features_dir).is_dir():
        skipped += [{"task": row["task"], "backbone": row["backbone"], "probe": "", "n_seeds": 0,
                     "status": f"not probed: no {row['missing']} split features (see stage 04's datasets.csv)"}
                    for row in probe_feature_dirs(features_dir)[1]]
    if skipped:
        summary = pd.concat([summary, pd.DataFrame(skipped, columns=summary.columns)], ignore_index=True)
    # a table people read: 4 decimals (no 0.7159999999999999, no std 1e-16 beside 0)
    numeric = ["mean", "std", "ci_low", "ci_high", "delta_vs_paper"]
    summary[numeric] = summary[numeric].astype(float).round(4)
    return summary


# --------------------------------------------------------------------------------------------------------------
# stage 06
# --------------------------------------------------------------------------------------------------------------
def _load_task_features(task_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(X, labels, sample ids) of every split of one task of one backbone, concatenated; None when absent."""
    from exaonepath_core.evaluation import features

    parts = [features.load_features(d) for d in sorted(Path(task_dir).glob("*")) if (d / "manifest.json").is_file()]
    if not parts:
        return None
    return (np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts]),
            np.concatenate([np.asarray(p[1]) for p in parts]),
            np.concatenate([np.asarray(p[2]) for p in parts]))


def collapse_by_arm(cfg: ProjectConfig, features_dir: Path) -> tuple[pd.DataFrame, dict]:
    """Collapse metrics of every backbone on every collapse cohort present, plus 2-D embeddings for the figures.

    Cohorts (`COLLAPSE_COHORTS`): `synthetic` (held-out synthetic slides, tissue labels known) and `real`
    (held-out real slides, no tissue labels: the class metrics are rows with NaN and a `skipped:` note).
    Returns (long table with a leading `cohort` column, {cohort: {arm: (xy, slide_ids, labels, sites)}}).
    """
    from exaonepath_core.evaluation import collapse
    from exaonepath_core.report import figures

    slides = _slides_table(cfg)
    slide_site = dict(zip(slides.slide_id, slides.site)) if slides is not None else {}
    frames, embeds = [], {}
    backbone_dirs = sorted(p for p in Path(features_dir).iterdir() if p.is_dir())
    for task, cohort_name in COLLAPSE_COHORTS.items():
        labelled = task not in UNLABELLED_TASKS
        for bdir in backbone_dirs:
            loaded = _load_task_features(bdir / task)
            if loaded is None:
                continue
            X, y, ids = loaded
            slide_ids = _slide_of(ids)
            sites = np.array([slide_site.get(s, "?") for s in slide_ids])
            df = collapse.collapse_metrics(X, slide_ids, class_labels=y if labelled else None, site_ids=sites,
                                           k=cfg.collapse.k, n_boot=cfg.collapse.n_boot, seed=cfg.seed)
            if not labelled:  # say why, in the words of the issue, rather than "no class labels given"
                df.loc[df.metric.isin(collapse.CLASS_METRICS), "note"] = "skipped: no tissue labels (real slides)"
            arm = bdir.name.removeprefix("dino_")
            df.insert(0, "arm", arm)
            df.insert(0, "cohort", cohort_name)
            frames.append(df)
            xy_idx = np.random.default_rng(cfg.seed).permutation(len(X))[: cfg.collapse.max_points]
            xy = figures.embedding_2d(X[xy_idx], method=cfg.collapse.embedding,
                                      max_points=cfg.collapse.max_points, seed=cfg.seed)
            labels = None
            if labelled:
                names = _class_names_of(bdir / task)
                labels = np.array([names[c] if 0 <= c < len(names) else "unlabelled" for c in y[xy_idx]]) \
                    if names else y[xy_idx]
            embeds.setdefault(cohort_name, {})[arm] = (xy, slide_ids[xy_idx], labels, sites[xy_idx])
    metrics = pd.concat(frames, ignore_index=True) if frames else stage_tables.empty(stage_tables.COLLAPSE_METRICS_COLUMNS)
    return metrics, embeds


def write_collapse_by_model(metrics: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """`collapse_by_model.csv` (every backbone, peers included, ranked by slide identifiability per cohort) and
    its figure; header-only table and a figure saying so when nothing was measured."""
    from exaonepath_core.report import comparison

    ranked = comparison.collapse_by_model(metrics)
    csv = write_csv_atomic(ranked, Path(out_dir) / "collapse_by_model.csv")
    return csv, comparison.plot_collapse_by_model(ranked, Path(out_dir) / "collapse_by_model.png")


def collapse_figure_paths(out_dir: Path, cohort_name: str) -> tuple[Path, Path]:
    """(metric bars, embeddings) PNG paths of one cohort; the synthetic cohort keeps the historical names."""
    suffix = "" if cohort_name == "synthetic" else f"_{cohort_name}"
    return Path(out_dir) / f"collapse_metrics{suffix}.png", Path(out_dir) / f"embeddings_by_arm{suffix}.png"


def write_collapse_figures(metrics: pd.DataFrame, embeds: dict, out_dir: Path) -> list[Path]:
    """Per cohort: metric bars (metrics with a value for some arm; skipped ones are in the CSV) and the
    embeddings by slide / class / site, one column per arm. Returns the PNGs written."""
    from exaonepath_core.report import figures

    written = []
    for cohort_name in dict.fromkeys(metrics["cohort"]) if len(metrics) else []:
        part = metrics[metrics.cohort == cohort_name]
        shown = [m for m in dict.fromkeys(part.metric) if part.loc[part.metric == m, "value"].notna().any()]
        bars, scatter = collapse_figure_paths(out_dir, cohort_name)
        written.append(figures.plot_collapse_bars(part, bars, metrics=shown))
        if embeds.get(cohort_name):
            written.append(figures.plot_embeddings_by_arm(embeds[cohort_name], scatter))
    return written


def _class_names_of(task_dir: Path) -> list[str]:
    for manifest in sorted(Path(task_dir).glob("*/manifest.json")):
        names = json.loads(manifest.read_text()).get("class_names")
        if names:
            return list(names)
    return []


def collapse_verdict(metrics: pd.DataFrame, class_margin: float = 0.05) -> pd.DataFrame:
    """The paper's claim as comparisons (long format), per cohort: each non-raw pretraining arm vs the raw arm,
    and the untrained initialisation fed Macenko vs raw inputs (what the normalization alone does). Extra
    backbones (timm models, the official checkpoint) are not compared: they differ in more than the input.

    Slide/site identifiability counts as `lower` only when the arm's 95 % interval lies wholly below the
    baseline's (`ci_high` < baseline `ci_low`); a lower point value whose intervals overlap is reported as
    "lower, CIs overlap" and does not count (a metric without intervals falls back to its point value, and says
    so). For the leave-one-slide-out class kNN, `kept` when it fell by at most `class_margin`. `claim_holds` per
    comparison: slide-ID probe and same-slide neighbours lower, tissue class kept. A cohort without tissue
    labels (real slides) gets the class row as "skipped: no tissue labels" and a claim_holds outcome that says
    only slide identity was checked."""
    if metrics.empty:
        return stage_tables.empty(stage_tables.COLLAPSE_VERDICT_COLUMNS)
    if "cohort" not in metrics.columns:
        return _verdict_of_cohort(metrics, class_margin)
    frames = []
    for cohort_name, part in metrics.groupby("cohort", sort=False):
        verdict = _verdict_of_cohort(part, class_margin)
        if len(verdict):
            verdict.insert(0, "cohort", cohort_name)
            frames.append(verdict)
    return pd.concat(frames, ignore_index=True) if frames else stage_tables.empty(stage_tables.COLLAPSE_VERDICT_COLUMNS)


def _lower_outcome(value: float, high: float, base: float, base_low: float) -> tuple[bool, str]:
    """Whether `value` (interval upper end `high`) is lower than `base` (lower end `base_low`) beyond their
    intervals, and the outcome text."""
    if not value < base:
        return False, "not lower"
    if any(pd.isna(x) for x in (high, base_low)):
        return True, "lower (point values; no CIs)"
    if high < base_low:
        return True, "lower (CIs apart)"
    return False, "lower, CIs overlap (not counted)"


def _verdict_of_cohort(metrics: pd.DataFrame, class_margin: float) -> pd.DataFrame:
    from exaonepath_core.evaluation import collapse

    table = {col: metrics.pivot_table(index="metric", columns="arm", values=col, aggfunc="first", dropna=False)
             if col in metrics.columns else None for col in ("value", "ci_low", "ci_high")}
    value = table["value"]

    def bound(col: str, metric: str, arm: str) -> float:
        frame = table[col]
        return float("nan") if frame is None else frame.loc[metric, arm]

    # the claim is about our pretraining arms (same network, data and schedule, another input); an extra
    # backbone (another architecture, another training) stays in the metrics table, described, not judged
    pairs = [(arm, "raw") for arm in value.columns if arm in INPUT_ARMS and arm != "raw"]
    if {"untrained_raw", "untrained_macenko"} <= set(value.columns):
        pairs.append(("untrained_macenko", "untrained_raw"))
    if {"raw", "untrained_raw"} <= set(value.columns):
        pairs.append(("raw", "untrained_raw"))
    identity = [collapse.SLIDE_PROBE, collapse.SAME_SLIDE_NEIGHBOURS, collapse.SILHOUETTE_SLIDE,
                collapse.SITE_PROBE, collapse.SAME_SITE_NEIGHBOURS]
    rows = []
    for arm, base in pairs:
        if base not in value.columns:
            continue
        checks = []
        for m in identity:
            if m in value.index and pd.notna(value.loc[m, arm]) and pd.notna(value.loc[m, base]):
                lower, outcome = _lower_outcome(value.loc[m, arm], bound("ci_high", m, arm), value.loc[m, base],
                                                bound("ci_low", m, base))
                rows.append({"comparison": f"{arm} vs {base}", "metric": m, "value": value.loc[m, arm],
                             "baseline": value.loc[m, base], "delta": value.loc[m, arm] - value.loc[m, base],
                             "outcome": outcome})
                if m in (collapse.SLIDE_PROBE, collapse.SAME_SLIDE_NEIGHBOURS):
                    checks.append(lower)
        m = collapse.KNN_LEAVE_ONE_SLIDE_OUT
        class_checked = m in value.index and pd.notna(value.loc[m, arm]) and pd.notna(value.loc[m, base])
        if class_checked:
            kept = bool(value.loc[m, base] - value.loc[m, arm] <= class_margin)
            rows.append({"comparison": f"{arm} vs {base}", "metric": m, "value": value.loc[m, arm],
                         "baseline": value.loc[m, base], "delta": value.loc[m, arm] - value.loc[m, base],
                         "outcome": "kept" if kept else f"fell by more than {class_margin}"})
            checks.append(kept)
        else:
            rows.append({"comparison": f"{arm} vs {base}", "metric": m, "value": float("nan"),
                         "baseline": float("nan"), "delta": float("nan"), "outcome": "skipped: no tissue labels"})
        holds = bool(checks) and all(checks)
        if class_checked:
            outcome = "holds" if holds else "does not hold"
        else:  # only the slide-identity half of the claim could be tested
            outcome = "slide identity lower; class not checked (no tissue labels)" if holds else "does not hold"
        rows.append({"comparison": f"{arm} vs {base}", "metric": "claim_holds", "value": float(holds),
                     "baseline": float("nan"), "delta": float("nan"), "outcome": outcome})
    return pd.DataFrame(rows, columns=[c for c in stage_tables.COLLAPSE_VERDICT_COLUMNS if c != "cohort"])


# --------------------------------------------------------------------------------------------------------------
# stage 07
# --------------------------------------------------------------------------------------------------------------
def report_items(cfg: ProjectConfig, paths) -> tuple[list, dict[str, pd.DataFrame]]:
    """Every figure and table of the run with one line of context, and the tables stage 07 writes."""
    from exaonepath_core.report.html_index import ReportItem

    s = {k: paths.stage_dir(k, create=False) for k in ("01", "02", "03", "04", "05", "06", "07")}
    items: list[ReportItem] = []
    tiles_json = s["01"] / "tiles.json"
    tiles_dir = Path(json.loads(tiles_json.read_text())["tiles_dir"]) if tiles_json.is_file() else s["01"]
    items.append(ReportItem("01 Tiling", s["01"] / "tiling_summary.csv", "slides, failures and tiles per source"))
    for qc in sorted(tiles_dir.glob("qc/*.png"), key=lambda p: (not p.stem.startswith("CMU"), p.name))[:4]:
        items.append(ReportItem("01 Tiling", qc, f"tissue mask and tile grid of {qc.stem}"))
    if cfg.data.synthetic.enabled:  # else not generated: no "missing" line for a figure the run never makes
        items.append(ReportItem("01 Tiling", s["01"] / "synthetic_examples.png",
                                "synthetic cohort: tissue classes (rows) by site (columns)"))
    items.append(ReportItem("02 Stain normalization", s["02"] / "normalize_summary.csv",
                            "patches per store and degenerate patches passed through (counted, not dropped)"))
    items.append(ReportItem("02 Stain normalization", s["02"] / "stain_qc.png", "before / after Macenko"))
    curves = []
    for arm in cfg.arms:
        items.append(ReportItem("03 DINO pretraining", s["03"] / arm / "training_curves.png",
                                f"arm {arm}: loss, schedules, teacher entropy"))
        sp = s["03"] / arm / "summary.json"
        if sp.is_file():
            curves.append({"arm": arm, **json.loads(sp.read_text())})
    tables: dict[str, pd.DataFrame] = {}
    if curves:
        tables["pretraining_summary"] = pd.DataFrame(curves)
        items.append(ReportItem("03 DINO pretraining", s["07"] / "pretraining_summary.csv",
                                "steps, first/last loss, teacher entropy, img/s per arm"))
    items.append(ReportItem("04 Features", s["04"] / "datasets.csv", "datasets present or absent (with reason)"))
    items.append(ReportItem("04 Features", s["04"] / "features_index.csv", "feature sets written"))
    items.append(ReportItem("05 Linear probes", s["05"] / "probe_summary.csv",
                            "top-1 accuracy per task and backbone beside the paper's reported numbers"))
    items.append(ReportItem("05 Linear probes", s["05"] / "probe_results.png", "probe metrics with 95% intervals"))
    items.append(ReportItem("05 Linear probes", s["05"] / "probe_results_long.csv", "every probe, seed and metric"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_verdict.csv",
                            "the paper's claim per cohort and arm vs raw: slide identifiability lower, tissue "
                            "class kept (not checked on real slides: no tissue labels)"))
    cohorts = ["synthetic"]  # no table: its figures are listed as missing
    found = stage_tables.read_table(s["06"] / "collapse_metrics.csv")
    if found is not None and found.empty:
        cohorts = []  # nothing measured: no figure to list (the preamble's "not measured" list says why)
    elif found is not None and "cohort" in found.columns:
        cohorts = list(dict.fromkeys(found["cohort"]))
    for cohort_name in cohorts:
        bars, scatter = collapse_figure_paths(s["06"], cohort_name)
        what = ("held-out synthetic slides" if cohort_name == "synthetic"
                else f"held-out {cohort_name} slides (no tissue labels)")
        items.append(ReportItem("06 Feature collapse", bars, f"collapse metrics per arm: {what}"))
        items.append(ReportItem("06 Feature collapse", scatter,
                                f"embeddings coloured by slide, class and site, one column per arm: {what}"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_metrics.csv", "all collapse metrics"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_by_model.csv",
                            "every backbone (peers included) ranked by slide identifiability, per cohort"))
    items.append(ReportItem("06 Feature collapse", s["06"] / "collapse_by_model.png",
                            "slide-ID probe and same-slide neighbours per model, in rank order"))
    items.append(ReportItem("Model comparison (paper's table and Figure 1)", s["07"] / "model_comparison.csv",
                            "published top-1 of every model of the paper beside this run's measured rows "
                            "(95 % intervals); avg only over all six tasks"))
    items.append(ReportItem("Model comparison (paper's table and Figure 1)", s["07"] / "model_comparison.png",
                            "six-task average vs parameters and vs WSIs (log x): published circles, measured "
                            "diamonds"))
    items.append(ReportItem("Model comparison (paper's table and Figure 1)", s["07"] / "peer_status.csv",
                            "each registered peer: measured, absent (why) or not configured"))
    summary_csv = s["05"] / "probe_summary.csv"
    if summary_csv.is_file():
        tables["paper_table"] = pd.read_csv(summary_csv)
        items.insert(0, ReportItem("Headline", s["07"] / "paper_table.csv",
                                   "six-task table beside the paper (absent datasets marked absent)"))
    for nb in sorted(paths.notebooks_dir.glob("*.ipynb")):
        items.append(ReportItem("Executed notebooks", nb, "executed copy with outputs"))
    return items, tables


def write_model_comparison(cfg: ProjectConfig, paths) -> tuple[Path, Path]:
    """Stage 07's `model_comparison.csv` (published rows beside this run's measured ones) and `.png` (Figure 1),
    plus `peer_status.csv` (measured / absent with the reason / not configured per registered model)."""
    from exaonepath_core.report import comparison

    features_dir, out = paths.stage_dir("04", create=False), paths.stage_dir("07")
    backbones = sorted(p.name for p in features_dir.iterdir() if p.is_dir()) if features_dir.is_dir() else []
    status = comparison.peer_status(cfg.features.extra_backbones, backbones)
    write_csv_atomic(status, out / "peer_status.csv")
    summary_csv = paths.stage_dir("05", create=False) / "probe_summary.csv"
    summary = pd.read_csv(summary_csv) if summary_csv.is_file() and summary_csv.stat().st_size > 1 else pd.DataFrame()
    table = comparison.model_comparison_table(summary, status)
    csv = write_csv_atomic(table, out / "model_comparison.csv")
    return csv, comparison.plot_model_comparison(table, out / "model_comparison.png")


def report_preamble(cfg: ProjectConfig, paths) -> str:
    """A paragraph: profile, git state, time per stage from the done-markers."""
    import html

    from exaonepath_core.io.paths import STAGES

    try:  # check=False: outside a git checkout the report still renders, with "?" for the commit
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, check=False)
        sha = proc.stdout.strip() if proc.returncode == 0 else "?"
    except OSError:  # no git executable
        sha = "?"
    times = []
    for key, (nb, _) in STAGES.items():
        marker = paths.done_marker(key)
        if marker.is_file():
            times.append(f"{nb}: {json.loads(marker.read_text()).get('seconds', '?')} s")
    run = "" if cfg.results_name == cfg.profile else f" (run <b>{html.escape(cfg.results_name)}</b>)"
    return (f"<p>Profile <b>{html.escape(cfg.profile)}</b>{run}, git {html.escape(sha)}, device {device(cfg)}. "
            f"Stage times: {html.escape('; '.join(times) or 'n/a')}. Resolved config: "
            f"<a href='config.yaml'>config.yaml</a>.</p>" + verdict_paragraph(paths.stage_dir("06", create=False))
            + stage_tables.not_measured_html(stage_tables.not_measured(
                {k: paths.stage_dir(k, create=False) for k in ("04", "05", "06")}, list(cfg.arms))))


def verdict_paragraph(collapse_dir: Path) -> str:
    """The paper's claim in words, per cohort and comparison, from stage 06's verdict table ('' without it)."""
    import html

    try:
        verdict = pd.read_csv(Path(collapse_dir) / "collapse_verdict.csv")
    except (OSError, ValueError):
        return ""
    if "metric" not in verdict.columns:
        return ""
    claims = verdict[verdict["metric"] == "claim_holds"]
    if claims.empty:
        return ""
    parts = []
    for _, row in claims.iterrows():
        cohort = f"{row['cohort']}: " if "cohort" in claims.columns else ""
        parts.append(f"{html.escape(cohort + str(row['comparison']))} &rarr; <b>{html.escape(str(row['outcome']))}</b>")
    return ("<p>The paper's claim (stain normalization lowers slide identifiability of held-out slides, 95 % "
            "intervals apart, while the tissue class stays predictable): " + "; ".join(parts)
            + ". Details: <a href='06_collapse/collapse_verdict.csv'>collapse_verdict.csv</a>.</p>")
