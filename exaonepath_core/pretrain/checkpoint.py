"""What a run leaves in its output folder for a resume and for inference: the checkpoint (save, refuse or
accept a resume, move it to another world size), the RNG states, the log truncation, the teacher export."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from exaonepath_core.config import RESUME_MUTABLE_KEYS, ConfigError, PretrainConfig
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.io import atomic
from exaonepath_core.models.backbones import create_backbone
from exaonepath_core.pretrain import elastic, schedules
from exaonepath_core.pretrain.runtime import Runtime
from exaonepath_core.pretrain.view_params import sample_seed

CHECKPOINT_NAME = "checkpoint.pth"
TEACHER_EXPORT_NAME = "teacher_backbone.pth"
LOG_NAME = "log.jsonl"


def gather_rng_states(runtime: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state (drop-path draws depend on it), as tensors for `weights_only` loading."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    if not dist.is_initialized():
        return [state]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, state)
    return gathered



def save_checkpoint(
    path: Path,
    cfg: PretrainConfig,
    runtime: Runtime,
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
    rng_states = gather_rng_states(runtime)  # collective: every rank takes part
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


def resume(
    path: Path,
    cfg: PretrainConfig,
    runtime: Runtime,
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
    restore_rng(checkpoint["rng"], runtime, cfg.seed, position.step)
    if runtime.rank == 0:
        print(f"[pretrain] resumed from {path} at step {position.step}", flush=True)
    return position, checkpoint["center"].to(center.device)


def _position_at_world_size(
    checkpoint: dict[str, Any], cfg: PretrainConfig, runtime: Runtime, n_patches: int, steps_per_epoch: int
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
                    if schedules.parse_length(k, getattr(cfg, k))[1] == "steps"]
        print(f"[pretrain] world size changed {checkpoint['world_size']} -> {runtime.world_size} (global batch "
              f"{old_batch} -> {new_batch}, {old_spe} -> {steps_per_epoch} steps per epoch, base lr scaled by "
              f"{new_batch / old_batch:g}): epoch {saved.epoch} continues after its first {moved.samples_into_epoch} "
              f"samples; step {saved.step} -> {moved.position.step} (epoch {moved.position.epoch}); "
              f"{moved.unseen_in_epoch} samples of epoch {saved.epoch} go unseen in it"
              + (f"; {', '.join(in_steps)} count steps of the new global batch" if in_steps else ""), flush=True)
    return moved.position


def restore_rng(saved_states: list[dict[str, Any]], runtime: Runtime, seed: int, step: int) -> None:
    """Restore this rank's RNG state (drop-path draws); a rank the checkpoint has no state for (the world grew)
    seeds from (seed, rank, step) instead, and states of ranks that no longer exist are dropped."""
    if runtime.rank >= len(saved_states):
        torch.manual_seed(sample_seed(seed, step, runtime.rank))
        print(f"[pretrain] rank {runtime.rank}: no RNG state in the checkpoint (written by {len(saved_states)} "
              "ranks); drop-path draws seeded from (seed, step, rank)", flush=True)
        return
    rng = saved_states[runtime.rank]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], runtime.device)


def truncate_log(log_path: Path, start_step: int) -> None:
    """Keep only log lines of steps already trained (a killed run may have logged past its last checkpoint)."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= start_step]
    atomic.write_text(log_path, "".join(line + "\n" for line in kept))


def training_reference(cfg: PretrainConfig, patches: Dataset, on_the_fly_reference: Any) -> dict | None:
    """The Macenko reference the macenko arm trained on (inference must normalise the same way); else None."""
    if cfg.input_arm != "macenko":
        return None
    if on_the_fly_reference is not None:
        return on_the_fly_reference.to_dict()
    store_reference = getattr(patches, "reference", None)  # PatchStoreDataset reads it from the manifest
    if store_reference is not None:
        return store_reference.to_dict()
    if cfg.macenko_reference:
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
