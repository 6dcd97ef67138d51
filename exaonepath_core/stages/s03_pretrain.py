"""Stage 03, DINO pretraining, one run per arm (`raw`, `macenko` = the paper, `stain_augmentation`), each with
the same seed, data order and steps; training runs in a subprocess (torchrun for DDP) and an interrupted run
resumes from its last checkpoint. Outputs: `results/<run>/03_pretrain/<arm>/`."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from exaonepath_core.config import (
    REPO_ROOT,
    RESUME_MUTABLE_KEYS,
    PretrainConfig,
    ProjectConfig,
    store_for_arm,
)
from exaonepath_core.data import cohort
from exaonepath_core.io import atomic
from exaonepath_core.io.config_file import save_config
from exaonepath_core.pretrain import rank_checks
from exaonepath_core.pretrain.curves import plot_training_curves
from exaonepath_core.pretrain.launch import torchrun_command
from exaonepath_core.stages import s01_tile, s02_normalize
from exaonepath_core.stages.base import StageSpec, config_hash

SPEC = StageSpec("03", "03_pretrain_dino", "03_pretrain", ("arms", "pretrain", "nproc_per_node", "device"),
                 reuses_work=True, per_arm=True, needs_arms=True)


@dataclass
class PretrainResult:
    """What one arm's stage-03 run wrote, for its notebook to show."""

    pretrain_yaml: Path
    summary: dict
    training_curves: Path


def patches_config_hash(cfg: ProjectConfig) -> str:
    """The config hash of the stages that made the patch stores (01 tiling, 02 normalize): the runner's stage-02
    hash, so a run trained from other patches is recognised."""
    return config_hash(cfg, (s01_tile.SPEC, s02_normalize.SPEC))


def preflight(cfg: ProjectConfig) -> None:
    """Before any stage of a run that pretrains: a process count the device can hold (not after hours of
    tiling, as 8 CPU ranks killed for memory)."""
    if cfg.arms:
        rank_checks.check_nproc_per_node(cfg.nproc_per_node, cfg.device)


def write_pretrain_config(cfg: ProjectConfig, arm: str, normalize_dir: Path, out_dir: Path) -> Path:
    """The flat pretraining YAML of one arm: same settings and seed for every arm, only the input differs."""
    settings = dict(cfg.pretrain)
    data_source = cfg.pretrain_setting("data_source")
    # storeless tiles are raw: the macenko arm then normalizes them on the training device
    on_the_fly = arm == "macenko" and (bool(cfg.pretrain_setting("normalize_on_the_fly"))
                                       or data_source == "storeless")
    store = store_for_arm(arm, on_the_fly, data_source)
    slides_csv = Path(normalize_dir).parent / s01_tile.SPEC.folder / "slides.csv"
    heldout = []
    if slides_csv.is_file():
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
    record = {"settings": {k: v for k, v in settings.items() if k not in RESUME_MUTABLE_KEYS},
              "patches_config_hash": patches_config_hash(cfg)}
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
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_pretraining(pretrain_yaml: Path, out_dir: Path, nproc_per_node: int = 1, force: bool = False,
                    nnodes: int = 1, rdzv_endpoint: str = "") -> dict:
    """Run `exaonepath_core.pretrain.cli` in a subprocess (torchrun when nproc > 1); resume when a checkpoint exists.

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


def run(cfg: ProjectConfig, paths, arm: str, force: bool = False) -> PretrainResult:
    """Pretrain one arm (a finished run is reused unless `force`) and draw its training curves."""
    out = paths.stage_dir(SPEC.key) / arm
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    pretrain_yaml = write_pretrain_config(cfg, arm, paths.stage_dir(s02_normalize.SPEC.key), out)
    summary = run_pretraining(pretrain_yaml, out, nproc_per_node=cfg.nproc_per_node, force=force,
                              nnodes=cfg.nnodes, rdzv_endpoint=cfg.rdzv_endpoint)
    curves = plot_training_curves(out / "log.jsonl", out / "training_curves.png")
    return PretrainResult(pretrain_yaml, summary, Path(curves))
