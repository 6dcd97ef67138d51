"""The process a run lives in: rank, world size and device (DDP from torchrun's environment), the git state
printed at start-up, and the exclusive lock on the output folder."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from exaonepath_core.config import ConfigError, PretrainConfig
from exaonepath_core.io import atomic, env_check


@dataclass
class Runtime:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool


def init_distributed(cfg: PretrainConfig) -> Runtime:
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
    return Runtime(rank, world_size, local_rank, device, initialized_here)


def git_state() -> dict[str, Any]:
    """The repository's HEAD and whether tracked files differ from it (printed and recorded with the run)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": None}



def world_size() -> int:
    """The process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class OutputDirBusyError(RuntimeError):
    """Another training process holds the output folder."""


@contextlib.contextmanager
def sole_writer(output_dir: Path, is_main: bool) -> Iterator[None]:
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


def prepare_run(cfg: PretrainConfig, runtime: Runtime) -> dict[str, Any]:
    """Make the output folder, set the numeric modes, print the start-up banner; returns the git state."""
    device = runtime.device
    if runtime.rank == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # fp32 matmuls outside autocast (the loss head's softmax inputs stay fp32) may use TF32, as dinov2 does
        torch.set_float32_matmul_precision("high")
    git = git_state()
    if runtime.rank == 0:
        print(f"[pretrain] git {git['git_sha']} dirty={git['git_dirty']} world_size={runtime.world_size} "
              f"device={device} torch={torch.__version__}", flush=True)
        print(f"[pretrain] build: {env_check.cuda_build_line()}", flush=True)
        print("[pretrain] settings:\n" + "\n".join(f"  {k}: {v!r}" for k, v in cfg.to_dict().items()), flush=True)
    return git
