"""One DINO optimisation step (`DINOTrainStep`), its precision and its optimizer.

The training loop and `benchmarks/dino_step.py` both call `DINOTrainStep`, so the benchmark times the production
step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from exaonepath_core.config import PRECISIONS, ConfigError, PretrainConfig
from exaonepath_core.pretrain import head, loss
from exaonepath_core.pretrain.runtime import world_size

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without touching the last good checkpoint."""


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
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



def set_fused_attention_(model: nn.Module, enabled: bool) -> int:
    """Set timm attention blocks' `fused_attn`: True runs `scaled_dot_product_attention`, False the explicit
    q @ k^T, softmax, @ v path; returns how many blocks changed.

    On CPU under bf16 autocast, the fused `scaled_dot_product_attention` kernel's backward is 3-8x slower than the
    math path at ViT token counts (2 threads, forward + backward of one attention call: 34 vs 10 ms at 32 x 3 heads
    x 65 tokens, 223 vs 46 ms at 160 x 6 heads x 37 tokens) and took half of the step's time; the math path's
    bmm runs bf16 on AMX / AVX-512 like the linears. `benchmarks/dino_step.py --attention fused` times the step
    without this switch. fp32 (where the fused kernel is the faster) and CUDA keep the fused kernel.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "fused_attn", None) is (not enabled):
            module.fused_attn = enabled
            count += 1
    return count


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

    On CPU under bf16 the constructor switches the networks' timm attention to the math path
    (`set_fused_attention_`); `attention` says which path the step runs.
    """

    def __init__(
        self,
        student: nn.Module,
        student_net: head.MultiCropWrapper,
        teacher_net: head.MultiCropWrapper,
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
        self.last_layer_params = head.last_layer_parameters(student_net.head)
        self.student_params = list(self.student_net.parameters())
        self.scaler = torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None
        fused = bool(optimizer.defaults.get("fused"))
        self.sync_free = fused and self.scaler is None
        self.healthy = torch.ones((), dtype=torch.bool, device=parameter.device)
        self.attention = "fused"
        cpu_bf16 = self.device_type == "cpu" and self.precision == "bf16"
        if cpu_bf16 and set_fused_attention_(student_net, False) + set_fused_attention_(teacher_net, False):
            self.attention = "math"

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
        teacher_p = loss.teacher_probabilities(teacher_out, center, teacher_temp, self.centering,
                                               self.sinkhorn_iterations)
        step_loss = loss.dino_loss_from_targets(student_out, teacher_p, self.student_temp)
        mean_loss = step_loss.detach().float().reshape(1)
        if world_size() > 1:  # one collective; NaN / inf on any rank makes the sum non-finite on all
            mean_loss = mean_loss.clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world_size()
        mean_loss = mean_loss[0]
        finite = torch.isfinite(mean_loss)
        self.healthy = self.healthy & finite
        if not self.sync_free and not bool(self.healthy):
            return StepResult(mean_loss, finite, teacher_out, None, teacher_p)
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(step_loss) if self.scaler is not None else step_loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.clip_grad > 0:
            grad_norm = loss.clip_gradients_tensor_(self.student_params, self.clip_grad, self.clip_grad_mode)
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
        loss.ema_update_(self.teacher_net, self.student_net, ema_momentum)
        return StepResult(mean_loss, finite, teacher_out, grad_norm, teacher_p)

    def next_center(self, center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
        """DINO's centre update, held at its old value once a loss was non-finite (no host sync)."""
        updated = loss.update_center(center, teacher_out, momentum)
        return torch.where(self.healthy, updated, center)


def make_optimizer(student_net: nn.Module, fused: bool) -> torch.optim.AdamW:
    """AdamW over the student with DINO's two groups (no decay on biases and norms); fused kernels when asked."""
    device_type = next(student_net.parameters()).device.type
    use_fused = fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(student_net), lr=0.0, weight_decay=0.0, fused=use_fused or None)


def run_precision(cfg: PretrainConfig, device: torch.device) -> str:
    """The step's precision for this run (`precision`, with `auto` resolved for the device)."""
    return resolve_precision(cfg.precision, device, cfg.use_amp)
