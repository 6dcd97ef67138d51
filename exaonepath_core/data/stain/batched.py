"""Batched Macenko in torch (CPU and CUDA): the per-patch stain estimate and the normalisation of chunks.

Speed notes (CPU, measured on 224 px CMU tiles, see benchmarks/macenko.py):
- Pixels are kept as channel planes (b, 3, P) so every per-pixel op runs over contiguous rows; the uint8
  input is transposed while widening to int32 (a uint8 -> uint8 transposed copy is ~10x slower in torch),
  and the output is written with one strided float -> uint8 copy per channel for the same reason.
- Every large temporary lives in one per-call workspace reused by all chunks: fresh multi-MB allocations
  (page faults on first touch) cost more than the arithmetic.
- Percentiles are exact nearest-rank order statistics (`percentiles.histogram_select`).
- Patches without enough tissue are detected on the integer planes and skipped before any float work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from exaonepath_core.data.stain.percentiles import (
    ANGLE_BINS,
    CONCENTRATION_BINS,
    histogram_select,
    nearest_rank,
)
from exaonepath_core.data.stain.reference import IO, MacenkoReference


def optical_density_lut(Io: float = IO, device: torch.device | str = "cpu") -> torch.Tensor:
    """OD of every uint8 level, -log((v + 1) / Io), float32, with the same float ops torchstain uses per pixel."""
    levels = torch.arange(256, dtype=torch.float32, device=device)
    return -torch.log((levels + 1) / Io)



class Workspace:
    """Scratch buffers for chunks of up to `rows` patches of `n_pixels`, reused across chunks."""

    def __init__(self, rows: int, n_pixels: int, device: torch.device) -> None:
        self.index = torch.empty(rows, 3, n_pixels, dtype=torch.int32, device=device)  # also the int output
        self.od = torch.empty(rows, 3, n_pixels, dtype=torch.float32, device=device)
        self.masked_od = torch.empty(rows, 3, n_pixels, dtype=torch.float32, device=device)  # also the image
        self.brightest = torch.empty(rows, n_pixels, dtype=torch.int32, device=device)
        self.tissue = torch.empty(rows, n_pixels, dtype=torch.float32, device=device)
        self.projected = torch.empty(rows, 2, n_pixels, dtype=torch.float32, device=device)  # also concentrations
        self.angle = torch.empty(rows, n_pixels, dtype=torch.float32, device=device)
        self.position = torch.empty(2 * rows * n_pixels, dtype=torch.float32, device=device)
        self.bins = torch.empty(2 * rows * n_pixels, dtype=torch.int32, device=device)


    def selection_scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers `histogram_select` borrows."""
        return self.position, self.bins


def check_patches(patches: torch.Tensor) -> None:
    """Raise unless `patches` is a uint8 (B, H, W, 3) torch tensor."""
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
    if patches.dtype != torch.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be uint8 (B, H, W, 3), got {patches.dtype} {tuple(patches.shape)}")


@dataclass
class StainEstimate:
    """Per-patch Macenko estimate of a chunk: stain vectors (b, 3, 2), pseudo-inverse (b, 2, 3), max (b, 2)."""

    stains: torch.Tensor
    pseudo_inverse: torch.Tensor
    max_concentrations: torch.Tensor
    usable: torch.Tensor
    n_tissue: torch.Tensor


def tissue_level_of(lut: torch.Tensor, beta: float) -> int:
    """The brightest uint8 level whose OD still reaches beta (-1 if none): OD >= beta <=> level <= this."""
    levels = torch.nonzero(lut >= beta)
    return int(levels.max()) if levels.numel() else -1


