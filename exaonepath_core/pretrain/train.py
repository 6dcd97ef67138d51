"""DINO pretraining: `train` sets a run up as dino's `train_dino()` (data, networks, loss, optimizer, schedules,
resume) and `train_one_epoch` runs one epoch of steps, as dino's `train_one_epoch()`.

Command line: `python -m exaonepath_core.pretrain.cli` (also under torchrun for DDP).

Stop signals (SIGTERM, SIGUSR1) checkpoint after the current step and exit with code 75 (preemption.py); a
resume may use another world size, continuing from the same sample position of the epoch (elastic.py).

Exact resume: each epoch's data order is a seeded per-rank permutation, each sample's augmentations are seeded
from (seed, epoch, index), schedules are indexed by the global step, and the RNG state (drop-path) is saved with
the checkpoint; a resumed run skips the first k batches of the interrupted epoch without loading them.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from exaonepath_core.config import ConfigError, PretrainConfig
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.io import atomic
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import checkpoint, elastic, loss, prefetch, schedules, train_metrics
from exaonepath_core.pretrain.datasets import (
    EpochSampler,
    MultiCropCollate,
    MultiCropDataset,
    epoch_indices,
    load_patch_dataset,
    stain_function,
)
from exaonepath_core.pretrain.head import DINOHead, MultiCropWrapper
from exaonepath_core.pretrain.multicrop import MultiCropAugmentation
from exaonepath_core.pretrain.preemption import Preempted, StopRequest
from exaonepath_core.pretrain.runtime import Runtime, init_distributed, prepare_run, sole_writer
from exaonepath_core.pretrain.schedules import cosine_schedule_steps, warmup_then_constant_steps
from exaonepath_core.pretrain.step import DINOTrainStep, NonFiniteLossError, make_optimizer, run_precision


def train(cfg: PretrainConfig, resume: bool = False, dataset: Dataset | None = None) -> dict[str, Any]:
    """Run (or resume) DINO pretraining as configured; returns a summary dict (also written to summary.json).

    `dataset` replaces the patch store named by `cfg.data_root` (any map-style dataset of uint8 (T, T, 3) arrays).
    """
    runtime = init_distributed(cfg)
    try:
        with sole_writer(Path(cfg.output_dir), runtime.rank == 0):
            return _train(cfg, runtime, resume, dataset)
    finally:
        if runtime.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def run_schedules(
    cfg: PretrainConfig, total_steps: int, steps_per_epoch: int, global_batch: int, announce: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The per-step lr, weight decay, teacher momentum and teacher temperature, and the frozen-last-layer steps.

    Schedule lengths in epochs (fractional allowed) are rounded to whole steps of this run's steps per epoch;
    "N steps" are taken as written.
    """
    lengths = {name: schedules.length_in_steps(name, getattr(cfg, name), steps_per_epoch)
               for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer")}
    if lengths["warmup_epochs"] > total_steps:
        raise ConfigError(f"warmup_epochs ({cfg.warmup_epochs!r}) is {lengths['warmup_epochs']} steps, more than "
                          f"the run's {total_steps} steps (epochs={cfg.epochs}, {steps_per_epoch} steps per epoch)")
    if announce:
        print(f"[pretrain] schedules in steps: {total_steps} in all, lr warm-up {lengths['warmup_epochs']}, "
              f"teacher temperature warm-up {lengths['warmup_teacher_temp_epochs']}, last layer frozen "
              f"{lengths['freeze_last_layer']} ({steps_per_epoch} steps per epoch, global batch {global_batch})",
              flush=True)
    lr = cosine_schedule_steps(cfg.lr * global_batch / 256.0, cfg.min_lr, total_steps, lengths["warmup_epochs"])
    wd = cosine_schedule_steps(cfg.weight_decay, cfg.weight_decay_end, total_steps)
    momentum = cosine_schedule_steps(cfg.momentum_teacher, 1.0, total_steps)
    teacher_temp = warmup_then_constant_steps(cfg.warmup_teacher_temp, cfg.teacher_temp,
                                              lengths["warmup_teacher_temp_epochs"], total_steps)
    return lr, wd, momentum, teacher_temp, lengths["freeze_last_layer"]


# ----------------------------------------------------------------------------------------------------------------
# Set-up (dino's train_dino)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    """The training set, its multi-crop and the run's length in steps."""

    patches: Dataset
    augmentation: MultiCropAugmentation
    crop_dataset: MultiCropDataset
    collate: MultiCropCollate
    views_in_loader: bool
    normalize_batch: Any
    macenko_reference: MacenkoReference | None
    n_patches: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    last_step: int
    unused_per_epoch: int


@dataclass
class _Run:
    """Everything the loop reads (set up once) and the state it carries from step to step and epoch to epoch."""

    cfg: PretrainConfig
    runtime: Runtime
    output_dir: Path
    data: _Data
    student: nn.Module
    student_net: MultiCropWrapper
    teacher_net: MultiCropWrapper
    optimizer: torch.optim.Optimizer
    train_step: DINOTrainStep
    schedules: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
    global_batch: int
    checkpoint_path: Path
    position: elastic.DataPosition
    center: torch.Tensor
    step: int
    last_saved_step: int | None
    losses: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    last_record: dict[str, Any] = field(default_factory=dict)
    pending: list[torch.Tensor] = field(default_factory=list)  # device losses since the last host read
    t_read: float = 0.0  # throughput is measured between host reads (data loading included)

    @property
    def is_main(self) -> bool:
        return self.runtime.rank == 0


def _build_data(cfg: PretrainConfig, runtime: Runtime, dataset: Dataset | None) -> _Data:
    """The patches, their multi-crop (in the loader or on the device) and the run's length in steps."""
    device = runtime.device
    patches = dataset if dataset is not None else load_patch_dataset(cfg)
    augmentation = MultiCropAugmentation(
        global_size=cfg.global_crop_size,
        local_size=cfg.local_crop_size,
        n_local=cfg.n_local_crops,
        global_scale=tuple(cfg.global_crop_scale),
        local_scale=tuple(cfg.local_crop_scale),
        blur_sigma=tuple(cfg.blur_sigma),
    )
    crop_dataset = MultiCropDataset(
        patches, augmentation, seed=cfg.seed, stain_augmentation=cfg.input_arm == "stain_augmentation"
    )
    # multi-crop pixel work: batched in the loader (its workers overlap it with the step) on CPU; on the
    # training device for CUDA and for on-the-fly normalisation (which must come first)
    views_in_loader = device.type == "cpu" and not cfg.normalize_on_the_fly
    collate = MultiCropCollate(augmentation, apply_views=views_in_loader)
    normalize_batch, macenko_reference = None, None
    if cfg.normalize_on_the_fly:
        normalize_batch = stain_function("macenko_normalize_batch")
        macenko_reference = (MacenkoReference.from_json(cfg.macenko_reference) if cfg.macenko_reference
                             else MacenkoReference.default())
    n_patches = len(patches)
    per_rank = len(epoch_indices(n_patches, runtime.rank, runtime.world_size, cfg.seed, 0))
    batch_size = cfg.batch_size_per_gpu
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{n_patches} patches give {per_rank} per rank, fewer than one batch of {batch_size}")
    total_steps = schedules.length_in_steps("epochs", cfg.epochs, steps_per_epoch)
    last_step = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    # the epoch's permutation is cut to whole batches on every rank (DINO's drop_last): the rest of the
    # patches sit out that epoch only (another random set each epoch), counted here rather than unmentioned
    unused_per_epoch = n_patches - steps_per_epoch * batch_size * runtime.world_size
    if runtime.rank == 0:
        print(f"[pretrain] data: {n_patches} patches, arm={cfg.input_arm}, {steps_per_epoch} steps/epoch "
              f"({unused_per_epoch} patches sit out each epoch: whole batches only, another set each epoch), "
              f"{total_steps} steps in {cfg.epochs} epochs, stopping at step {last_step}", flush=True)
    return _Data(patches, augmentation, crop_dataset, collate, views_in_loader, normalize_batch, macenko_reference,
                 n_patches, batch_size, steps_per_epoch, total_steps, last_step, unused_per_epoch)


def _build_networks(cfg: PretrainConfig, runtime: Runtime) -> tuple[nn.Module, MultiCropWrapper, MultiCropWrapper]:
    """(student as run: DDP-wrapped under torchrun, student, teacher): identical initialisation on every rank."""
    device = runtime.device
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    student_backbone = create_backbone(cfg.arch, cfg.global_crop_size, cfg.patch_size,
                                       drop_path_rate=cfg.drop_path_rate)
    embed_dim = int(student_backbone.num_features)
    head_kwargs = {"in_dim": embed_dim, "out_dim": cfg.out_dim, "hidden_dim": cfg.head_hidden_dim,
                   "bottleneck_dim": cfg.head_bottleneck_dim, "nlayers": cfg.head_nlayers}
    student_net = MultiCropWrapper(
        student_backbone, DINOHead(**head_kwargs, norm_last_layer=cfg.norm_last_layer,
                                   fp32_last_layer=cfg.fp32_last_layer)
    )
    teacher_net = MultiCropWrapper(
        create_backbone(cfg.arch, cfg.global_crop_size, cfg.patch_size, drop_path_rate=0.0),
        DINOHead(**head_kwargs, fp32_last_layer=cfg.fp32_last_layer),
    )
    student_net.to(device)
    teacher_net.to(device)
    teacher_net.load_state_dict(student_net.state_dict())
    for param in teacher_net.parameters():
        param.requires_grad_(False)
    teacher_net.eval()
    if cfg.channels_last:
        student_net.to(memory_format=torch.channels_last)
        teacher_net.to(memory_format=torch.channels_last)
    if cfg.compile:
        # in place, so state_dict keys keep the timm layout
        student_net.backbone.compile()
        teacher_net.backbone.compile()
    student: nn.Module = student_net
    if dist.is_initialized():
        student = nn.parallel.DistributedDataParallel(
            student_net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if runtime.rank == 0:
        n_params = sum(p.numel() for p in student_net.backbone.parameters())
        print(f"[pretrain] networks: {cfg.arch} (patch {cfg.patch_size or 'default'}, {n_params / 1e6:.2f}M "
              f"backbone parameters, embed_dim {embed_dim}) + DINO head out_dim {cfg.out_dim}", flush=True)
    return student, student_net, teacher_net


def _set_up(cfg: PretrainConfig, runtime: Runtime, resume: bool, dataset: Dataset | None,
            git: dict[str, Any]) -> _Run:
    """Data, networks, loss, optimizer, schedules and (optionally) the resumed state, as dino's `train_dino()`."""
    is_main = runtime.rank == 0
    device = runtime.device
    output_dir = Path(cfg.output_dir)

    # ============ data ... ============
    data = _build_data(cfg, runtime, dataset)

    # ============ building student and teacher networks ... ============
    student, student_net, teacher_net = _build_networks(cfg, runtime)

    # ============ preparing loss ... ============
    center = torch.zeros(1, cfg.out_dim, device=device)

    # ============ preparing optimizer ... ============
    optimizer = make_optimizer(student_net, cfg.fused_adamw)
    train_step = DINOTrainStep(student, student_net, teacher_net, optimizer, student_temp=cfg.student_temp,
                               centering=cfg.centering, sinkhorn_iterations=cfg.sinkhorn_iterations,
                               clip_grad=cfg.clip_grad, clip_grad_mode=cfg.clip_grad_mode,
                               precision=run_precision(cfg, device))
    if is_main:
        print(f"[pretrain] precision: {train_step.precision} (head's last layer and loss "
              f"{'fp32' if cfg.fp32_last_layer else 'autocast'}); non-finite check "
              f"{'on the device, read every log_every steps' if train_step.sync_free else 'every step'}", flush=True)

    # ============ init schedulers ... ============
    global_batch = data.batch_size * runtime.world_size
    run_schedule = run_schedules(cfg, data.total_steps, data.steps_per_epoch, global_batch, announce=is_main)

    # ============ optionally resume training ... ============
    checkpoint_path = output_dir / checkpoint.CHECKPOINT_NAME
    position = elastic.DataPosition(0, 0)  # the epoch offset is non-zero only in an epoch resumed at a new size
    if resume:
        position, center = checkpoint.resume(checkpoint_path, cfg, runtime, student_net, teacher_net, optimizer,
                                             center, n_patches=data.n_patches, steps_per_epoch=data.steps_per_epoch)
    elif is_main and checkpoint_path.exists():
        print(f"[pretrain] note: {checkpoint_path} exists and will be overwritten (pass --resume to continue it)",
              flush=True)
    if is_main:
        # written once the resume is accepted: a refused one leaves the record of the run it refused to continue
        atomic.write_text(output_dir / "pretrain_config.json",
                          json.dumps({**cfg.to_dict(), **git, "world_size": runtime.world_size}, indent=2) + "\n")
        # the old numbering after a world-size change
        checkpoint.truncate_log(output_dir / checkpoint.LOG_NAME, position.logged_step)
    # drop-path draws differ per rank; on resume the saved per-rank state was restored above
    if position.logged_step == 0:  # a fresh start (a resize may map a resumed run to step 0: it keeps its state)
        torch.manual_seed(cfg.seed + runtime.rank)
    start_step = position.step
    last_saved_step = start_step if resume and checkpoint_path.exists() else None
    return _Run(cfg, runtime, output_dir, data, student, student_net, teacher_net, optimizer, train_step,
                run_schedule, global_batch, checkpoint_path, position, center, start_step, last_saved_step)


# ----------------------------------------------------------------------------------------------------------------
# The loop (dino's train_one_epoch)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Outputs:
    """Where the loop reports: the progress bar, log.jsonl, the live curves, the stop request (rank 0's sinks)."""

    progress: Any
    log_handle: Any
    live_metrics: train_metrics.LiveMetrics
    stop_request: StopRequest


def _train(cfg: PretrainConfig, runtime: Runtime, resume: bool, dataset: Dataset | None) -> dict[str, Any]:
    git = prepare_run(cfg, runtime)
    run = _set_up(cfg, runtime, resume, dataset, git)
    start_step = run.step
    steps_per_epoch = run.data.steps_per_epoch

    # ============ training ... ============
    if run.is_main:
        print(f"[pretrain] starting at step {start_step} (epoch {start_step // steps_per_epoch})", flush=True)
    progress = None
    if run.is_main and cfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=run.data.last_step, initial=start_step, desc=f"DINO {cfg.input_arm}",
                        mininterval=2.0, dynamic_ncols=True)
    live_metrics = train_metrics.open_live_metrics(cfg, run.output_dir, run.is_main, start_step)  # closed below
    log_handle = open(run.output_dir / checkpoint.LOG_NAME, "a") if run.is_main else None  # noqa: SIM115 (closed below)
    # SIGTERM / SIGUSR1: checkpoint at the next step boundary, then exit
    outputs = _Outputs(progress, log_handle, live_metrics, StopRequest().install())
    t_start = time.perf_counter()
    run.t_read = t_start
    try:
        for epoch in range(start_step // steps_per_epoch, math.ceil(run.data.total_steps / steps_per_epoch)):
            if run.step >= run.data.last_step:
                break
            train_one_epoch(run, epoch, outputs)
    finally:
        outputs.stop_request.uninstall()
        if progress is not None:
            progress.close()
        if log_handle is not None:
            log_handle.close()
        live_metrics.close()
    return _finish(run, start_step, t_start, git)


def _epoch_loader(run: _Run, epoch: int) -> DataLoader:
    """This rank's loader for `epoch`, skipping (without loading) the batches a resumed run already trained on."""
    cfg, runtime, data = run.cfg, run.runtime, run.data
    indices = elastic.rank_epoch_indices(
        data.n_patches, runtime.rank, runtime.world_size, cfg.seed, epoch, steps_per_epoch=data.steps_per_epoch,
        batch_size=data.batch_size, step=run.step, offset=run.position.offset_at(run.step, data.steps_per_epoch))
    return DataLoader(
        data.crop_dataset,
        batch_size=data.batch_size,
        sampler=EpochSampler(indices, epoch),
        collate_fn=data.collate,
        num_workers=cfg.num_workers,
        pin_memory=runtime.device.type == "cuda",
        drop_last=True,
        # a private generator keeps the global RNG (drop-path) untouched by loader start-up
        generator=torch.Generator().manual_seed(cfg.seed + epoch),
        persistent_workers=False,
    )


def _views(run: _Run, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The batch's views (made in the loader, or here on the device after on-the-fly normalisation) and the
    count of background patches normalisation fell back on (a device tensor; None without normalisation)."""
    data = run.data
    n_fallback = None
    if data.views_in_loader:
        views = batch
    else:
        patches_batch, params = batch
        if data.normalize_batch is not None:
            # background patches: counted (read with the log record), never dropped
            patches_batch, fallback = data.normalize_batch(patches_batch, data.macenko_reference)
            n_fallback = fallback.sum()
        views = data.augmentation.apply(patches_batch, params)
    if run.cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views, n_fallback


def train_one_epoch(run: _Run, epoch: int, outputs: _Outputs) -> None:
    """The steps of `epoch` from `run.step` on (stopping at the run's last step); host reads only every
    `log_every` steps, before a checkpoint (a stop's too), or every step when the step cannot skip a bad update
    on the device."""
    cfg = run.cfg
    lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, freeze_steps = run.schedules
    # on CUDA the next batch is copied (pinned, on a side stream) while this step runs
    for batch in prefetch.to_device(_epoch_loader(run, epoch), run.runtime.device):
        if run.step >= run.data.last_step:
            break
        views, n_fallback = _views(run, batch)
        step = run.step
        result = run.train_step(views, run.center, lr=float(lr_schedule[step]),
                                weight_decay=float(wd_schedule[step]), teacher_temp=float(teacher_temp_schedule[step]),
                                momentum=float(momentum_schedule[step]), freeze_last_layer=step < freeze_steps)
        run.center = run.train_step.next_center(run.center, result.teacher_out, cfg.center_momentum)
        run.step = step = step + 1
        run.pending.append(result.loss_tensor)
        log_now = step % cfg.log_every == 0 or step == run.data.last_step
        checkpoint_now = step % cfg.saveckp_freq == 0 and step < run.data.last_step
        stop = outputs.stop_request.agreed() and step < run.data.last_step  # collective: every rank, every step
        if not (log_now or checkpoint_now or stop or not run.train_step.sync_free):
            continue
        _read_and_log(run, epoch, result, n_fallback, outputs, log_now)
        if checkpoint_now or stop:
            _save(run)
        if stop:
            if dist.is_initialized():
                dist.barrier()  # no rank closes the process group while rank 0 still writes
            raise Preempted(step, outputs.stop_request.received or "a stop signal", str(run.checkpoint_path))


def _read_and_log(run: _Run, epoch: int, result: Any, n_fallback: torch.Tensor | None, outputs: _Outputs,
                  log_now: bool) -> None:
    """The host read: the pending losses (raising on a non-finite one), throughput, the log record."""
    cfg, device, step = run.cfg, run.runtime.device, run.step
    lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, _ = run.schedules
    step_losses = torch.stack(run.pending).float().cpu().tolist()
    first_step = step - len(run.pending) + 1
    run.pending.clear()
    bad = [(first_step + i, v) for i, v in enumerate(step_losses) if not math.isfinite(v)]
    if bad:
        where = (f"the last good checkpoint {run.checkpoint_path} (step {run.last_saved_step}) is intact"
                 if run.last_saved_step is not None else "no checkpoint was written yet")
        raise NonFiniteLossError(
            f"loss is {bad[0][1]} at step {bad[0][0] - 1} (epoch {(bad[0][0] - 1) // run.data.steps_per_epoch}); "
            f"training stopped before that update reached the weights or the teacher, {where}"
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    img_per_s = run.global_batch * len(step_losses) / max(now - run.t_read, 1e-9)
    run.t_read = now
    run.losses.extend(step_losses)
    run.rates.append(img_per_s)
    loss_value = step_losses[-1]
    stats = loss.target_stats(result.teacher_p, run.center)
    run.last_record = {
        "step": step, "epoch": epoch, "loss": loss_value, "lr": float(lr_schedule[step - 1]),
        "wd": float(wd_schedule[step - 1]), "momentum": float(momentum_schedule[step - 1]),
        "teacher_temp": float(teacher_temp_schedule[step - 1]),
        **stats, "grad_norm": result.grad_norm, "img_per_s": img_per_s,
        "macenko_fallback": None if n_fallback is None else int(n_fallback),
        "centering": cfg.centering,
        "gpu_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }
    if outputs.log_handle is not None and log_now:
        outputs.log_handle.write(json.dumps(run.last_record) + "\n")
        outputs.log_handle.flush()
        outputs.live_metrics.log(run.last_record)
    if outputs.progress is not None:
        outputs.progress.update(step - outputs.progress.n)
        outputs.progress.set_postfix(loss=f"{loss_value:.3f}", H=f"{stats['teacher_entropy']:.2f}",
                                     ips=f"{img_per_s:.1f}", refresh=False)


def _save(run: _Run) -> None:
    """The checkpoint at the current step (collective: every rank gathers its RNG state; rank 0 writes)."""
    steps_per_epoch = run.data.steps_per_epoch
    checkpoint.save_checkpoint(run.checkpoint_path, run.cfg, run.runtime, run.student_net, run.teacher_net,
                               run.optimizer, run.center, run.step, steps_per_epoch, run.data.n_patches,
                               run.position.offset_at(run.step, steps_per_epoch))
    run.last_saved_step = run.step


def _finish(run: _Run, start_step: int, t_start: float, git: dict[str, Any]) -> dict[str, Any]:
    """The final checkpoint, the teacher export and the run's summary (summary.json)."""
    cfg, data, step, output_dir = run.cfg, run.data, run.step, run.output_dir
    _save(run)
    wall_s = time.perf_counter() - t_start
    losses, rates, last_record = run.losses, run.rates, run.last_record
    summary: dict[str, Any] = {
        "steps": step, "start_step": start_step, "total_steps": data.total_steps,
        "steps_per_epoch": data.steps_per_epoch, "epochs_completed": step / data.steps_per_epoch,
        "world_size": run.runtime.world_size, "device": str(run.runtime.device),
        "arch": cfg.arch, "input_arm": cfg.input_arm, "wall_s": wall_s,
        "n_patches": data.n_patches, "patches_unused_per_epoch": data.unused_per_epoch,
        # single steps (noisy); stage 03 adds loss_first / loss_last, means over the first / last tenth
        "first_step_loss": losses[0] if losses else None, "last_step_loss": losses[-1] if losses else None,
        "mean_img_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)) if rates else None,
        # the median resists a loaded machine's spikes (the first step, with its warm-up, left out)
        "median_img_per_s": float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else None,
        **{k: last_record.get(k) for k in ("teacher_entropy", "teacher_entropy_of_mean", "teacher_kl",
                                           "teacher_max_entropy")},
        # Sinkhorn-Knopp targets leave the running centre unused: no norm of it to report
        "center_norm": last_record.get("center_norm") if cfg.centering == "center" else None,
        "checkpoint": str(run.checkpoint_path), "teacher_backbone": str(output_dir / checkpoint.TEACHER_EXPORT_NAME),
        "log": str(output_dir / checkpoint.LOG_NAME), **git,
    }
    if run.is_main:
        reference = checkpoint.training_reference(cfg, data.patches, data.macenko_reference)
        checkpoint.export_teacher_backbone(run.teacher_net.backbone, output_dir, cfg, macenko_reference=reference)
        atomic.write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"[pretrain] done: step {step}, loss {summary['first_step_loss']} -> {summary['last_step_loss']}, "
              f"median {summary['median_img_per_s'] or float('nan'):.1f} img/s, {wall_s:.1f} s", flush=True)
    if dist.is_initialized():
        # no rank tears the process group down while rank 0 still exports (gloo aborts on an early close)
        dist.barrier()
    return summary
