"""Live training curves: TensorBoard event files and (optionally) Weights & Biases, from rank 0 only.

`log.jsonl` stays the record of truth; these mirror its records for watching a run that lasts days:
    tensorboard --logdir OUTPUT_DIR/tensorboard
TensorBoard is on by default where the `tensorboard` package is installed (`pretrain.tensorboard`); W&B only
when `pretrain.wandb_project` is set, and `wandb` is imported only then (WANDB_MODE=offline works: sync later
with `wandb sync OUTPUT_DIR/wandb/offline-run-*`).
"""
from __future__ import annotations

import importlib
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Protocol

from exaonepath_core.io import atomic

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
SCALAR_PREFIX = "train/"
# record keys that are not curves (the step is the x axis; centering is a setting)
_NOT_SCALARS = frozenset({"step", "centering"})


class _Sink(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a log.jsonl record, keyed `train/<field>` (None, bools and text left out)."""
    scalars = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            scalars[SCALAR_PREFIX + key] = float(value)
    return scalars


class _TensorBoardSink:
    """Event files under OUTPUT_DIR/tensorboard (a resume purges the events after its start step)."""

    def __init__(self, log_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is not installed

        # flush often: the point is watching a run while it trains
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=30)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandbSink:
    """A W&B run in `project`; a resumed training continues the same W&B run (id kept in the output folder)."""

    def __init__(self, project: str, output_dir: Path, config: dict[str, Any], resuming: bool) -> None:
        try:
            wandb = importlib.import_module("wandb")  # imported only when a project is set
        except ImportError as err:
            raise ImportError(f"pretrain.wandb_project={project!r} needs the wandb package ({err}): "
                              "pip install wandb, or leave wandb_project empty") from err
        id_file = output_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            atomic.write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(output_dir), config=config,
                              name=f"{output_dir.parent.name}/{output_dir.name}")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        # called from training's `finally`: an exception in flight marks the W&B run failed, not finished
        self.run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)


class LiveMetrics:
    """Sends each logged training record to every open sink (none on ranks other than 0)."""

    def __init__(self, sinks: list[_Sink]) -> None:
        self.sinks = sinks

    @property
    def enabled(self) -> bool:
        """True when at least one sink is open."""
        return bool(self.sinks)

    def log(self, record: dict[str, Any]) -> None:
        """Mirror one log.jsonl record (its `step` is the x axis)."""
        if not self.sinks:
            return
        scalars = record_scalars(record)
        for sink in self.sinks:
            sink.log(scalars, int(record["step"]))

    def close(self) -> None:
        """Flush and close every sink."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_live_metrics(cfg: Any, output_dir: Path, is_main: bool, start_step: int) -> LiveMetrics:
    """The sinks `cfg.tensorboard` / `cfg.wandb_project` ask for, on rank 0; a note when TensorBoard is absent."""
    if not is_main:
        return LiveMetrics([])
    sinks: list[_Sink] = []
    if cfg.tensorboard:
        try:
            sinks.append(_TensorBoardSink(output_dir / TENSORBOARD_DIR, start_step))
        except ImportError as err:
            print(f"[pretrain] TensorBoard curves off: {err} (pip install tensorboard, or set "
                  "pretrain.tensorboard=false to silence this)", flush=True)
    if cfg.wandb_project:
        os.environ.setdefault("WANDB_SILENT", "true")  # keep the training log readable
        sinks.append(_WandbSink(cfg.wandb_project, output_dir, cfg.to_dict(), resuming=start_step > 0))
    return LiveMetrics(sinks)
