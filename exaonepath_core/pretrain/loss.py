"""DINO loss, teacher targets (centring or Sinkhorn-Knopp), centre update, gradient clipping, EMA teacher and the
collapse diagnostics.

Follows Caron et al. 2021 (DINO, Algorithm 1 and the released recipe). The loss and the update rules are pure
functions of their inputs (schedule values are passed in), so they can be tested against their definitions and
run identically in one process or under DDP (every collective is guarded by `dist.is_initialized()`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as nnf
from torch import nn

from exaonepath_core.config import CENTERINGS, CLIP_MODES


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global: int = 2,
    centering: str = "center",
    sinkhorn_iterations: int = 3,
) -> torch.Tensor:
    """DINO cross-entropy between centred, sharpened teacher and student distributions, averaged over view pairs.

    `student_out`: (n_crops * B, K) for all views in crop order; `teacher_out`: (n_global * B, K) for the global
    views; `center`: (1, K). Pairs where teacher and student see the same view are skipped. Computed in float32.
    `centering`: "center" (DINO: subtract the running centre) or "sinkhorn_knopp" (DINOv2/SwAV: balance the
    batch's teacher assignments over the K dimensions; `center` is then unused).
    """
    if teacher_out.shape[0] % n_global:
        raise ValueError(f"teacher_out rows ({teacher_out.shape[0]}) not divisible by n_global ({n_global})")
    teacher_p = teacher_probabilities(teacher_out, center, teacher_temp, centering, sinkhorn_iterations)
    return dino_loss_from_targets(student_out, teacher_p, student_temp, n_global)


def dino_loss_from_targets(
    student_out: torch.Tensor, teacher_p: torch.Tensor, student_temp: float, n_global: int = 2
) -> torch.Tensor:
    """`dino_loss` given the teacher's target distributions (`teacher_probabilities`, rows summing to 1).

    The training step computes the targets once and reuses them for the loss and the collapse diagnostics.
    """
    if teacher_p.shape[0] % n_global:
        raise ValueError(f"teacher rows ({teacher_p.shape[0]}) not divisible by n_global ({n_global})")
    batch = teacher_p.shape[0] // n_global
    if batch == 0 or student_out.shape[0] % batch:
        raise ValueError(f"student_out rows ({student_out.shape[0]}) not a multiple of the batch size ({batch})")
    n_crops = student_out.shape[0] // batch
    if n_crops < 2:
        raise ValueError(f"DINO needs at least two views, got {n_crops}")
    student_logp = nnf.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_p = teacher_p.detach().float().chunk(n_global)
    total = student_out.new_zeros((), dtype=torch.float32)
    n_terms = 0
    for iq, q in enumerate(teacher_p):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * student_logp[v], dim=-1).mean()
            n_terms += 1
    return total / n_terms


def _distributed() -> bool:
    """Whether collectives are needed: a process group of more than one rank (a world of one skips them)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def teacher_probabilities(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                          centering: str = "center", sinkhorn_iterations: int = 3) -> torch.Tensor:
    """The teacher's target distributions (rows sum to 1), float32.

    "center": softmax((t - c) / T) as in DINO. "sinkhorn_knopp": exp(t / T) scaled by a few Sinkhorn-Knopp
    iterations so that over the whole (global, all-rank) batch every dimension receives the same total mass and
    every row sums to one. The balance constraint rules out the one-dimension collapse that a sharp temperature
    causes with a running centre, which lets a short run use a temperature sharp enough to avoid the uniform one.
    """
    if centering == "center":
        return nnf.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
    if centering != "sinkhorn_knopp":
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if sinkhorn_iterations < 1:
        raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
    distributed = _distributed()
    # float64 and one shift by the global maximum (a global scale, removed exactly by the first normalisation):
    # no overflow, and no underflow unless logits / T spread over more than ~700
    logits = teacher_out.double() / teacher_temp
    top = logits.max().reshape(1)
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - top).t()  # (K, rows)
    rows = torch.tensor(float(q.shape[1]), device=q.device, dtype=q.dtype)
    total = q.sum().reshape(1)
    if distributed:
        dist.all_reduce(rows)
        dist.all_reduce(total)
    q = q / total
    n_dims = q.shape[0]
    for _ in range(sinkhorn_iterations):
        per_dim = q.sum(dim=1, keepdim=True)  # each dimension's mass over the global batch -> 1/K
        if distributed:
            dist.all_reduce(per_dim)
        q = q / per_dim.clamp_min(1e-30) / n_dims
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / rows  # each row's mass -> 1/rows
    return (q * rows).t().float()


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """New centre `m * center + (1 - m) * mean(teacher_out)`, the mean taken over all ranks' rows."""
    batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
    rows = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
    if _distributed():
        dist.all_reduce(batch_sum)
        dist.all_reduce(rows)
    return center * momentum + (batch_sum / rows) * (1.0 - momentum)


