"""DINO pretraining loop: data, networks, loss, optimizer, schedules, resume, loop (as dino's `train_dino()`).

Single process: `python -m exaonepath_core.pretrain.training --config PRETRAIN.yaml [--resume] [--output-dir DIR]
[--set key=value ...]`. Multi-GPU / multi-node: the same command under `torchrun --nproc_per_node=G ...` runs DDP
(NCCL on GPU, gloo on CPU); every collective is guarded by `dist.is_initialized()`.

Stop signals (SIGTERM, SIGUSR1) checkpoint after the current step and exit with code 75 (preemption.py); a
resume may use another world size, continuing from the same sample position of the epoch (elastic.py).

Exact resume: each epoch's data order is a seeded per-rank permutation, each sample's augmentations are seeded
from (seed, epoch, index), schedules are indexed by the global step, and the RNG state (drop-path) is saved with
the checkpoint; a resumed run skips the first k batches of the interrupted epoch without loading them.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from exaonepath_core.config import PRECISIONS, RESUME_MUTABLE_KEYS, ConfigError, PretrainConfig, parse_length
from exaonepath_core.io import atomic, env_check
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import dino, elastic, prefetch, schedules, train_metrics
from exaonepath_core.pretrain.preemption import EXIT_PREEMPTED, Preempted, StopRequest
from exaonepath_core.pretrain.schedules import cosine_schedule_steps, warmup_then_constant_steps

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_NAME = "checkpoint.pth"
TEACHER_EXPORT_NAME = "teacher_backbone.pth"
LOG_NAME = "log.jsonl"
class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without touching the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def epoch_indices(n: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's share of the epoch's seeded permutation (equal length on every rank)."""
    from exaonepath_core.data import patch_store

    return np.asarray(patch_store.rank_indices(n, rank, world_size, seed, epoch), dtype=np.int64)


class EpochSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` so each worker can seed a sample's augmentations without shared state."""

    def __init__(self, indices: np.ndarray, epoch: int) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class MultiCropDataset(Dataset):
    """Wraps a patch dataset (uint8 (T, T, 3) per item): optional stain augmentation, then DINO multi-crop draws.

    An item is `(patch, params)`: the (stain-augmented) uint8 patch and the (n_crops, N_VIEW_PARAMS) random
    parameters of its views, both drawn from the sample's own generator seeded by (seed, epoch, index). The pixel
    work of the multi-crop runs batched afterwards (`MultiCropCollate` in the loader, or on the training device),
    so a sample's views stay a pure function of (seed, epoch, index). With `augmentation=None` an item is the patch.
    """

    def __init__(
        self,
        patches: Dataset,
        augmentation: dino.MultiCropAugmentation | None,
        seed: int,
        stain_augmentation: bool = False,
    ) -> None:
        self.patches = patches
        self.augmentation = augmentation
        self.seed = int(seed)
        self.stain_augment_batch = _stain_function("stain_augment_batch") if stain_augmentation else None

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        epoch, index = key
        patch = torch.from_numpy(np.ascontiguousarray(self.patches[index]))
        generator = torch.Generator().manual_seed(dino.sample_seed(self.seed, epoch, index))
        if self.stain_augment_batch is not None:
            patch = self.stain_augment_batch(patch[None], generator)[0]
        if self.augmentation is None:
            return patch
        return patch, self.augmentation.sample_params(patch.shape[0], patch.shape[1], generator)


class MultiCropCollate:
    """Stacks `(patch, params)` items; with `apply_views` also runs the batched multi-crop (in the loader worker).

    Returns the list of views `[g1, g2, l1..lN]` (each (B, 3, S, S)) or, without `apply_views`, the pair
    `(patches (B, T, T, 3) uint8, params (B, n_crops, P))` for the loop to augment on the training device.
    """

    def __init__(self, augmentation: dino.MultiCropAugmentation, apply_views: bool) -> None:
        self.augmentation = augmentation
        self.apply_views = apply_views

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        patches = torch.stack([patch for patch, _ in items])
        params = torch.stack([params for _, params in items])
        if self.apply_views:
            return self.augmentation.apply(patches, params)
        return patches, params


def _stain_function(name: str) -> Any:
    """`stain_augment_batch` or `macenko_normalize_batch` (exaonepath_core.data.stain), by name."""
    from exaonepath_core.data.stain.augment import stain_augment_batch
    from exaonepath_core.data.stain.macenko import macenko_normalize_batch

    functions = {"stain_augment_batch": stain_augment_batch, "macenko_normalize_batch": macenko_normalize_batch}
    if name not in functions:
        raise ValueError(f"no stain function {name!r}; expected one of {sorted(functions)}")
    return functions[name]


def _load_patch_dataset(cfg: PretrainConfig) -> Dataset:
    if not cfg.data_root:
        raise ConfigError("data_root is empty: point it at a patch store (raw or macenko) written by stage 02")
    from exaonepath_core.data.shard_dataset import open_patch_dataset

    def open_store(root: str, slide_ids: list[str] | None = None) -> Dataset:
        return open_patch_dataset(root, slide_ids, max_open_files=cfg.store_max_open_files,
                                  max_open_slides=cfg.store_max_open_files, on_corrupt=cfg.store_on_corrupt)

    dataset = open_store(cfg.data_root)
    excluded = sorted(set(cfg.exclude_slide_ids) & set(dataset.slide_ids))
    if excluded:
        keep = sorted(set(dataset.slide_ids) - set(excluded))
        print(f"[pretrain] {len(excluded)} excluded (held-out) slide(s) present in the store are left out: "
              f"{', '.join(excluded[:10])}{' ...' if len(excluded) > 10 else ''}", file=sys.stderr, flush=True)
        dataset = open_store(cfg.data_root, slide_ids=keep)
    if cfg.input_arm == "macenko" and not cfg.normalize_on_the_fly and getattr(dataset, "mode", None) == "raw":
        raise ConfigError(f"{cfg.data_root} holds raw patches (store mode raw, asked for input_arm macenko): point "
                          "data_root at a macenko store or set normalize_on_the_fly: true (storeless is always raw)")
    return dataset


# ----------------------------------------------------------------------------------------------------------------
# Run environment
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool


def _init_distributed(cfg: PretrainConfig) -> _Runtime:
    """DDP from torchrun's environment (NCCL on GPU, gloo on CPU); a plain single process otherwise."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        initialized_here = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    return _Runtime(rank, world_size, local_rank, device, initialized_here)


def _git_state() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": None}


def _gather_rng_states(runtime: _Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state (drop-path draws depend on it), as tensors for `weights_only` loading."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    if not dist.is_initialized():
        return [state]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay as DINO's `get_params_groups`: none on biases and 1-D tensors (norms); weight matrices,
    the CLS token and position embeddings (3-D) are decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


@dataclass
class StepResult:
    """What one DINO step returns to the loop, as device tensors; the properties read them on the host (a sync).

    `finite` False: this step's loss (averaged over ranks) was not finite and no weight, optimizer moment, teacher
    parameter or centre changed from this step on (see `DINOTrainStep`).
    """

    loss_tensor: torch.Tensor
    finite_tensor: torch.Tensor
    teacher_out: torch.Tensor
    grad_norm_tensor: torch.Tensor | None
    teacher_p: torch.Tensor  # the loss's target distributions, reused for the collapse diagnostics

    @property
    def loss(self) -> float:
        """The loss averaged over ranks (host read)."""
        return float(self.loss_tensor)

    @property
    def finite(self) -> bool:
        """Whether the step's loss was finite (host read)."""
        return bool(self.finite_tensor)

    @property
    def grad_norm(self) -> float | None:
        """Total gradient norm before clipping (host read); None without clipping or after a non-finite loss."""
        if self.grad_norm_tensor is None or not self.finite:
            return None
        return float(self.grad_norm_tensor)


def resolve_precision(precision: str, device: torch.device, use_amp: bool = True) -> str:
    """`precision: auto` made concrete: bf16 on CUDA (fp16 where bf16 is missing) and on CPUs with native bf16
    (avx512_bf16 or AMX: bf16 matmuls there ran the step 1.3-1.4x faster than fp32), else fp32."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
        return precision
    if not use_amp:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
            torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return "bf16" if native else "fp32"
    return "fp32"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DINOTrainStep:
    """One DINO optimisation step: both forwards, the loss, backward, clipping, AdamW, the EMA teacher.

    The training loop and `benchmarks/dino_step.py` both call this, so the benchmark times the production step.
    `student` is what runs the forward (the DDP wrapper under torchrun); `student_net` the unwrapped module the
    EMA reads. `precision`: bf16 / fp16 autocast (fp16 with a GradScaler, as DINO) or fp32; `use_amp` (older
    callers) means bf16.

    Non-finite losses, without a host sync in the steady state: the loss (summed over ranks, so every rank decides
    alike) gives a device flag `healthy` that stays False from the first non-finite step on. With a fused AdamW
    the flag is the optimizer's `found_inf` (its kernel then leaves weights, moments and step count untouched),
    the EMA momentum becomes 1 and the centre keeps its value (`next_center`), so a bad step never reaches the
    weights or the teacher; the loop raises when it next reads the flag (every `log_every` steps and before every
    checkpoint). Other optimizers and fp16 (whose GradScaler owns `found_inf`) read the flag every step and
    return before backward, as before.
    """

    def __init__(
        self,
        student: nn.Module,
        student_net: dino.MultiCropWrapper,
        teacher_net: dino.MultiCropWrapper,
        optimizer: torch.optim.Optimizer,
        *,
        student_temp: float,
        centering: str,
        sinkhorn_iterations: int,
        clip_grad: float,
        use_amp: bool = False,
        clip_grad_mode: str = "per_parameter",
        precision: str | None = None,
    ) -> None:
        self.student, self.student_net, self.teacher_net = student, student_net, teacher_net
        self.optimizer = optimizer
        self.student_temp, self.centering, self.sinkhorn_iterations = student_temp, centering, sinkhorn_iterations
        self.clip_grad, self.clip_grad_mode = clip_grad, clip_grad_mode
        self.precision = precision if precision is not None else ("bf16" if use_amp else "fp32")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        parameter = next(student_net.parameters())
        self.device_type = parameter.device.type
        self.last_layer_params = dino.last_layer_parameters(student_net.head)
        self.student_params = list(self.student_net.parameters())
        self.scaler = torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None
        fused = bool(optimizer.defaults.get("fused"))
        self.sync_free = fused and self.scaler is None
        self.healthy = torch.ones((), dtype=torch.bool, device=parameter.device)

    def __call__(
        self,
        views: list[torch.Tensor],
        center: torch.Tensor,
        *,
        lr: float,
        weight_decay: float,
        teacher_temp: float,
        momentum: float,
        freeze_last_layer: bool,
    ) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["apply_wd"]:
                group["weight_decay"] = weight_decay
        dtype = _AUTOCAST_DTYPES.get(self.precision, torch.bfloat16)
        with torch.autocast(device_type=self.device_type, dtype=dtype, enabled=self.precision in _AUTOCAST_DTYPES):
            with torch.no_grad():
                teacher_out = self.teacher_net(views[:2])
            student_out = self.student(views)
        teacher_p = dino.teacher_probabilities(teacher_out, center, teacher_temp, self.centering,
                                               self.sinkhorn_iterations)
        loss = dino.dino_loss_from_targets(student_out, teacher_p, self.student_temp)
        mean_loss = loss.detach().float().reshape(1)
        if _world_size() > 1:  # one collective; NaN / inf on any rank makes the sum non-finite on all
            mean_loss = mean_loss.clone()
            dist.all_reduce(mean_loss)
            mean_loss /= _world_size()
        mean_loss = mean_loss[0]
        finite = torch.isfinite(mean_loss)
        self.healthy = self.healthy & finite
        if not self.sync_free and not bool(self.healthy):
            return StepResult(mean_loss, finite, teacher_out, None, teacher_p)
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.clip_grad > 0:
            grad_norm = dino.clip_gradients_tensor_(self.student_params, self.clip_grad, self.clip_grad_mode)
        if freeze_last_layer:
            for param in self.last_layer_params:
                param.grad = None  # AdamW then skips them entirely (no moment updates either)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.sync_free:
                self.optimizer.found_inf = (~self.healthy).float()  # the fused kernel skips the whole update
            self.optimizer.step()
        # momentum 1 keeps the teacher as it is once a loss was non-finite
        ema_momentum = torch.where(self.healthy, momentum, 1.0) if self.sync_free else momentum
        dino.ema_update_(self.teacher_net, self.student_net, ema_momentum)
        return StepResult(mean_loss, finite, teacher_out, grad_norm, teacher_p)

    def next_center(self, center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
        """DINO's centre update, held at its old value once a loss was non-finite (no host sync)."""
        updated = dino.update_center(center, teacher_out, momentum)
        return torch.where(self.healthy, updated, center)


def _run_schedules(
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


def make_optimizer(student_net: nn.Module, fused: bool) -> torch.optim.AdamW:
    """AdamW over the student with DINO's two groups (no decay on biases and norms); fused kernels when asked."""
    device_type = next(student_net.parameters()).device.type
    use_fused = fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(_param_groups(student_net), lr=0.0, weight_decay=0.0, fused=use_fused or None)


def _amp_enabled(cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether the step runs under autocast (bf16 or fp16) as configured for this device."""
    return _precision(cfg, device) != "fp32"


def _precision(cfg: PretrainConfig, device: torch.device) -> str:
    """The step's precision for this run (`precision`, with `auto` resolved for the device)."""
    return resolve_precision(cfg.precision, device, cfg.use_amp)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train(cfg: PretrainConfig, resume: bool = False, dataset: Dataset | None = None) -> dict[str, Any]:
    """Run (or resume) DINO pretraining as configured; returns a summary dict (also written to summary.json).

    `dataset` replaces the patch store named by `cfg.data_root` (any map-style dataset of uint8 (T, T, 3) arrays).
    """
    runtime = _init_distributed(cfg)
    try:
        with _sole_writer(Path(cfg.output_dir), runtime.rank == 0):
            return _train(cfg, runtime, resume, dataset)
    finally:
        if runtime.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


class OutputDirBusyError(RuntimeError):
    """Another training process holds the output folder."""


@contextlib.contextmanager
def _sole_writer(output_dir: Path, is_main: bool) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT_DIR/.train.lock (rank 0) for the whole run.

    A trainer left running by a killed notebook or runner would otherwise write the same checkpoint and log as
    the rerun that started beside it. The lock is released by the kernel when the process dies, so a crash
    never leaves a stale lock behind.
    """
    if not is_main:
        yield
        return
    try:
        with atomic.file_lock(output_dir / ".train.lock", holder=f"pid {os.getpid()} on {platform.node()}"):
            yield
    except atomic.LockBusy as busy:
        raise OutputDirBusyError(
            f"another training process ({busy.holder or 'unknown'}) is writing {output_dir}; wait for it to finish "
            "or stop it (e.g. a run left behind by an interrupted notebook), then rerun") from None


def _train(cfg: PretrainConfig, runtime: _Runtime, resume: bool, dataset: Dataset | None) -> dict[str, Any]:
    is_main = runtime.rank == 0
    device = runtime.device
    output_dir = Path(cfg.output_dir)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # fp32 matmuls outside autocast (the loss head's softmax inputs stay fp32) may use TF32, as dinov2 does
        torch.set_float32_matmul_precision("high")
    git = _git_state()
    if is_main:
        print(f"[pretrain] git {git['git_sha']} dirty={git['git_dirty']} world_size={runtime.world_size} "
              f"device={device} torch={torch.__version__}", flush=True)
        print(f"[pretrain] build: {env_check.cuda_build_line()}", flush=True)
        print("[pretrain] settings:\n" + "\n".join(f"  {k}: {v!r}" for k, v in cfg.to_dict().items()), flush=True)

    # ============ data ... ============
    patches = dataset if dataset is not None else _load_patch_dataset(cfg)
    augmentation = dino.MultiCropAugmentation(
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
        normalize_batch = _stain_function("macenko_normalize_batch")
        from exaonepath_core.data.stain.reference import MacenkoReference

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
    if is_main:
        print(f"[pretrain] data: {n_patches} patches, arm={cfg.input_arm}, {steps_per_epoch} steps/epoch "
              f"({unused_per_epoch} patches sit out each epoch: whole batches only, another set each epoch), "
              f"{total_steps} steps in {cfg.epochs} epochs, stopping at step {last_step}", flush=True)

    # ============ building student and teacher networks ... ============
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    student_backbone = create_backbone(cfg.arch, cfg.global_crop_size, cfg.patch_size,
                                       drop_path_rate=cfg.drop_path_rate)
    embed_dim = int(student_backbone.num_features)
    head_kwargs = {"in_dim": embed_dim, "out_dim": cfg.out_dim, "hidden_dim": cfg.head_hidden_dim,
                       "bottleneck_dim": cfg.head_bottleneck_dim, "nlayers": cfg.head_nlayers}
    student_net = dino.MultiCropWrapper(
        student_backbone, dino.DINOHead(**head_kwargs, norm_last_layer=cfg.norm_last_layer,
                                        fp32_last_layer=cfg.fp32_last_layer)
    )
    teacher_net = dino.MultiCropWrapper(
        create_backbone(cfg.arch, cfg.global_crop_size, cfg.patch_size, drop_path_rate=0.0),
        dino.DINOHead(**head_kwargs, fp32_last_layer=cfg.fp32_last_layer),
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
    student = student_net
    if dist.is_initialized():
        student = nn.parallel.DistributedDataParallel(
            student_net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if is_main:
        n_params = sum(p.numel() for p in student_net.backbone.parameters())
        print(f"[pretrain] networks: {cfg.arch} (patch {cfg.patch_size or 'default'}, {n_params / 1e6:.2f}M "
              f"backbone parameters, embed_dim {embed_dim}) + DINO head out_dim {cfg.out_dim}", flush=True)

    # ============ preparing loss ... ============
    center = torch.zeros(1, cfg.out_dim, device=device)

    # ============ preparing optimizer ... ============
    optimizer = make_optimizer(student_net, cfg.fused_adamw)
    train_step = DINOTrainStep(student, student_net, teacher_net, optimizer, student_temp=cfg.student_temp,
                               centering=cfg.centering, sinkhorn_iterations=cfg.sinkhorn_iterations,
                               clip_grad=cfg.clip_grad, clip_grad_mode=cfg.clip_grad_mode,
                               precision=_precision(cfg, device))
    if is_main:
        print(f"[pretrain] precision: {train_step.precision} (head's last layer and loss "
              f"{'fp32' if cfg.fp32_last_layer else 'autocast'}); non-finite check "
              f"{'on the device, read every log_every steps' if train_step.sync_free else 'every step'}", flush=True)

    # ============ init schedulers ... ============
    global_batch = batch_size * runtime.world_size
    lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, freeze_steps = _run_schedules(
        cfg, total_steps, steps_per_epoch, global_batch, announce=is_main)

    # ============ optionally resume training ... ============
    checkpoint_path = output_dir / CHECKPOINT_NAME
    start_step = 0
    position = elastic.DataPosition(0, 0)  # the epoch offset is non-zero only in an epoch resumed at a new size
    if resume:
        position, center = _resume(checkpoint_path, cfg, runtime, student_net, teacher_net, optimizer, center,
                                   n_patches=n_patches, steps_per_epoch=steps_per_epoch)
        start_step = position.step
    elif is_main and checkpoint_path.exists():
        print(f"[pretrain] note: {checkpoint_path} exists and will be overwritten (pass --resume to continue it)",
              flush=True)
    if is_main:
        # written once the resume is accepted: a refused one leaves the record of the run it refused to continue
        atomic.write_text(output_dir / "pretrain_config.json",
                          json.dumps({**cfg.to_dict(), **git, "world_size": runtime.world_size}, indent=2) + "\n")
        _truncate_log(output_dir / LOG_NAME, position.logged_step)  # the old numbering after a world-size change
    # drop-path draws differ per rank; on resume the saved per-rank state was restored above
    if position.logged_step == 0:  # a fresh start (a resize may map a resumed run to step 0: it keeps its state)
        torch.manual_seed(cfg.seed + runtime.rank)
    last_saved_step = start_step if resume and checkpoint_path.exists() else None

    # ============ training ... ============
    if is_main:
        print(f"[pretrain] starting at step {start_step} (epoch {start_step // steps_per_epoch})", flush=True)
    progress = None
    if is_main and cfg.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=last_step, initial=start_step, desc=f"DINO {cfg.input_arm}", mininterval=2.0,
                        dynamic_ncols=True)
    live_metrics = train_metrics.open_live_metrics(cfg, output_dir, is_main, start_step)  # closed in finally
    log_handle = open(output_dir / LOG_NAME, "a") if is_main else None  # noqa: SIM115 (closed in finally)
    step = start_step
    losses: list[float] = []
    rates: list[float] = []
    last_record: dict[str, Any] = {}
    stop_request = StopRequest().install()  # SIGTERM / SIGUSR1: checkpoint at the next step boundary, then exit
    pending: list[torch.Tensor] = []  # device losses of the steps since the last host read (<= log_every)
    t_start = time.perf_counter()
    t_read = t_start  # throughput is measured between host reads (data loading included)
    try:
        for epoch in range(start_step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)):
            if step >= last_step:
                break
            # resume mid-epoch: skip the batches already trained on, without loading them
            indices = elastic.rank_epoch_indices(
                n_patches, runtime.rank, runtime.world_size, cfg.seed, epoch, steps_per_epoch=steps_per_epoch,
                batch_size=batch_size, step=step, offset=position.offset_at(step, steps_per_epoch))
            loader = DataLoader(
                crop_dataset,
                batch_size=batch_size,
                sampler=EpochSampler(indices, epoch),
                collate_fn=collate,
                num_workers=cfg.num_workers,
                pin_memory=device.type == "cuda",
                drop_last=True,
                # a private generator keeps the global RNG (drop-path) untouched by loader start-up
                generator=torch.Generator().manual_seed(cfg.seed + epoch),
                persistent_workers=False,
            )
            # on CUDA the next batch is copied (pinned, on a side stream) while this step runs
            for batch_in_epoch, batch in enumerate(prefetch.to_device(loader, device)):
                if step >= last_step:
                    break
                n_fallback = None
                if views_in_loader:
                    views = batch
                else:
                    patches_batch, params = batch
                    if normalize_batch is not None:
                        # background patches: counted (read with the log record), never dropped
                        patches_batch, fallback = normalize_batch(patches_batch, macenko_reference)
                        n_fallback = fallback.sum()
                    views = augmentation.apply(patches_batch, params)
                if cfg.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                teacher_temp = float(teacher_temp_schedule[step])
                momentum = float(momentum_schedule[step])
                result = train_step(views, center, lr=float(lr_schedule[step]),
                                    weight_decay=float(wd_schedule[step]), teacher_temp=teacher_temp,
                                    momentum=momentum, freeze_last_layer=step < freeze_steps)
                center = train_step.next_center(center, result.teacher_out, cfg.center_momentum)
                step += 1
                pending.append(result.loss_tensor)
                log_now = step % cfg.log_every == 0 or step == last_step
                checkpoint_now = step % cfg.saveckp_freq == 0 and step < last_step
                stop = stop_request.agreed() and step < last_step  # collective: every rank, every step
                # host reads (syncs) only here: every log_every steps, before a checkpoint (a stop's too), or every
                # step when the step cannot skip a bad update on the device
                if not (log_now or checkpoint_now or stop or not train_step.sync_free):
                    continue
                step_losses = torch.stack(pending).float().cpu().tolist()
                first_step = step - len(pending) + 1
                pending.clear()
                bad = [(first_step + i, v) for i, v in enumerate(step_losses) if not math.isfinite(v)]
                if bad:
                    where = (f"the last good checkpoint {checkpoint_path} (step {last_saved_step}) is intact"
                             if last_saved_step is not None else "no checkpoint was written yet")
                    raise NonFiniteLossError(
                        f"loss is {bad[0][1]} at step {bad[0][0] - 1} (epoch {(bad[0][0] - 1) // steps_per_epoch}); "
                        f"training stopped before that update reached the weights or the teacher, {where}"
                    )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                img_per_s = global_batch * len(step_losses) / max(now - t_read, 1e-9)
                t_read = now
                losses.extend(step_losses)
                rates.append(img_per_s)
                loss_value = step_losses[-1]
                stats = dino.target_stats(result.teacher_p, center)
                last_record = {
                    "step": step, "epoch": epoch, "loss": loss_value, "lr": float(lr_schedule[step - 1]),
                    "wd": float(wd_schedule[step - 1]), "momentum": momentum, "teacher_temp": teacher_temp,
                    **stats, "grad_norm": result.grad_norm, "img_per_s": img_per_s,
                    "macenko_fallback": None if n_fallback is None else int(n_fallback),
                    "centering": cfg.centering,
                    "gpu_mem_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                                   if device.type == "cuda" else None),
                }
                if log_handle is not None and log_now:
                    log_handle.write(json.dumps(last_record) + "\n")
                    log_handle.flush()
                    live_metrics.log(last_record)
                if progress is not None:
                    progress.update(step - progress.n)
                    progress.set_postfix(loss=f"{loss_value:.3f}", H=f"{stats['teacher_entropy']:.2f}",
                                         ips=f"{img_per_s:.1f}", refresh=False)
                if checkpoint_now or stop:
                    _save_checkpoint(checkpoint_path, cfg, runtime, student_net, teacher_net, optimizer, center,
                                     step, steps_per_epoch, n_patches, position.offset_at(step, steps_per_epoch))
                    last_saved_step = step
                if stop:
                    if dist.is_initialized():
                        dist.barrier()  # no rank closes the process group while rank 0 still writes
                    raise Preempted(step, stop_request.received or "a stop signal", str(checkpoint_path))
    finally:
        stop_request.uninstall()
        if progress is not None:
            progress.close()
        if log_handle is not None:
            log_handle.close()
        live_metrics.close()

    # ============ final checkpoint and teacher export ... ============
    _save_checkpoint(checkpoint_path, cfg, runtime, student_net, teacher_net, optimizer, center, step,
                     steps_per_epoch, n_patches, position.offset_at(step, steps_per_epoch))
    wall_s = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "steps": step, "start_step": start_step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "epochs_completed": step / steps_per_epoch, "world_size": runtime.world_size, "device": str(device),
        "arch": cfg.arch, "input_arm": cfg.input_arm, "wall_s": wall_s,
        "n_patches": n_patches, "patches_unused_per_epoch": unused_per_epoch,
        # single steps (noisy); stage 03 adds loss_first / loss_last, means over the first / last tenth
        "first_step_loss": losses[0] if losses else None, "last_step_loss": losses[-1] if losses else None,
        "mean_img_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)) if rates else None,
        # the median resists a loaded machine's spikes (the first step, with its warm-up, left out)
        "median_img_per_s": float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else None,
        **{k: last_record.get(k) for k in ("teacher_entropy", "teacher_entropy_of_mean", "teacher_kl",
                                           "teacher_max_entropy")},
        # Sinkhorn-Knopp targets leave the running centre unused: no norm of it to report
        "center_norm": last_record.get("center_norm") if cfg.centering == "center" else None,
        "checkpoint": str(checkpoint_path), "teacher_backbone": str(output_dir / TEACHER_EXPORT_NAME),
        "log": str(output_dir / LOG_NAME), **git,
    }
    if is_main:
        export_teacher_backbone(teacher_net.backbone, output_dir, cfg,
                                macenko_reference=_training_reference(cfg, patches, macenko_reference))
        atomic.write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"[pretrain] done: step {step}, loss {summary['first_step_loss']} -> {summary['last_step_loss']}, "
              f"median {summary['median_img_per_s'] or float('nan'):.1f} img/s, {wall_s:.1f} s", flush=True)
    if dist.is_initialized():
        # no rank tears the process group down while rank 0 still exports (gloo aborts on an early close)
        dist.barrier()
    return summary


def _save_checkpoint(
    path: Path,
    cfg: PretrainConfig,
    runtime: _Runtime,
    student_net: nn.Module,
    teacher_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    center: torch.Tensor,
    step: int,
    steps_per_epoch: int,
    n_patches: int,
    epoch_offset: int = 0,
) -> None:
    """Tensors and plain dicts only (loads with `weights_only=True`); written atomically by rank 0.

    `n_patches` (the training set's size) and `steps_per_epoch` let a resume refuse a store of another size;
    `global_batch` and `epoch_offset` (elastic.DataPosition) let it continue at another world size.
    """
    rng_states = _gather_rng_states(runtime)  # collective: every rank takes part
    if runtime.rank != 0:
        return
    payload = {
        "step": step,
        "epoch": step // steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "n_patches": n_patches,
        "world_size": runtime.world_size,
        "global_batch": cfg.batch_size_per_gpu * runtime.world_size,
        "epoch_offset": epoch_offset,
        "student": student_net.state_dict(),
        "teacher": teacher_net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "center": center.detach().cpu(),
        "rng": rng_states,
        "config": cfg.to_dict(),
    }
    atomic.torch_save(payload, path)
    if cfg.keep_numbered_checkpoints:
        atomic.torch_save(payload, path.with_name(f"checkpoint_{step:08d}.pth"))


def _resume(
    path: Path,
    cfg: PretrainConfig,
    runtime: _Runtime,
    student_net: nn.Module,
    teacher_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    center: torch.Tensor,
    *,
    n_patches: int,
    steps_per_epoch: int,
) -> tuple[elastic.DataPosition, torch.Tensor]:
    """Load the checkpoint at `path` into the networks and optimizer; returns (data position, centre).

    Refuses (ConfigError) a checkpoint whose recipe or training-set size differs from this run's: `data_root`
    may move, but a store of another size would shift every schedule and the data order. Another world size is
    accepted: the run continues from the same sample position of the epoch (`_position_at_world_size`).
    """
    if not path.exists():
        if runtime.rank == 0:
            print(f"[pretrain] --resume: no checkpoint at {path}, starting from step 0", flush=True)
        return elastic.DataPosition(0, 0), center
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint["config"]
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUME_MUTABLE_KEYS and saved.get(k) != v)
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(f"cannot resume {path}: settings differ from the checkpoint's ({details})")
    # checkpoints written before n_patches was stored carry steps_per_epoch only
    saved_patches = checkpoint.get("n_patches")
    same_world = checkpoint["world_size"] == runtime.world_size
    if saved_patches is None and not same_world:
        raise ConfigError(f"cannot resume {path} at world size {runtime.world_size}: it was written with world_size "
                          f"{checkpoint['world_size']} by a version that did not record the training-set size")
    if (same_world and checkpoint["steps_per_epoch"] != steps_per_epoch) or (
            saved_patches is not None and saved_patches != n_patches):
        saved_size = f"{saved_patches} patches, " if saved_patches is not None else ""
        raise ConfigError(
            f"cannot resume {path}: it was trained on {saved_size}{checkpoint['steps_per_epoch']} steps per epoch; "
            f"this run's data ({cfg.data_root or 'the dataset passed in'}) has {n_patches} patches, "
            f"{steps_per_epoch} steps per epoch (the schedules and the data order depend on it: point data_root "
            "at the store it was trained on, or start a new run without --resume)")
    student_net.load_state_dict(checkpoint["student"], strict=True)
    teacher_net.load_state_dict(checkpoint["teacher"], strict=True)
    optimizer.load_state_dict(checkpoint["optimizer"])
    position = _position_at_world_size(checkpoint, cfg, runtime, n_patches, steps_per_epoch)
    _restore_rng(checkpoint["rng"], runtime, cfg.seed, position.step)
    if runtime.rank == 0:
        print(f"[pretrain] resumed from {path} at step {position.step}", flush=True)
    return position, checkpoint["center"].to(center.device)


def _position_at_world_size(
    checkpoint: dict[str, Any], cfg: PretrainConfig, runtime: _Runtime, n_patches: int, steps_per_epoch: int
) -> elastic.DataPosition:
    """The checkpoint's data position, moved to this run's world size (the same one: as saved)."""
    old_spe = int(checkpoint["steps_per_epoch"])
    saved = elastic.DataPosition(int(checkpoint["step"]), int(checkpoint["step"]) // old_spe,
                                 int(checkpoint.get("epoch_offset", 0)))
    if checkpoint["world_size"] == runtime.world_size:
        return saved
    old_batch = int(checkpoint.get("global_batch", cfg.batch_size_per_gpu * checkpoint["world_size"]))
    new_batch = cfg.batch_size_per_gpu * runtime.world_size
    moved = elastic.remap_position(saved, n=n_patches, old_steps_per_epoch=old_spe, old_global_batch=old_batch,
                                   new_steps_per_epoch=steps_per_epoch, new_global_batch=new_batch)
    if runtime.rank == 0:
        in_steps = [k for k in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer")
                    if parse_length(k, getattr(cfg, k))[1] == "steps"]
        print(f"[pretrain] world size changed {checkpoint['world_size']} -> {runtime.world_size} (global batch "
              f"{old_batch} -> {new_batch}, {old_spe} -> {steps_per_epoch} steps per epoch, base lr scaled by "
              f"{new_batch / old_batch:g}): epoch {saved.epoch} continues after its first {moved.samples_into_epoch} "
              f"samples; step {saved.step} -> {moved.position.step} (epoch {moved.position.epoch}); "
              f"{moved.unseen_in_epoch} samples of epoch {saved.epoch} go unseen in it"
              + (f"; {', '.join(in_steps)} count steps of the new global batch" if in_steps else ""), flush=True)
    return moved.position


def _restore_rng(saved_states: list[dict[str, Any]], runtime: _Runtime, seed: int, step: int) -> None:
    """Restore this rank's RNG state (drop-path draws); a rank the checkpoint has no state for (the world grew)
    seeds from (seed, rank, step) instead, and states of ranks that no longer exist are dropped."""
    if runtime.rank >= len(saved_states):
        torch.manual_seed(dino.sample_seed(seed, step, runtime.rank))
        print(f"[pretrain] rank {runtime.rank}: no RNG state in the checkpoint (written by {len(saved_states)} "
              "ranks); drop-path draws seeded from (seed, step, rank)", flush=True)
        return
    rng = saved_states[runtime.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], runtime.device)


def _truncate_log(log_path: Path, start_step: int) -> None:
    """Keep only log lines of steps already trained (a killed run may have logged past its last checkpoint)."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= start_step]
    atomic.write_text(log_path, "".join(line + "\n" for line in kept))


def _training_reference(cfg: PretrainConfig, patches: Dataset, on_the_fly_reference: Any) -> dict | None:
    """The Macenko reference the macenko arm trained on (inference must normalise the same way); else None."""
    if cfg.input_arm != "macenko":
        return None
    if on_the_fly_reference is not None:
        return on_the_fly_reference.to_dict()
    store_reference = getattr(patches, "reference", None)  # PatchStoreDataset reads it from the manifest
    if store_reference is not None:
        return store_reference.to_dict()
    if cfg.macenko_reference:
        from exaonepath_core.data.stain.reference import MacenkoReference

        return MacenkoReference.from_json(cfg.macenko_reference).to_dict()
    return None


def export_teacher_backbone(
    backbone: nn.Module,
    output_dir: str | os.PathLike,
    cfg: PretrainConfig,
    macenko_reference: dict | None = None,
) -> Path:
    """Write the teacher backbone as a plain timm state_dict plus `teacher_backbone.json`.

    The JSON holds arch, patch_size, img_size, embed_dim (what `backbones.load_backbone("ours:...")` needs),
    the input arm, whether inputs must be Macenko-normalised, and the reference used for it.
    """
    output_dir = Path(output_dir)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    path = output_dir / TEACHER_EXPORT_NAME
    atomic.torch_save(state, path)
    meta = {
        "arch": cfg.arch,
        "patch_size": cfg.patch_size if cfg.patch_size is not None else int(backbone.patch_embed.patch_size[0]),
        "img_size": cfg.global_crop_size,
        "embed_dim": int(backbone.num_features),
        "arm": cfg.input_arm,
        "macenko": cfg.input_arm == "macenko",
        "macenko_reference": macenko_reference,
    }
    atomic.write_text(output_dir / "teacher_backbone.json", json.dumps(meta, indent=2) + "\n")
    return path


def load_teacher_backbone(output_dir: str | os.PathLike) -> nn.Module:
    """Rebuild the exported teacher backbone (strict load) from `teacher_backbone.{pth,json}`."""
    output_dir = Path(output_dir)
    meta = json.loads((output_dir / "teacher_backbone.json").read_text())
    backbone = create_backbone(meta["arch"], meta["img_size"], meta["patch_size"])
    backbone.load_state_dict(torch.load(output_dir / TEACHER_EXPORT_NAME, map_location="cpu", weights_only=True),
                             strict=True)
    return backbone.eval()


# ----------------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------------
def read_log(log_jsonl: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `log.jsonl` (one JSON object per line)."""
    with open(log_jsonl) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_training_curves(log_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss, schedules, teacher entropy (collapse check), centre and throughput against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_jsonl)
    if not records:
        raise ValueError(f"{log_jsonl} holds no records")
    steps = np.array([r["step"] for r in records])

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    axes[0, 0].plot(steps, series("loss"))
    axes[0, 0].set(title="DINO loss", ylabel="cross-entropy (nats)")
    axes[0, 1].plot(steps, series("teacher_entropy"), label="mean per-sample entropy")
    axes[0, 1].plot(steps, series("teacher_entropy_of_mean"), label="entropy of batch mean")
    axes[0, 1].plot(steps, series("teacher_max_entropy"), "k--", label="log K (uniform collapse)")
    axes[0, 1].set(title="Teacher entropy (collapse check)", ylabel="nats")
    axes[0, 1].legend(fontsize=8)
    axes[0, 2].plot(steps, series("teacher_kl"))
    axes[0, 2].set(title="Teacher KL(p_i || mean p)  (0 = collapsed)", ylabel="nats")
    axes[1, 0].plot(steps, series("lr"), label="lr")
    ax_wd = axes[1, 0].twinx()
    ax_wd.plot(steps, series("wd"), color="tab:orange", label="weight decay")
    axes[1, 0].set(title="Schedules", ylabel="learning rate")
    ax_wd.set_ylabel("weight decay")
    axes[1, 0].legend(loc="upper left", fontsize=8)
    ax_wd.legend(loc="upper right", fontsize=8)
    # Sinkhorn-Knopp targets do not use the running centre: its norm would be a curve of an unused quantity
    uses_center = all(r.get("centering", "center") == "center" for r in records)
    if uses_center:
        axes[1, 1].plot(steps, series("center_norm"), label="centre norm")
    axes[1, 1].plot(steps, series("momentum"), label="teacher momentum")
    axes[1, 1].set(title="Centre norm and teacher momentum" if uses_center
                   else "Teacher momentum (Sinkhorn-Knopp targets: no centre)")
    axes[1, 1].legend(fontsize=8)
    axes[1, 2].plot(steps, series("img_per_s"))
    axes[1, 2].set(title="Throughput", ylabel="images / s")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m exaonepath_core.pretrain.training --config PRETRAIN.yaml [--resume] [--output-dir DIR] [--set k=v ...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m exaonepath_core.pretrain.training",
        description="DINO pretraining (run under torchrun for DDP: torchrun --nproc_per_node=G -m "
                    "exaonepath_core.pretrain.training --config ...)")
    parser.add_argument("--config", required=True, help="flat YAML mapping of PretrainConfig settings")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--plot", action="store_true", help="also write training_curves.png (rank 0)")
    args = parser.parse_args(argv)
    try:
        cfg = PretrainConfig.from_yaml(args.config)
        overrides = list(args.set) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg = cfg.with_overrides(overrides)
        summary = train(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"[pretrain] configuration error: {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as err:
        print(f"[pretrain] ERROR: {err}", file=sys.stderr, flush=True)
        return 3
    except OutputDirBusyError as err:
        print(f"[pretrain] ERROR: {err}", file=sys.stderr, flush=True)
        return 4
    except Preempted as stopped:
        print(f"[pretrain] {stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if args.plot and int(os.environ.get("RANK", "0")) == 0:
        plot_training_curves(summary["log"], Path(cfg.output_dir) / "training_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