def load_planes(patches: torch.Tensor, ws: Workspace, tissue_level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (b, H, W, 3) -> int32 channel planes (b, 3, P) and the count of tissue pixels per patch."""
    b = patches.shape[0]
    index = ws.index[:b]
    index.copy_(patches.view(b, -1, 3).transpose(1, 2))
    brightest = torch.maximum(index[:, 0], index[:, 1], out=ws.brightest[:b])
    torch.maximum(brightest, index[:, 2], out=brightest)
    # OD >= beta on all channels <=> every channel level <= tissue_level
    n_tissue = torch.le(brightest, tissue_level, out=ws.tissue[:b]).sum(1).to(torch.int64)
    return index, n_tissue


def keep_rows(ws: Workspace, keep: torch.Tensor) -> None:
    """Move the kept rows of the loaded planes to the front of the workspace (in place, order kept)."""
    for destination, source in enumerate(keep.tolist()):
        if destination != source:
            ws.index[destination].copy_(ws.index[source])
            ws.brightest[destination].copy_(ws.brightest[source])


def estimate_stains(ws: Workspace, b: int, lut: torch.Tensor, tissue_level: int, n_tissue: torch.Tensor,
                     alpha: float, min_tissue_pixels: int) -> StainEstimate:
    """Macenko stain vectors and 99th-percentile concentrations of the first b loaded patches of `ws`."""
    device = lut.device
    n_pixels = ws.od.shape[2]
    od = ws.od[:b]
    torch.index_select(lut, 0, ws.index[:b].view(-1), out=od.view(-1))
    brightest = ws.brightest[:b]
    tissue = torch.le(brightest, tissue_level, out=ws.tissue[:b])
    masked_od = torch.mul(od, tissue.unsqueeze(1), out=ws.masked_od[:b])

    # stain plane: the two leading eigenvectors of the tissue-pixel OD covariance (torchstain: unbiased cov)
    sums = masked_od.sum(2).to(torch.float64)
    products = torch.bmm(masked_od, masked_od.transpose(1, 2)).to(torch.float64)
    count = n_tissue.to(torch.float64).clamp(min=1).view(b, 1, 1)
    covariance = (products - sums.unsqueeze(2) * sums.unsqueeze(1) / count) / (count - 1).clamp(min=1)
    usable = (n_tissue >= max(int(min_tissue_pixels), 2)) & torch.isfinite(covariance).flatten(1).all(1)
    # a harmless stand-in for degenerate matrices, so one bad patch cannot fail the batched eigh;
    # eigh runs on the CPU (3x3 matrices, negligible) so CPU and CUDA share LAPACK's eigenvector conventions
    stand_in = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=device))
    safe = torch.where(usable.view(b, 1, 1), covariance, stand_in).to(torch.float32).cpu()
    eigenvalues, eigenvectors = torch.linalg.eigh(safe)
    eigenvalues, eigenvectors = eigenvalues.to(device), eigenvectors.to(device)
    # float32 sums leave ~1e-6 relative noise on a rank-1 covariance; real H&E tissue has ratios >= 1e-3
    usable &= eigenvalues[:, 1] > 1e-4 * eigenvalues[:, 2].abs().clamp(min=1e-30)
    plane = eigenvectors[:, :, 1:3].clone()  # like torchstain's eigvecs[:, [1, 2]]
    # The sign of the leading eigenvector decides where the angle wraps at +-pi, so it changes the result;
    # LAPACK returns it with negative components for OD covariances and torchstain inherits that: pin it.
    plane[:, :, 1] *= torch.where(plane[:, :, 1].sum(1, keepdim=True) > 0, -1.0, 1.0)

    # robust extremes of the angle in that plane give the two stain vectors
    projected = torch.bmm(plane.transpose(1, 2), masked_od, out=ws.projected[:b])  # (b, 2, P)
    angle = torch.atan2(projected[:, 1], projected[:, 0], out=ws.angle[:b])
    ranks = torch.stack([nearest_rank(alpha, n_tissue), nearest_rank(100 - alpha, n_tissue)], 1)
    half_turn = torch.full((b,), torch.pi, dtype=torch.float64, device=device)
    extremes = histogram_select(angle, ranks, -half_turn, half_turn, ANGLE_BINS, tissue, ws.selection_scratch())
    min_angle, max_angle = extremes[:, 0], extremes[:, 1]
    v_min = torch.bmm(plane, torch.stack([torch.cos(min_angle), torch.sin(min_angle)], 1).unsqueeze(2))
    v_max = torch.bmm(plane, torch.stack([torch.cos(max_angle), torch.sin(max_angle)], 1).unsqueeze(2))
    # hematoxylin first: the vector with the larger red OD component
    min_first = (v_min[:, 0, 0] > v_max[:, 0, 0]).view(b, 1, 1)
    stains = torch.where(min_first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))
    usable &= torch.isfinite(stains).flatten(1).all(1)
    stains = torch.where(usable.view(b, 1, 1), stains, torch.eye(3, 2, device=device))

    # least-squares concentrations of every pixel, then their 99th percentiles over all pixels
    stains64 = stains.to(torch.float64)
    gram = stains64.transpose(1, 2) @ stains64
    determinant = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    usable &= determinant > 1e-10
    safe_determinant = torch.where(usable, determinant, 1.0).view(b, 1, 1)
    # closed-form 2x2 inverse (a batched LAPACK solve on 2x2 matrices costs more than the rest of the step)
    adjugate = torch.stack([gram[:, 1, 1], -gram[:, 0, 1], -gram[:, 1, 0], gram[:, 0, 0]], 1).view(b, 2, 2)
    pseudo_inverse64 = (adjugate / safe_determinant) @ stains64.transpose(1, 2)  # (b, 2, 3)
    pseudo_inverse = pseudo_inverse64.to(torch.float32)
    concentrations = torch.bmm(pseudo_inverse, od, out=ws.projected[:b]).view(2 * b, n_pixels)
    # every concentration lies between the extremes of its row's linear map over the OD range of the table
    od_low, od_high = lut.min().to(torch.float64), lut.max().to(torch.float64)
    coefficients = pseudo_inverse64.reshape(2 * b, 3)
    low = torch.minimum(coefficients * od_low, coefficients * od_high).sum(1)
    high = torch.maximum(coefficients * od_low, coefficients * od_high).sum(1)
    rank = nearest_rank(99, torch.full((2 * b, 1), n_pixels, device=device))
    max_concentrations = histogram_select(concentrations, rank, low, high, CONCENTRATION_BINS,
                                          None, ws.selection_scratch()).view(b, 2)
    usable &= torch.isfinite(max_concentrations).all(1) & (max_concentrations > 0).all(1)
    return StainEstimate(stains, pseudo_inverse, max_concentrations, usable, n_tissue)


def macenko_chunk(
    patches: torch.Tensor,
    out: torch.Tensor,
    ws: Workspace,
    lut: torch.Tensor,
    tissue_level: int,
    target_matrix: torch.Tensor,
    target_max: torch.Tensor,
    Io: float,
    alpha: float,
    min_tissue_pixels: int,
) -> torch.Tensor:
    """Normalize one chunk (b, H, W, 3) uint8 into `out` (same shape); returns the fallback flags."""
    b = patches.shape[0]
    fallback = torch.ones(b, dtype=torch.bool, device=patches.device)
    _, n_tissue = load_planes(patches, ws, tissue_level)
    enough = n_tissue >= max(int(min_tissue_pixels), 2)
    keep = torch.nonzero(enough).squeeze(1)
    kept = int(keep.numel())
    if kept < b:
        keep_rows(ws, keep)
    if kept:
        estimate = estimate_stains(ws, kept, lut, tissue_level, n_tissue[keep], alpha, min_tissue_pixels)
        # one 3x3 map per patch, OD -> target OD: target_matrix @ diag(target_max / max) @ pinv
        scale = target_max.unsqueeze(0) / estimate.max_concentrations
        od_map = torch.bmm(target_matrix.unsqueeze(0) * scale.unsqueeze(1), estimate.pseudo_inverse)
        usable = estimate.usable & torch.isfinite(od_map).flatten(1).all(1)
        od_map = torch.where(usable.view(kept, 1, 1), od_map, torch.zeros_like(od_map))
        # Io * exp(-map @ od) as exp(log Io - map @ od): one fused matmul-add, exp in place
        log_io = torch.full((kept, 3, 1), float(np.log(Io)), dtype=torch.float32, device=patches.device)
        image = torch.baddbmm(log_io, od_map, ws.od[:kept], alpha=-1.0, out=ws.masked_od[:kept])
        image.exp_().clamp_(max=255)
        # torchstain clips at 255 and truncates with .int(); values are positive so the uint8 cast matches.
        # One strided copy per channel straight into the output (a whole-tensor transposed copy is slower).
        fallback[keep] = ~usable
        if kept == b:
            pixels = out.view(b, -1, 3)
            for channel in range(3):
                pixels[:, :, channel].copy_(image[:, channel])
        else:
            for row, source in enumerate(keep.tolist()):
                pixels = out[source].view(-1, 3)
                for channel in range(3):
                    pixels[:, channel].copy_(image[row, channel])
    for row in torch.nonzero(fallback).squeeze(1).tolist():
        out[row].copy_(patches[row])
    return fallback



def normalize_chunks(patches: torch.Tensor, out: torch.Tensor, fallback: torch.Tensor, lut: torch.Tensor,
                     tissue_level: int, reference: MacenkoReference, Io: float, alpha: float,
                     min_tissue_pixels: int, chunk_size: int) -> None:
    """Normalize a contiguous (B, H, W, 3) uint8 batch into `out`, `chunk_size` patches at a time; flags into
    `fallback` (B,). One workspace serves every chunk."""
    device = patches.device
    target_matrix = torch.as_tensor(reference.stain_matrix, dtype=torch.float32, device=device)
    target_max = torch.as_tensor(reference.max_concentrations, dtype=torch.float32, device=device)
    ws = Workspace(min(chunk_size, patches.shape[0]), patches.shape[1] * patches.shape[2], device)
    with torch.no_grad():
        for start in range(0, patches.shape[0], chunk_size):
            stop = min(start + chunk_size, patches.shape[0])
            fallback[start:stop] = macenko_chunk(patches[start:stop], out[start:stop], ws, lut, tissue_level,
                                                 target_matrix, target_max, Io, alpha, min_tissue_pixels)


def estimate_all(patches: torch.Tensor, Io: float, alpha: float, beta: float,
                  min_tissue_pixels: int) -> tuple[StainEstimate, torch.Tensor]:
    """Stain estimate of every patch of a (b, H, W, 3) uint8 batch (no skipping); returns it and the OD planes."""
    b, h, w, _ = patches.shape
    lut = optical_density_lut(Io, patches.device)
    tissue_level = tissue_level_of(lut, beta)
    ws = Workspace(b, h * w, patches.device)
    _, n_tissue = load_planes(patches.contiguous(), ws, tissue_level)
    estimate = estimate_stains(ws, b, lut, tissue_level, n_tissue, alpha, min_tissue_pixels)
    return estimate, ws.od