@torch.no_grad()
def clip_gradients_(parameters: list[nn.Parameter], max_norm: float, mode: str = "per_parameter") -> float:
    """Clip gradients in place; returns the total gradient norm before clipping.

    "per_parameter" (DINO's `clip_gradients`): each parameter's gradient is scaled by
    min(1, max_norm / (||g|| + 1e-6)) on its own. "global" (DINOv2, `clip_grad_norm_`): all gradients share one
    scale from their joint norm. Both use foreach kernels (one launch per op over all parameters).
    """
    total = clip_gradients_tensor_(parameters, max_norm, mode)
    return 0.0 if total is None else float(total)


@torch.no_grad()
def clip_gradients_tensor_(parameters: list[nn.Parameter], max_norm: float,
                           mode: str = "per_parameter") -> torch.Tensor | None:
    """`clip_gradients_` returning the total norm as a device tensor (no host sync); None without gradients."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads)).float()
    total = torch.linalg.vector_norm(norms)
    if mode == "per_parameter":
        torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))
    else:
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """In place: teacher_p <- m * teacher_p + (1 - m) * student_p for every parameter (fused foreach ops).

    `momentum` may be a 0-d device tensor (the training step's, 1 after a non-finite loss): no host sync.
    """
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(set(teacher_params) ^ set(student_params))[:5]
        raise ValueError(f"teacher and student parameters differ (e.g. {missing}); pass unwrapped modules")
    names = list(teacher_params)
    t = [teacher_params[n].detach() for n in names]
    s = [student_params[n].detach() for n in names]
    if isinstance(momentum, torch.Tensor):
        weight = momentum.to(t[0].dtype)
        torch._foreach_mul_(t, weight)
        torch._foreach_add_(t, torch._foreach_mul(s, 1.0 - weight))
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


@torch.no_grad()
def teacher_stats(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float,
                  centering: str = "center", sinkhorn_iterations: int = 3) -> dict[str, float]:
    """Collapse diagnostics of the teacher's target distribution (nats).

    `teacher_entropy`: mean per-sample entropy (-> log K when collapsed to uniform);
    `teacher_entropy_of_mean`: entropy of the batch-mean distribution (-> 0 when one dimension dominates);
    `teacher_kl`: their difference, the mean KL(p_i || mean p), which falls to 0 under either collapse.
    """
    p = teacher_probabilities(teacher_out, center, teacher_temp, centering, sinkhorn_iterations)
    return target_stats(p, center)


@torch.no_grad()
def target_stats(p: torch.Tensor, center: torch.Tensor) -> dict[str, float]:
    """`teacher_stats` from target distributions already computed (the training step's, shared with its loss)."""
    p = p.float()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    mean_p = p.mean(0)
    entropy_of_mean = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return {
        "teacher_entropy": float(entropy),
        "teacher_entropy_of_mean": float(entropy_of_mean),
        "teacher_kl": float(entropy_of_mean - entropy),
        "teacher_max_entropy": math.log(p.shape[-1]),
        "center_norm": float(center.float().norm()),
        "center_mean": float(center.float().mean()),
    }
