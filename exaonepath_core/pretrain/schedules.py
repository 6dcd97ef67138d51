"""Per-step schedules (one value per optimisation step), indexed by the global step as in DINO."""
from __future__ import annotations

import numpy as np

from exaonepath_core.config import parse_length


def length_in_steps(key: str, value: float | str, steps_per_epoch: int) -> int:
    """A schedule length (epochs, fractional allowed, or "N steps") as a whole number of steps (epochs rounded)."""
    amount, unit = parse_length(key, value)
    return int(amount) if unit == "steps" else round(amount * steps_per_epoch)


def cosine_schedule(
    base: float,
    final: float,
    epochs: float,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
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
    return cosine_schedule_steps(base, final, length_in_steps("epochs", epochs, steps_per_epoch),
                                 length_in_steps("warmup_epochs", warmup_epochs, steps_per_epoch), start_warmup)


def cosine_schedule_steps(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """`cosine_schedule` with both lengths given in steps (what fractional epochs and "N steps" resolve to)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps ({total_steps}) must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must lie in [0, total_steps={total_steps}]")
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
    start: float, value: float, warmup_epochs: float, epochs: float, steps_per_epoch: int
) -> np.ndarray:
    """Linear ramp from `start` to `value` over `warmup_epochs`, then constant; one value per step.

    This is DINO's teacher-temperature schedule (there indexed per epoch; here per step, so the ramp is smooth).
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be positive")
    return warmup_then_constant_steps(start, value, length_in_steps("warmup_epochs", max(warmup_epochs, 0),
                                                                    steps_per_epoch),
                                      length_in_steps("epochs", epochs, steps_per_epoch))


def warmup_then_constant_steps(start: float, value: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """`warmup_then_constant` with lengths in steps; a warm-up longer than the run is cut at its end (as DINO)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps ({total_steps}) must be positive")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    ramp = np.linspace(start, value, warmup_steps) if warmup_steps > 0 else np.array([])
    schedule = np.concatenate([ramp, np.full(total_steps - warmup_steps, value)]).astype(np.float64)
    assert len(schedule) == total_steps, (len(schedule), total_steps)
    return schedule
