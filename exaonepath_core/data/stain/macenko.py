"""Macenko normalisation of uint8 H&E patches: the entry points over the fused numba and the batched torch paths.

`macenko_normalize_batch` normalizes a (B, H, W, 3) batch to a `MacenkoReference`, `fit_reference` fits one
to an image, `MacenkoNormalizer` wraps both in torchstain's fit/normalize style. The backend is the fused
numba kernel (`fused`, CPU tensors) or the batched torch path (`batched`, CPU and CUDA); both give the same
fallback rules and the same colours to within a grey level.
"""
from __future__ import annotations

import numpy as np
import torch

from exaonepath_core.data.stain import batched, fused
from exaonepath_core.data.stain.batched import (
    StainEstimate,
    check_patches,
    optical_density_lut,
    tissue_level_of,
)
from exaonepath_core.data.stain.reference import ALPHA, BETA, IO, MIN_TISSUE_PIXELS, MacenkoReference

BACKENDS = ("auto", "numba", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'numba' for CPU tensors, else 'torch'; checks the choice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "auto":
        return "numba" if device.type == "cpu" else "torch"
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"backend='numba' runs on CPU tensors only, got device {device}")
    return backend


def estimate(patches: torch.Tensor, backend: str, Io: float = IO, alpha: float = ALPHA, beta: float = BETA,
             min_tissue_pixels: int = MIN_TISSUE_PIXELS, threads: int | None = None,
             ) -> tuple[StainEstimate, torch.Tensor | None]:
    """Stain estimate of every patch of a uint8 (b, H, W, 3) batch with a resolved backend (no skipping).

    Returns it and the (b, 3, P) OD planes the torch path computed on the way (None from the numba path).
    """
    with torch.no_grad():
        if backend == "numba":
            return fused.estimate_fused(patches, Io, alpha, beta, min_tissue_pixels, threads=threads), None
        return batched.estimate_all(patches, Io, alpha, beta, min_tissue_pixels)


def _check_out(out: torch.Tensor, patches: torch.Tensor) -> None:
    """Raise unless `out` can receive the normalized `patches`."""
    check_patches(out)
    if out.shape != patches.shape or out.device != patches.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {tuple(patches.shape)} on {patches.device}, "
                         f"got {tuple(out.shape)} on {out.device} (contiguous: {out.is_contiguous()})")
    if out.data_ptr() == patches.data_ptr():
        raise ValueError("out must not be the input tensor (patches are read after outputs are written)")


