"""DINO's multi-crop augmentation: per-sample random view parameters, and the batched pixel work on the host.

Follows Caron et al. 2021 (DINO's `DataAugmentationDINO`): two global and N local views per image, each a random
resized crop with flip, colour jitter, grayscale, blur and (global 2) solarization. The random draws are a pure
function of the sample's seed (`view_params.sample_seed`); the pixel work runs batched, here on CPU and in
`multicrop_device` on an accelerator.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from exaonepath_core.pretrain import multicrop_device
from exaonepath_core.pretrain.view_params import (
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    N_VIEW_PARAMS,
    P_BRIGHTNESS,
    P_FLIP,
    P_GRAY,
    P_HUE,
    P_ORDER,
    P_SIGMA,
    P_SOLARIZE,
    P_TOP,
    P_WIDTH,
    RGB_TO_YIQ,
    cubic_aa,
    reflect_shifts,
)

_N_CROP_TRIES = 10
_N_UNIFORMS = 2 * _N_CROP_TRIES + 2 + 1 + 1 + 4 + 4 + 1 + 2 + 1  # crop tries, position, flip, jitter, ..., solarize

_NO_JITTER = np.array([1.0, 1.0, 1.0, 0.0])  # brightness, contrast, saturation, hue factors of "no jitter"
_OP_ORDER = np.arange(4.0)
_LOG_ASPECT = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's aspect-ratio range, log scale


def _resize_block(length: int, out_size: int) -> torch.Tensor:
    """(out_size, length) float32 weights resizing `length` pixels to `out_size` (antialiased bicubic).

    The weights of PIL's ImagingResample / torch's `antialias=True`: the kernel is widened by the scale factor
    when downsampling and each row is normalised over the crop.
    """
    scale = length / out_size
    centre = (torch.arange(out_size, dtype=torch.float64)[:, None] + 0.5) * scale
    pixel = torch.arange(length, dtype=torch.float64)[None, :]
    weights = cubic_aa((pixel + 0.5 - centre) / max(scale, 1.0))
    return (weights / weights.sum(-1, keepdim=True)).to(torch.float32)



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
    return torch.einsum("nd,dij->nij", taps, reflect_shifts(size, max_radius))




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
        gray = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
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
    to_yiq = torch.from_numpy(RGB_TO_YIQ)
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

