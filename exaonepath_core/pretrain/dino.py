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
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from exaonepath_core.config import CENTERINGS, CLIP_MODES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# Multi-crop augmentation
# ----------------------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentations, a pure function of (run seed, epoch, dataset index)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# Layout of one view's row of random parameters (float64), drawn by `MultiCropAugmentation.sample_params` and
# read by `MultiCropAugmentation.apply`. Colour-jitter factors are the identity (1, 1, 1, 0) when jitter is off.
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH, P_FLIP = 0, 1, 2, 3, 4
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 5, 6, 7, 8
P_ORDER = slice(9, 13)  # colour-jitter op order: 0 brightness, 1 contrast, 2 saturation, 3 hue
P_GRAY, P_SIGMA, P_SOLARIZE = 13, 14, 15  # sigma 0: no blur
N_VIEW_PARAMS = 16
_N_CROP_TRIES = 10
_N_UNIFORMS = 2 * _N_CROP_TRIES + 2 + 1 + 1 + 4 + 4 + 1 + 2 + 1  # crop tries, position, flip, jitter, ..., solarize

_NO_JITTER = np.array([1.0, 1.0, 1.0, 0.0])  # brightness, contrast, saturation, hue factors of "no jitter"
_OP_ORDER = np.arange(4.0)
_LOG_ASPECT = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's aspect-ratio range, log scale
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# NTSC RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane at fixed luma Y.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def _cubic_aa(distance: torch.Tensor) -> torch.Tensor:
    """The bicubic kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    a = -0.5
    x = distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _resize_block(length: int, out_size: int) -> torch.Tensor:
    """(out_size, length) float32 weights resizing `length` pixels to `out_size` (antialiased bicubic).

    The weights of PIL's ImagingResample / torch's `antialias=True`: the kernel is widened by the scale factor
    when downsampling and each row is normalised over the crop.
    """
    scale = length / out_size
    centre = (torch.arange(out_size, dtype=torch.float64)[:, None] + 0.5) * scale
    pixel = torch.arange(length, dtype=torch.float64)[None, :]
    weights = _cubic_aa((pixel + 0.5 - centre) / max(scale, 1.0))
    return (weights / weights.sum(-1, keepdim=True)).to(torch.float32)


def _reflect_shifts(size: int, radius: int) -> torch.Tensor:
    """(2 * radius + 1, size, size) 0/1 matrices: row i of shift d picks pixel i + d, reflected at the borders."""
    index = torch.arange(size)[None, :] + torch.arange(-radius, radius + 1)[:, None]
    index = torch.where(index < 0, -index, index)
    index = torch.where(index >= size, 2 * (size - 1) - index, index)
    return nnf.one_hot(index, size).to(torch.float64)


def _blur_matrices(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) float64 Gaussian blur along one axis with reflect padding, as `tvf.gaussian_blur`.

    Kernel size per view: 2 * ceil(3 sigma) + 1 taps, at most the largest odd size <= `size`.
    """
    max_kernel = size if size % 2 == 1 else size - 1
    radius = torch.clamp(torch.ceil(3 * sigma), max=(max_kernel - 1) // 2)  # (N,)
    max_radius = int(radius.max())
    offsets = torch.arange(-max_radius, max_radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2) * (offsets.abs()[None, :] <= radius[:, None])
    taps = taps / taps.sum(-1, keepdim=True)
    return torch.einsum("nd,dij->nij", taps, _reflect_shifts(size, max_radius))


class MultiCropAugmentation:
    """DINO's multi-crop: two global views and `n_local` local views of uint8 HWC images.

    Views are `[global1, global2, local1..localN]`, float CHW normalised with ImageNet mean/std.
    Global 1: random resized crop (bicubic, antialiased), flip, colour jitter (p=0.8, random op order),
    grayscale (p=0.2), Gaussian blur (p=1.0). Global 2: the same with blur p=0.1 and solarization p=0.2.
    Locals: blur p=0.5.

    Two halves, so the pixel work can run batched (in the loader's collate or on the training device):
    `sample_params(h, w, generator)` draws every random number of one sample's views from its own generator
    (so a sample's views are a pure function of its seed: exact resume needs that), and
    `apply(images, params)` does the pixel work for a whole batch with per-sample crop, resize, flip and blur
    folded into small matrices (batched matmuls) and the colour ops as per-sample 3x3 colour maps. Every op is
    per sample, so a sample's views do not depend on the rest of its batch (bitwise on CPU).
    Hue jitter is a rotation of the YIQ chroma plane by `2 pi * hue_factor` (the standard linear approximation
    of torchvision's HSV hue shift: same luma, same direction, clamped to [0, 1]).
    `aug(image, generator)` does both for one image.
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
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {blur_sigma}")
        if min(global_size, local_size) < 2:
            raise ValueError(f"crop sizes must be >= 2, got {global_size} and {local_size}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.color_jitter = tuple(color_jitter)
        self.blur_sigma = tuple(blur_sigma)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._resize_blocks: dict[tuple[int, int], torch.Tensor] = {}  # (crop length, output size) -> weights
        self._constants_key: tuple | None = None
        self._constants: dict[str, np.ndarray] = {}

    @property
    def n_crops(self) -> int:
        """Number of views returned per image (2 global + n_local)."""
        return 2 + self.n_local

    def __call__(self, image: np.ndarray | torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Views `[g1, g2, l1..lN]` (each (3, S, S)) of one uint8 (H, W, 3) image; randomness from `generator`."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        _check_images(tensor[None] if tensor.ndim == 3 else tensor)
        if tensor.ndim != 3:
            raise ValueError(f"expected one uint8 (H, W, 3) image, got shape {tuple(tensor.shape)}")
        params = self.sample_params(tensor.shape[0], tensor.shape[1], generator)
        return [view[0] for view in self.apply(tensor[None], params[None])]

    # -- random parameters (per sample, on CPU) ------------------------------------------------------------------
    def sample_params(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(n_crops, N_VIEW_PARAMS) float64: every random choice of one sample's views, from `generator` only."""
        # one draw for the whole sample, then each rule once over the (view, uniform) array: a loader worker runs
        # this per sample, and a Python loop per view cost ~0.03 ms a view (0.4 ms at 2 + 10 crops)
        u = torch.rand((self.n_crops, _N_UNIFORMS), generator=generator, dtype=torch.float64).numpy()
        const = self._param_constants()
        params = np.empty((self.n_crops, N_VIEW_PARAMS))
        params[:, P_TOP:P_WIDTH + 1] = self._crop_boxes(height, width, u[:, :2 * _N_CROP_TRIES + 2], const)
        u = u[:, 2 * _N_CROP_TRIES + 2:]
        params[:, P_FLIP] = u[:, 0] < 0.5
        jitter = (u[:, 1] < 0.8)[:, None]  # colour jitter (factors as torchvision's ColorJitter), identity if not
        params[:, P_BRIGHTNESS:P_HUE + 1] = np.where(jitter, const["jitter_low"] + const["jitter_range"] * u[:, 2:6],
                                                     _NO_JITTER)
        params[:, P_ORDER] = np.where(jitter, np.argsort(u[:, 6:10], axis=1, kind="stable"), _OP_ORDER)
        params[:, P_GRAY] = u[:, 10] < 0.2
        sigma_low, sigma_high = self.blur_sigma
        params[:, P_SIGMA] = np.where(u[:, 11] < const["blur_p"], sigma_low + (sigma_high - sigma_low) * u[:, 12], 0.0)
        params[:, P_SOLARIZE] = 0.0
        params[1, P_SOLARIZE] = u[1, 13] < 0.2  # global 2 only
        return torch.from_numpy(params)

    def _param_constants(self) -> dict[str, np.ndarray]:
        """Per-view constant arrays of `sample_params`, built once per setting (cached: they are per-sample cost)."""
        key = (self.n_crops, self.global_scale, self.local_scale, self.color_jitter)
        if self._constants_key != key:
            brightness, contrast, saturation, hue = self.color_jitter
            jitter_low = np.array([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
            # crop tries interleave (area fraction, log aspect) uniforms: one affine map for both, per view
            low = np.empty((self.n_crops, 2 * _N_CROP_TRIES))
            span = np.empty_like(low)
            low[:, 0::2], span[:, 0::2] = self.local_scale[0], self.local_scale[1] - self.local_scale[0]
            low[:2, 0::2], span[:2, 0::2] = self.global_scale[0], self.global_scale[1] - self.global_scale[0]
            low[:, 1::2], span[:, 1::2] = _LOG_ASPECT[0], _LOG_ASPECT[1] - _LOG_ASPECT[0]
            blur_p = np.full(self.n_crops, 0.5)  # blur p: 1.0 global 1, 0.1 global 2, 0.5 locals
            blur_p[:2] = (1.0, 0.1)
            self._constants = {
                "try_low": low, "try_span": span, "rows": np.arange(self.n_crops), "blur_p": blur_p,
                "jitter_low": jitter_low,
                "jitter_range": np.array([1 + brightness, 1 + contrast, 1 + saturation, hue]) - jitter_low,
            }
            self._constants_key = key
        return self._constants

    @staticmethod
    def _crop_boxes(height: int, width: int, u: np.ndarray, const: dict[str, np.ndarray]) -> np.ndarray:
        """(n_crops, 4) RandomResizedCrop boxes (top, left, h, w) from (n_crops, 22) uniforms, globals first.

        Area fraction uniform in the view's scale range, log-uniform aspect 3/4..4/3, the first of 10 tries that
        fits; the position uniform over the valid offsets; no try fits: the central square (torchvision's fallback
        for in-range ratios).
        """
        tries = const["try_low"] + const["try_span"] * u[:, :2 * _N_CROP_TRIES]
        target_area = (height * width) * tries[:, 0::2]
        aspect = np.exp(tries[:, 1::2])
        sizes = np.empty(target_area.shape + (2,))  # (n_crops, tries, (h, w)); in place: few calls per sample
        np.divide(target_area, aspect, out=sizes[..., 0])
        np.multiply(target_area, aspect, out=sizes[..., 1])
        np.rint(np.sqrt(sizes, out=sizes), out=sizes)  # = np.round: half to even
        limit = np.array([height, width])
        in_range = (sizes > 0) & (sizes <= limit)
        fits = in_range[..., 0] & in_range[..., 1]  # (n_crops, tries)
        first = np.argmax(fits, axis=1)
        crop = sizes[const["rows"], first]  # (n_crops, 2): h, w of the first try that fits
        room = limit - crop
        position = np.minimum(np.floor(u[:, 2 * _N_CROP_TRIES:] * (room + 1)), room)
        boxes = np.concatenate([position, crop], axis=1)
        none_fit = ~fits[const["rows"], first]
        if none_fit.any():
            side = min(height, width)
            boxes[none_fit] = ((height - side) // 2, (width - side) // 2, side, side)
        return boxes

    # -- pixel work (batched, on the images' device) -------------------------------------------------------------
    def apply(self, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        """Views `[g1, g2, l1..lN]`, each (B, 3, S, S) float32, of uint8 (B, H, W, 3) images (any device).

        `params`: (B, n_crops, N_VIEW_PARAMS) rows of `sample_params` (stacked per sample).
        """
        _check_images(images)
        batch = images.shape[0]
        if tuple(params.shape) != (batch, self.n_crops, N_VIEW_PARAMS):
            raise ValueError(f"params must have shape {(batch, self.n_crops, N_VIEW_PARAMS)}, "
                             f"got {tuple(params.shape)}")
        if images.device.type != "cpu":
            return self.apply_on_device(images, params)
        params = params.detach().to("cpu", torch.float64)
        # many small ops: a multi-threaded intra-op pool only adds contention (measured 10-30x slower at 2 threads
        # on a loaded 2-core machine); DataLoader workers already run at 1 thread
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._apply(images, params)
        finally:
            torch.set_num_threads(threads)

    def apply_on_device(self, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        """`apply` with every weight built on the images' device from `params` (`multicrop_device`): no host
        matrices, no host reads. The path for accelerators; callable on CPU too (tests, host-time benchmark)."""
        from exaonepath_core.pretrain import multicrop_device

        _check_images(images)
        if tuple(params.shape) != (images.shape[0], self.n_crops, N_VIEW_PARAMS):
            raise ValueError(f"params must have shape {(images.shape[0], self.n_crops, N_VIEW_PARAMS)}, "
                             f"got {tuple(params.shape)}")
        return multicrop_device.apply_views(self, images, params)

    def _apply(self, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        batch, height, width, _ = images.shape
        pixels = images.to(torch.float32).div_(255.0).reshape(batch, height, width * 3)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        views: list[torch.Tensor] = []
        for size, crops in ((self.global_size, range(2)), (self.local_size, range(2, self.n_crops))):
            if len(crops) == 0:
                continue
            # view-major rows: group[c * B + b] is crop c of sample b
            rows = params[:, crops[0]:crops[-1] + 1].transpose(0, 1).reshape(-1, N_VIEW_PARAMS)
            group = torch.cat([self._resized_crop(pixels, params[:, c], height, width, size) for c in crops])
            group = self._colour(group, rows)
            group = self._blur(group, rows, size)
            solarize = (rows[:, P_SOLARIZE] > 0).to(group.device).view(-1, 1, 1, 1)
            if bool(solarize.any()):
                group = torch.where(solarize & (group >= 0.5), 1.0 - group, group)
            group = group.sub_(mean).div_(std)
            views.extend(group.split(batch))
        return views

    def _resized_crop(self, pixels: torch.Tensor, rows: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
        """Crop, resize and flip (B, H, W*3) float pixels to (B, 3, size, size): two batched matmuls."""
        batch = pixels.shape[0]

        def blocks(length: int, out_size: int) -> torch.Tensor:
            key = (length, out_size)
            if key not in self._resize_blocks:
                self._resize_blocks[key] = _resize_block(length, out_size)
            return self._resize_blocks[key]

        vertical = torch.zeros(batch, size, height)
        horizontal = torch.zeros(batch, size, width)
        for b, (top, left, crop_h, crop_w, flip) in enumerate(rows[:, P_TOP:P_FLIP + 1].tolist()):
            top, left, crop_h, crop_w = int(top), int(left), int(crop_h), int(crop_w)
            vertical[b, :, top:top + crop_h] = blocks(crop_h, size)
            block = blocks(crop_w, size)
            horizontal[b, :, left:left + crop_w] = block.flip(0) if flip else block
        vertical = vertical.to(pixels.device)
        horizontal = horizontal.to(pixels.device)
        out = torch.bmm(vertical, pixels)  # (B, size, W*3)
        out = out.view(batch, size, width, 3).transpose(1, 2).reshape(batch, width, size * 3)
        out = torch.bmm(horizontal, out)  # (B, size_x, size_y*3): transposed, undone by the permute
        return out.view(batch, size, size, 3).permute(0, 3, 2, 1).contiguous().clamp_(0.0, 1.0)  # bicubic overshoots

    def _colour(self, views: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Colour jitter (four stages, per-sample op order) then grayscale, as per-sample 3x3 colour maps."""
        n = views.shape[0]
        gray = torch.tensor(_GRAY_WEIGHTS, dtype=torch.float64)
        identity = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
        order = rows[:, P_ORDER].long()
        factor = {op: rows[:, P_BRIGHTNESS + op] for op in range(4)}
        to_gray = torch.ones(3, 1, dtype=torch.float64) * gray[None, :]
        saturation = (factor[2].view(-1, 1, 1) * identity + (1 - factor[2]).view(-1, 1, 1) * to_gray)
        hue = _hue_matrices(factor[3])
        for stage in range(4):
            op = order[:, stage]
            matrix = identity.clone()
            scaled = (op == 0) | (op == 1)
            matrix[scaled] = factor[0].view(-1, 1, 1)[scaled] * identity[scaled]
            matrix[op == 1] = factor[1].view(-1, 1, 1)[op == 1] * identity[op == 1]
            matrix[op == 2] = saturation[op == 2]
            matrix[op == 3] = hue[op == 3]
            contrast = (op == 1) & (factor[1] != 1.0)
            offset = None
            if bool(contrast.any()):  # blend with the mean gray level of the image as it is at this stage
                gray_mean = torch.einsum("c,nchw->n", gray.to(views), views) / (views.shape[-1] * views.shape[-2])
                offset = ((1 - factor[1]).to(views) * gray_mean * contrast.to(views)).view(-1, 1, 1, 1)
            views = _colour_map(views, matrix, offset, clamp=True)
        gray_rows = rows[:, P_GRAY] > 0
        matrix = identity.clone()
        matrix[gray_rows] = to_gray
        return _colour_map(views, matrix, None, clamp=False)

    @staticmethod
    def _blur(views: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
        """Separable Gaussian blur of the views with sigma > 0 (reflect padding), one matrix per axis."""
        blurred = torch.nonzero(rows[:, P_SIGMA] > 0).flatten()
        if len(blurred) == 0:
            return views
        matrices = _blur_matrices(rows[blurred, P_SIGMA], size).to(views.device, torch.float32)[:, None]
        index = blurred.to(views.device)
        subset = torch.matmul(torch.matmul(matrices, views.index_select(0, index)), matrices.transpose(-1, -2))
        return views.index_copy(0, index, subset)


def _hue_matrices(hue_factor: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) float64 RGB maps rotating the YIQ chroma by 2 pi * factor; exactly the identity at 0."""
    to_yiq = torch.from_numpy(_RGB_TO_YIQ)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = -2 * math.pi * hue_factor  # sign: the direction of torchvision's HSV hue shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(hue_factor), 3, 3, dtype=torch.float64)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrices = from_yiq @ rotation @ to_yiq
    return torch.where((hue_factor == 0).view(-1, 1, 1), torch.eye(3, dtype=torch.float64), matrices)


def _colour_map(views: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor | None, clamp: bool) -> torch.Tensor:
    """`matrix[n] @ pixel + offset[n]` for every pixel of view n (skipped when all identity: exact either way)."""
    if offset is None and bool((matrix == torch.eye(3, dtype=matrix.dtype)).all()):
        return views
    n, _, h, w = views.shape
    out = torch.bmm(matrix.to(views), views.reshape(n, 3, h * w)).view(n, 3, h, w)
    if offset is not None:
        out = out.add_(offset)
    return out.clamp_(0.0, 1.0) if clamp else out


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) images, got dtype={images.dtype} shape={tuple(images.shape)}")


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
        fp32_last_layer: bool = True,
    ) -> None:
        super().__init__()
        # under autocast the K-way logits are cosines / T: bf16 would round them to 2^-8 (~0.05 nats at T=0.04)
        self.fp32_last_layer = fp32_last_layer
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
        if self.fp32_last_layer and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.last_layer(x.float())
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
