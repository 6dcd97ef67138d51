"""Per-step schedules (one value per optimisation step), indexed by the global step as in DINO."""
from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from `start_warmup` to `base`, then a half cosine from `base` to `final`; one value per step.

    The warm-up covers `warmup_epochs * steps_per_epoch` steps and ends one step short of `base`; the cosine part
    starts exactly at `base` and ends exactly at `final`. DINO's `cosine_scheduler` places the endpoints the other
    way round (its warm-up reaches `base`, its cosine stops one step short of `final`): the two differ by one
    step's increment at the two joints, so, e.g., our teacher momentum is exactly 1.0 on the last step.
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be positive")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must lie in [0, epochs={epochs}]")
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_steps, endpoint=False) if warmup_steps > 0 else np.array([])
    cosine_steps = total_steps - warmup_steps
    if cosine_steps == 1:
        cosine = np.array([base], dtype=np.float64)
    else:
        # phase runs 0..pi inclusive so the last step is exactly `final`
        phase = np.pi * np.arange(cosine_steps) / max(cosine_steps - 1, 1)
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(phase))
    schedule = np.concatenate([warmup, cosine]).astype(np.float64)
    assert len(schedule) == total_steps, (len(schedule), total_steps)
    return schedule


def warmup_then_constant(
    start: float, value: float, warmup_epochs: int, epochs: int, steps_per_epoch: int
) -> np.ndarray:
    """Linear ramp from `start` to `value` over `warmup_epochs`, then constant; one value per step.

    This is DINO's teacher-temperature schedule (there indexed per epoch; here per step, so the ramp is smooth).
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be positive")
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(max(warmup_epochs, 0), epochs) * steps_per_epoch
    ramp = np.linspace(start, value, warmup_steps) if warmup_steps > 0 else np.array([])
    schedule = np.concatenate([ramp, np.full(total_steps - warmup_steps, value)]).astype(np.float64)
    assert len(schedule) == total_steps, (len(schedule), total_steps)
    return schedule
