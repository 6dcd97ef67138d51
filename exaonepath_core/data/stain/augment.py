"""Stain augmentation: random H and E perturbation of uint8 patches in each patch's own Macenko stain basis."""
from __future__ import annotations

import torch

from exaonepath_core.data.stain.batched import check_patches, optical_density_lut
from exaonepath_core.data.stain.macenko import estimate, resolve_backend
from exaonepath_core.data.stain.reference import ALPHA, BETA, IO, MIN_TISSUE_PIXELS, MacenkoReference


def stain_augment_batch(
    patches: torch.Tensor,
    generator: torch.Generator,
    sigma_scale: float = 0.2,
    sigma_shift: float = 0.05,
    sigma_stain: float = 0.0,
    reference: MacenkoReference | None = None,
    Io: float = IO,
    alpha: float = ALPHA,
    beta: float = BETA,
    min_tissue_pixels: int = MIN_TISSUE_PIXELS,
    backend: str = "auto",
) -> torch.Tensor:
    """Random per-patch H and E perturbation (Tellez-style, in each patch's own Macenko stain basis), batched.

    Concentrations C become C * a + s with a ~ U(1 - sigma_scale, 1 + sigma_scale) and s ~ U(-sigma_shift,
    sigma_shift) per stain and patch; with sigma_stain > 0 the stain vectors also get Gaussian noise and are
    renormalized. The OD the two stains do not explain is kept, so a = 1, s = 0 returns the input. Patches
    without a usable stain estimate use the reference (default H&E) stain vectors. Random numbers are drawn on
    the generator's device in a fixed order, so a seeded generator gives the same output on every run.
    `backend` picks who estimates the stains, as in `macenko_normalize_batch`; the perturbation is torch.
    """
    check_patches(patches)
    reference = MacenkoReference.default() if reference is None else reference
    b, h, w, _ = patches.shape
    device = patches.device
    if b == 0:
        return patches.clone()
    draw_device = generator.device
    scale = 1 + sigma_scale * (2 * torch.rand(b, 2, 1, generator=generator, device=draw_device) - 1)
    shift = sigma_shift * (2 * torch.rand(b, 2, 1, generator=generator, device=draw_device) - 1)
    stain_noise = sigma_stain * torch.randn(b, 3, 2, generator=generator, device=draw_device)
    scale, shift, stain_noise = scale.to(device), shift.to(device), stain_noise.to(device)
    with torch.no_grad():
        estimated, od = estimate(patches, resolve_backend(backend, device), Io, alpha, beta, min_tissue_pixels)
        if od is None:  # the numba path computes no OD planes
            od = optical_density_lut(Io)[patches.reshape(b, h * w, 3).transpose(1, 2).long()]  # (b, 3, P)
        fallback_stains = torch.as_tensor(reference.stain_matrix, dtype=torch.float32, device=device)
        stains = torch.where(estimated.usable.view(b, 1, 1), estimated.stains, fallback_stains)
        pseudo_inverse = torch.linalg.pinv(stains.to(torch.float64)).to(torch.float32)
        concentrations = torch.bmm(pseudo_inverse, od)  # (b, 2, P)
        new_stains = stains + stain_noise
        new_stains = new_stains / new_stains.norm(dim=1, keepdim=True).clamp(min=1e-6)
        # od' = od - S C + S' (a C + s): only the stain-explained part of the OD changes
        new_od = od - torch.bmm(stains, concentrations) + torch.bmm(new_stains, concentrations * scale + shift)
        # invert od = -log((v + 1) / Io): v = Io exp(-od) - 1, rounded to the nearest level
        values = (Io * torch.exp(-new_od) - 1).round_().clamp_(0, 255)
        out = torch.empty_like(patches)
        out.view(b, h * w, 3).copy_(values.transpose(1, 2))
    return out
