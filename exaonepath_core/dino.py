"""DINO building blocks: multi-crop views, projection head, multi-crop wrapper, loss, centre and EMA updates.

Follows Caron et al. 2021 (DINO, Algorithm 1 and the released recipe). The loss and the update rules are pure
functions of their inputs (schedule values are passed in), so they can be tested against their definitions and
run identically in one process or under DDP (every collective is guarded by `dist.is_initialized()`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as tvf
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# Multi-crop augmentation
# ----------------------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentations, a pure function of (run seed, epoch, dataset index)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _bernoulli(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


def _to_chw_float(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HWC (numpy or tensor, any device) -> float CHW in [0, 1] on the same device."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got dtype={tensor.dtype} shape={tuple(tensor.shape)}")
    return tensor.permute(2, 0, 1).float().div_(255.0)


class MultiCropAugmentation:
    """DINO's multi-crop: two global views and `n_local` local views of one uint8 HWC image.

    Returns `[global1, global2, local1..localN]` as float CHW tensors normalised with ImageNet mean/std.
    Global 1: random resized crop, flip, colour jitter (p=0.8), grayscale (p=0.2), blur (p=1.0).
    Global 2: the same with blur p=0.1 and solarization p=0.2. Locals: blur p=0.5.
    Every random draw comes from the `generator` passed per call, so a sample's views are a pure function of
    its seed (exact resume needs that); the image may live on any device, the random numbers are drawn on CPU.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.color_jitter = tuple(color_jitter)
        self.blur_sigma = tuple(blur_sigma)
        self.mean = tuple(mean)
        self.std = tuple(std)

    @property
    def n_crops(self) -> int:
        """Number of views returned per image (2 global + n_local)."""
        return 2 + self.n_local

    def __call__(self, image: np.ndarray | torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Views `[g1, g2, l1..lN]` of one uint8 (H, W, 3) image; randomness from `generator` only."""
        img = _to_chw_float(image)
        views = [
            self._view(img, generator, self.global_size, self.global_scale, blur_p=1.0, solarize_p=0.0),
            self._view(img, generator, self.global_size, self.global_scale, blur_p=0.1, solarize_p=0.2),
        ]
        for _ in range(self.n_local):
            views.append(self._view(img, generator, self.local_size, self.local_scale, blur_p=0.5, solarize_p=0.0))
        return views

    # -- one view ------------------------------------------------------------------------------------------------
    def _view(
        self,
        img: torch.Tensor,
        gen: torch.Generator,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
    ) -> torch.Tensor:
        top, left, height, width = self._crop_box(img.shape[-2], img.shape[-1], scale, gen)
        view = tvf.resized_crop(
            img, top, left, height, width, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
        ).clamp_(0.0, 1.0)  # bicubic overshoots; the colour ops below assume [0, 1]
        if _bernoulli(gen, 0.5):
            view = tvf.horizontal_flip(view)
        if _bernoulli(gen, 0.8):
            view = self._color_jitter(view, gen)
        if _bernoulli(gen, 0.2):
            view = tvf.rgb_to_grayscale(view, num_output_channels=3)
        if _bernoulli(gen, blur_p):
            sigma = _uniform(gen, *self.blur_sigma)
            # kernel wide enough for +-3 sigma, odd, and no larger than the view itself
            kernel = min(2 * math.ceil(3 * sigma) + 1, size if size % 2 == 1 else size - 1)
            view = tvf.gaussian_blur(view, [kernel, kernel], [sigma, sigma])
        if _bernoulli(gen, solarize_p):
            view = tvf.solarize(view, 0.5)
        mean = torch.tensor(self.mean, device=view.device, dtype=view.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=view.device, dtype=view.dtype).view(3, 1, 1)
        return (view - mean) / std

    @staticmethod
    def _crop_box(
        height: int, width: int, scale: tuple[float, float], gen: torch.Generator
    ) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box sampling (area fraction in `scale`, aspect ratio 3/4..4/3, 10 tries)."""
        area = height * width
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target_area = area * _uniform(gen, *scale)
            aspect = math.exp(_uniform(gen, *log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (), generator=gen))
                left = int(torch.randint(0, width - crop_w + 1, (), generator=gen))
                return top, left, crop_h, crop_w
        side = min(height, width)  # fallback: central square crop, as torchvision does for in-range ratios
        return (height - side) // 2, (width - side) // 2, side, side

    def _color_jitter(self, view: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        brightness, contrast, saturation, hue = self.color_jitter
        factors = (
            _uniform(gen, max(0.0, 1 - brightness), 1 + brightness),
            _uniform(gen, max(0.0, 1 - contrast), 1 + contrast),
            _uniform(gen, max(0.0, 1 - saturation), 1 + saturation),
            _uniform(gen, -hue, hue),
        )
        for op in torch.randperm(4, generator=gen).tolist():  # random order, as torchvision's ColorJitter
            if op == 0:
                view = tvf.adjust_brightness(view, factors[0])
            elif op == 1:
                view = tvf.adjust_contrast(view, factors[1])
            elif op == 2:
                view = tvf.adjust_saturation(view, factors[2])
            elif hue > 0:
                view = tvf.adjust_hue(view, factors[3])
        return view


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """DINO projection head: MLP to a bottleneck, L2 normalisation, weight-normalised linear layer to `out_dim`.

    The last layer uses `torch.nn.utils.parametrizations.weight_norm`; its state_dict keys are
    `last_layer.parametrizations.weight.original0` (the norm g, fixed at 1 when `norm_last_layer`) and
    `...original1` (the direction v).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) logits."""
        x = self.mlp(x)
        x = nnf.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops; the backbone runs once per run of equal-resolution crops."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Crops (each (B, 3, H, W)) -> head outputs concatenated in crop order, shape (n_crops * B, out_dim)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        sizes = [tuple(c.shape[-2:]) for c in crops]
        features = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


def last_layer_parameters(head: DINOHead) -> list[nn.Parameter]:
    """The head's last-layer parameters (frozen during the first `freeze_last_layer` epochs)."""
    return list(head.last_layer.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Loss, centre, EMA
# ----------------------------------------------------------------------------------------------------------------
def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    n_global: int = 2,
) -> torch.Tensor:
    """DINO cross-entropy between centred, sharpened teacher and student distributions, averaged over view pairs.

    `student_out`: (n_crops * B, K) for all views in crop order; `teacher_out`: (n_global * B, K) for the global
    views; `center`: (1, K). Pairs where teacher and student see the same view are skipped. Computed in float32.
    """
    if teacher_out.shape[0] % n_global:
        raise ValueError(f"teacher_out rows ({teacher_out.shape[0]}) not divisible by n_global ({n_global})")
    batch = teacher_out.shape[0] // n_global
    if batch == 0 or student_out.shape[0] % batch:
        raise ValueError(f"student_out rows ({student_out.shape[0]}) not a multiple of the batch size ({batch})")
    n_crops = student_out.shape[0] // batch
    if n_crops < 2:
        raise ValueError(f"DINO needs at least two views, got {n_crops}")
    student_logp = nnf.log_softmax(student_out.float() / student_temp, dim=-1).chunk(n_crops)
    teacher_p = nnf.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1).detach().chunk(n_global)
    total = student_out.new_zeros((), dtype=torch.float32)
    n_terms = 0
    for iq, q in enumerate(teacher_p):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * student_logp[v], dim=-1).mean()
            n_terms += 1
    return total / n_terms


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """New centre `m * center + (1 - m) * mean(teacher_out)`, the mean taken over all ranks' rows."""
    batch_sum = teacher_out.float().sum(dim=0, keepdim=True)
    rows = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        dist.all_reduce(rows)
    return center * momentum + (batch_sum / rows) * (1.0 - momentum)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher_p <- m * teacher_p + (1 - m) * student_p for every parameter (fused foreach ops)."""
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(set(teacher_params) ^ set(student_params))[:5]
        raise ValueError(f"teacher and student parameters differ (e.g. {missing}); pass unwrapped modules")
    names = list(teacher_params)
    t = [teacher_params[n].detach() for n in names]
    s = [student_params[n].detach() for n in names]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


@torch.no_grad()
def teacher_stats(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> dict[str, float]:
    """Collapse diagnostics of the teacher's centred, sharpened distribution (nats).

    `teacher_entropy`: mean per-sample entropy (-> log K when collapsed to uniform);
    `teacher_entropy_of_mean`: entropy of the batch-mean distribution (-> 0 when one dimension dominates);
    `teacher_kl`: their difference, the mean KL(p_i || mean p), which falls to 0 under either collapse.
    """
    p = nnf.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    mean_p = p.mean(0)
    entropy_of_mean = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return {
        "teacher_entropy": float(entropy),
        "teacher_entropy_of_mean": float(entropy_of_mean),
        "teacher_kl": float(entropy_of_mean - entropy),
        "teacher_max_entropy": math.log(teacher_out.shape[-1]),
        "center_norm": float(center.float().norm()),
        "center_mean": float(center.float().mean()),
    }
