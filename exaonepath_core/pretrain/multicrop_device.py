"""DINO multi-crop pixel work on the training device, from the views' random parameters alone.

`multicrop.MultiCropAugmentation.apply` sends images that live on an accelerator here (and `apply_on_device` lets a CPU
run take the same path, for tests and the host-time benchmark). Every weight is built on the images' device from
the (B, n_crops, N_VIEW_PARAMS) parameter tensor with a fixed sequence of batched ops: no per-sample Python loop,
no host-built dense matrix, no host read of a device value (so no synchronisation), and the same number of
kernel launches whatever the parameters are. The arithmetic is the host path's:

- crop + resize + flip: antialiased bicubic weights (PIL's / torch's `antialias=True` kernel, a = -0.5), evaluated
  for every (output pixel, source pixel) pair and masked to the crop box, then two batched matmuls per crop;
- colour jitter and grayscale: per-view 3x3 colour maps for the four stages in each view's own order (identity
  where a stage does nothing, which is exact), with the contrast stage's mean-gray offset;
- Gaussian blur: one (S, S) reflect-padded matrix per view and axis from the tap weights (the identity for views
  without blur), taps built for the largest radius the configured sigma range allows;
- solarize and the ImageNet normalisation as element-wise selects.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from exaonepath_core.pretrain import view_params as vp

_CONSTANTS: dict[tuple, torch.Tensor] = {}  # small constant tensors per (name, device): built once, then reused


def _constant(name: str, device: torch.device, build) -> torch.Tensor:
    key = (name, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = build().to(device)
    return _CONSTANTS[key]


class CropSettings(Protocol):
    """What the pixel work reads of a `multicrop.MultiCropAugmentation` (its sizes, blur range, mean and std)."""

    global_size: int
    local_size: int
    n_local: int
    blur_sigma: tuple[float, float]
    mean: Sequence[float]
    std: Sequence[float]


def apply_views(aug: CropSettings, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
    """Views `[g1, g2, l1..lN]` (each (B, 3, S, S) float32 on the images' device) of uint8 (B, H, W, 3) images."""
    batch, height, width, _ = images.shape
    device = images.device
    params = params.detach().to(device, torch.float32, non_blocking=True)
    pixels = images.to(torch.float32).div_(255.0).reshape(batch, height, width * 3)
    mean = _constant(f"mean{aug.mean}", device, lambda: torch.tensor(aug.mean).view(1, 3, 1, 1))
    std = _constant(f"std{aug.std}", device, lambda: torch.tensor(aug.std).view(1, 3, 1, 1))
    colour = _colour_maps(params.reshape(-1, vp.N_VIEW_PARAMS))  # every view's maps at once (fewer ops)
    views: list[torch.Tensor] = []
    for size, first, count in ((aug.global_size, 0, 2), (aug.local_size, 2, aug.n_local)):
        if count == 0:
            continue
        crop_rows = params[:, first:first + count]  # (B, C, P): every crop of the group at once
        group = _resized_crops(pixels, crop_rows, height, width, size)  # (C * B, 3, S, S), view-major
        rows = crop_rows.transpose(0, 1).reshape(-1, vp.N_VIEW_PARAMS)
        group = _colour(group, [_group_rows(m, batch, first, count) for m in colour])
        group = _blur(group, rows[:, vp.P_SIGMA], size, aug.blur_sigma[1])
        solarize = (rows[:, vp.P_SOLARIZE] > 0).view(-1, 1, 1, 1)
        group = torch.where(solarize & (group >= 0.5), 1.0 - group, group)
        views.extend(group.sub_(mean).div_(std).split(batch))
    return views


def _resize_weights(start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor | None, full: int,
                    out_size: int) -> torch.Tensor:
    """(..., out_size, full) weights resizing the crops [start, start + length) of `full` pixels to `out_size`."""
    device = start.device
    start, length = start[..., None, None], length[..., None, None]
    out_index = torch.arange(out_size, device=device, dtype=torch.float32)[:, None]  # (S, 1)
    if flip is not None:  # a flipped crop is the unflipped one with output rows reversed
        out_index = torch.where(flip[..., None, None] > 0, out_size - 1 - out_index, out_index)
    scale = length / out_size
    centre = (out_index + 0.5) * scale  # (..., S, 1)
    local = torch.arange(full, device=device, dtype=torch.float32) - start  # (..., 1, full)
    weights = vp.cubic_aa((local + 0.5 - centre) / scale.clamp(min=1.0))
    weights = weights * ((local >= 0) & (local < length))
    return weights / weights.sum(-1, keepdim=True)


def _resized_crops(pixels: torch.Tensor, rows: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """Crop, resize and flip (B, H, W*3) float pixels for the C crops of `rows` (B, C, P): two batched matmuls,
    the crops folded into the rows of the first (no copy of the pixels per crop). Returns (C * B, 3, S, S)."""
    batch, n_crops = rows.shape[:2]
    if height == width:  # square patches: both axes' weights in one pass (half the ops to queue)
        no_flip = torch.zeros_like(rows[..., vp.P_FLIP])
        vertical, horizontal = _resize_weights(
            torch.stack([rows[..., vp.P_TOP], rows[..., vp.P_LEFT]]),
            torch.stack([rows[..., vp.P_HEIGHT], rows[..., vp.P_WIDTH]]),
            torch.stack([no_flip, rows[..., vp.P_FLIP]]), height, size).unbind(0)  # (B, C, S, H) each
    else:
        vertical = _resize_weights(rows[..., vp.P_TOP], rows[..., vp.P_HEIGHT], None, height, size)
        horizontal = _resize_weights(rows[..., vp.P_LEFT], rows[..., vp.P_WIDTH], rows[..., vp.P_FLIP],
                                     width, size)
    out = torch.bmm(vertical.reshape(batch, n_crops * size, height), pixels)  # (B, C*S, W*3)
    out = out.view(batch * n_crops, size, width, 3).transpose(1, 2).reshape(batch * n_crops, width, size * 3)
    out = torch.bmm(horizontal.reshape(batch * n_crops, size, width), out)  # (B*C, S_x, S_y*3)
    out = out.view(batch, n_crops, size, size, 3).permute(1, 0, 4, 3, 2)  # (C, B, 3, S_y, S_x)
    return out.reshape(n_crops * batch, 3, size, size).clamp_(0.0, 1.0)  # bicubic overshoots


def _hue_matrices(hue_factor: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) RGB maps rotating the YIQ chroma plane by 2 pi * factor (the host path's `_hue_matrices`)."""
    device = hue_factor.device
    to_yiq = _constant("to_yiq", device, lambda: torch.from_numpy(vp.RGB_TO_YIQ).float())
    from_yiq = _constant("from_yiq", device, lambda: torch.linalg.inv(torch.from_numpy(vp.RGB_TO_YIQ)).float())
    angle = -2 * math.pi * hue_factor
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=-1).view(-1, 3, 3)
    matrices = from_yiq @ rotation @ to_yiq
    identity = torch.eye(3, device=device).expand_as(matrices)
    return torch.where((hue_factor == 0).view(-1, 1, 1), identity, matrices)


def _group_rows(per_view: torch.Tensor, batch: int, first: int, count: int) -> torch.Tensor:
    """The rows of crops first..first+count-1 of a (B * n_crops, ...) per-view tensor, view-major."""
    per_sample = per_view.view(batch, -1, *per_view.shape[1:])[:, first:first + count]
    return per_sample.transpose(0, 1).reshape(count * batch, *per_view.shape[1:])


def _colour_maps(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per view: the four stages' 3x3 maps (N, 4, 3, 3), the contrast blend weight per stage (N, 4) and the
    final grayscale-or-identity map (N, 3, 3)."""
    device = rows.device
    gray = _constant("gray", device, lambda: torch.tensor(vp.GRAY_WEIGHTS))
    identity = torch.eye(3, device=device)
    to_gray = gray[None, :].expand(3, 3)
    brightness, contrast, saturation = (rows[:, vp.P_BRIGHTNESS + op].view(-1, 1, 1) for op in range(3))
    candidates = torch.stack([brightness * identity, contrast * identity,
                              saturation * identity + (1 - saturation) * to_gray,
                              _hue_matrices(rows[:, vp.P_HUE])], dim=1)  # (N, op, 3, 3)
    order = rows[:, vp.P_ORDER].long()  # (N, stage): the op of each stage
    stage_matrices = torch.take_along_dim(candidates, order[:, :, None, None], dim=1)  # (N, stage, 3, 3)
    # contrast blends with the mean gray level of the image as it is at its stage; other ops add nothing
    blend = ((order == 1) & (contrast.view(-1, 1) != 1.0)) * (1 - contrast.view(-1, 1))  # (N, stage)
    final = torch.where((rows[:, vp.P_GRAY] > 0).view(-1, 1, 1), to_gray, identity)
    return stage_matrices, blend, final


def _colour(views: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    """Colour jitter (four stages, per-view op order) then grayscale, from `_colour_maps` (no host reads)."""
    n, _, h, w = views.shape
    stage_matrices, blend, final = maps
    gray = _constant("gray", views.device, lambda: torch.tensor(vp.GRAY_WEIGHTS))
    flat = views.reshape(n, 3, h * w)
    for stage in range(4):
        gray_mean = gray @ flat.mean(-1).T  # (N,): mean over pixels, then luma
        # the clamp is exact on views already in [0, 1] (the resize clamps, every stage clamps)
        flat = torch.baddbmm((blend[:, stage] * gray_mean).view(n, 1, 1), stage_matrices[:, stage], flat)
        flat = flat.clamp_(0.0, 1.0)
    return torch.bmm(final, flat).view(n, 3, h, w)


def _reflect_shifts(size: int, radius: int) -> torch.Tensor:
    """(2 * radius + 1, size, size) float32 0/1 matrices: row i of shift d picks pixel i + d, reflected."""
    return vp.reflect_shifts(size, radius).float()


def _blur(views: torch.Tensor, sigma: torch.Tensor, size: int, sigma_max: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (as `tvf.gaussian_blur`); views with sigma 0 pass unchanged."""
    device = views.device
    max_kernel = size if size % 2 == 1 else size - 1
    cap = (max_kernel - 1) // 2
    max_radius = min(math.ceil(3 * sigma_max), cap)  # known on the host: no read of the sampled sigmas
    radius = torch.clamp(torch.ceil(3 * sigma), max=cap)
    # the tap offsets, their centre indicator and the reflect shifts flattened to (taps, S * S): built once per
    # (size, radius, device), so each call queues only the per-view arithmetic
    offsets = _constant(f"offsets{max_radius}", device,
                        lambda: torch.arange(-max_radius, max_radius + 1, dtype=torch.float32)[None, :])
    centre_tap = _constant(f"centre_tap{max_radius}", device, lambda: (
        torch.arange(-max_radius, max_radius + 1) == 0).float()[None, :])
    blurred = (sigma > 0)[:, None]
    safe_sigma = torch.where(blurred, sigma[:, None], 1.0)
    taps = torch.exp(-0.5 * (offsets / safe_sigma) ** 2) * (offsets.abs() <= radius[:, None])
    taps = taps / taps.sum(-1, keepdim=True)
    taps = torch.where(blurred, taps, centre_tap)  # identity for views without blur: exact
    shifts = _constant(f"shifts{size}x{max_radius}", device,
                       lambda: _reflect_shifts(size, max_radius).reshape(2 * max_radius + 1, size * size))
    matrices = torch.mm(taps, shifts).view(-1, 1, size, size)  # (N, 1, S, S): one GEMM for every view's matrix
    return torch.matmul(torch.matmul(matrices, views), matrices.transpose(-1, -2))
