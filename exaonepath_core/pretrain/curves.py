"""The training curves of a run's `log.jsonl`: loss, schedules, teacher entropy (collapse check), centre and
throughput against the step, drawn in the house style (`io.plotting`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from exaonepath_core.io import plotting


def read_log(log_jsonl: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `log.jsonl` (one JSON object per line)."""
    with open(log_jsonl) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_training_curves(log_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Loss, schedules, teacher entropy (collapse check), centre and throughput against the step, as one PNG."""
    records = read_log(log_jsonl)
    if not records:
        raise ValueError(f"{log_jsonl} holds no records")
    steps = np.array([r["step"] for r in records])

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)

    with plotting.house_style():
        fig = plotting.new_figure(14, 7.5)
        axes = fig.subplots(2, 3)
        _draw_curves(axes, steps, series, records)
        fig.tight_layout()
        return plotting.save_png(fig, out_png)


def _draw_curves(axes: np.ndarray, steps: np.ndarray, series: Any, records: list[dict[str, Any]]) -> None:
    """The six panels of `plot_training_curves` on a (2, 3) array of axes."""
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
    ax_wd.plot(steps, series("wd"), color="C1", label="weight decay")
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