def macenko_normalize_batch(
    patches: torch.Tensor,
    reference: MacenkoReference | None = None,
    Io: float = IO,
    alpha: float = ALPHA,
    beta: float = BETA,
    min_tissue_pixels: int = MIN_TISSUE_PIXELS,
    chunk_size: int | None = None,
    backend: str = "auto",
    threads: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko-normalize uint8 (B, H, W, 3) patches to `reference`; returns (uint8 same shape/device, fallback (B,)).

    Matches torchstain's torch backend (nearest-rank percentiles, eigh eigenvector order and sign,
    hematoxylin-first rule). Patches with fewer than `min_tissue_pixels` pixels of OD >= beta on all channels,
    a covariance of rank < 2, a 99th-percentile H or E concentration <= 0 (scaling would invert the colours)
    or any non-finite intermediate are returned unchanged and flagged, never raised.
    `backend`: "numba" (fused CPU kernel, the fastest on CPU), "torch" (batched torch, CPU or CUDA), or "auto"
    (numba for CPU tensors, else torch). Both give the same fallback rules.
    `chunk_size` patches are processed at a time by the torch backend (default 8 on CPU, measured fastest with
    4-16; 256 on CUDA). `threads`: worker threads of the numba backend (default torch.get_num_threads()).
    `out`: an optional contiguous uint8 tensor of the same shape and device to write into (and return), so
    that a loop over batches reuses one buffer instead of faulting in fresh pages for every batch.
    """
    check_patches(patches)
    if out is not None:
        _check_out(out, patches)
    backend = resolve_backend(backend, patches.device)
    if not 0 <= alpha < 50:
        raise ValueError(f"alpha must be in [0, 50), got {alpha}")
    reference = MacenkoReference.default() if reference is None else reference
    device = patches.device
    if chunk_size is None:
        chunk_size = 8 if device.type == "cpu" else 256
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = torch.empty_like(patches, memory_format=torch.contiguous_format) if out is None else out
    fallback = torch.ones(patches.shape[0], dtype=torch.bool, device=device)
    if patches.shape[0] == 0 or patches.shape[1] * patches.shape[2] == 0:
        out.copy_(patches)
        return out, fallback
    patches = patches.contiguous()
    lut = optical_density_lut(Io, device)
    tissue_level = tissue_level_of(lut, beta)
    if backend == "numba":
        fused.normalize_fused(patches, out, fallback, lut, tissue_level, reference, Io, alpha, min_tissue_pixels,
                              torch.get_num_threads() if threads is None else threads)
    else:
        batched.normalize_chunks(patches, out, fallback, lut, tissue_level, reference, Io, alpha, min_tissue_pixels,
                                 chunk_size)
    return out, fallback


def fit_reference(image: np.ndarray, Io: float = IO, alpha: float = ALPHA, beta: float = BETA,
                  min_tissue_pixels: int = MIN_TISSUE_PIXELS, backend: str = "auto") -> MacenkoReference:
    """Fit a MacenkoReference (stain vectors, 99th-percentile concentrations) to one uint8 HWC H&E image.

    `backend` as in `macenko_normalize_batch` ("auto": the numba kernel).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"reference image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    patches = torch.from_numpy(np.array(image[..., :3], order="C"))[None]  # a writable copy
    fitted, _ = estimate(patches, resolve_backend(backend, patches.device), Io, alpha, beta, min_tissue_pixels,
                         threads=1)
    if not bool(fitted.usable[0]):
        n_tissue = int(fitted.n_tissue[0])
        if n_tissue < min_tissue_pixels:
            reason = (f"only {n_tissue} tissue pixels (optical density >= {beta} on every channel), need "
                      f"{min_tissue_pixels}: the image is mostly background")
        else:
            reason = (f"its {n_tissue} tissue pixels give a degenerate stain estimate (a singular or non-finite "
                      f"optical-density covariance or stain matrix): the image has no two distinct stains, e.g. "
                      f"a single colour, black or saturated regions")
        raise ValueError(f"cannot fit a Macenko reference: {reason}. Choose a well-stained H&E tissue region.")
    return MacenkoReference(fitted.stains[0].double().numpy(), fitted.max_concentrations[0].double().numpy())


class MacenkoNormalizer:
    """torchstain-style fit/normalize over numpy or torch, single (H, W, 3) or batched (B, H, W, 3) uint8."""

    def __init__(self, reference: MacenkoReference | None = None, Io: float = IO, alpha: float = ALPHA,
                 beta: float = BETA, min_tissue_pixels: int = MIN_TISSUE_PIXELS,
                 device: str | torch.device | None = None, chunk_size: int | None = None,
                 backend: str = "auto") -> None:
        self.reference = MacenkoReference.default() if reference is None else reference
        self.backend = backend
        self.Io, self.alpha, self.beta = Io, alpha, beta
        self.min_tissue_pixels = min_tissue_pixels
        self.device = None if device is None else torch.device(device)
        self.chunk_size = chunk_size
        self.fallback_count = 0
        self.patch_count = 0
        self.last_fallback = torch.zeros(0, dtype=torch.bool)  # per patch of the last normalize call

    def fit(self, target: np.ndarray | torch.Tensor) -> MacenkoNormalizer:
        """Fit the reference to one uint8 HWC target image."""
        if isinstance(target, torch.Tensor):
            target = target.detach().cpu().numpy()
        self.reference = fit_reference(target, self.Io, self.alpha, self.beta, self.min_tissue_pixels,
                                       backend=self.backend)
        return self

    def normalize(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalize (H, W, 3) or (B, H, W, 3) uint8; returns the same type, shape and device as given."""
        is_numpy = not isinstance(images, torch.Tensor)
        if is_numpy:
            images = np.asarray(images)
            # torch refuses read-only arrays (e.g. from PIL); copy only then
            images = images if images.flags.writeable and images.flags.c_contiguous else np.array(images, order="C")
        tensor = torch.from_numpy(images) if is_numpy else images
        single = tensor.ndim == 3
        batch = tensor.unsqueeze(0) if single else tensor
        source_device = batch.device
        if self.device is not None:
            batch = batch.to(self.device)
        out, fallback = macenko_normalize_batch(batch, self.reference, self.Io, self.alpha, self.beta,
                                                self.min_tissue_pixels, self.chunk_size, backend=self.backend)
        self.patch_count += int(fallback.numel())
        self.fallback_count += int(fallback.sum().item())
        self.last_fallback = fallback.cpu()
        out = out.to(source_device)
        out = out[0] if single else out
        return out.numpy() if is_numpy else out
