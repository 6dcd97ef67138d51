"""Macenko stain normalization for whole batches in torch (CPU and CUDA), reference fitting, stain augmentation."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
DEFAULT_MAX_CONCENTRATIONS = (1.9705, 1.0308)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class MacenkoReference:
    """Target stain vectors (OD unit columns H, E) and 99th-percentile concentrations of a reference image."""

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray

    def __post_init__(self) -> None:
        self.stain_matrix = np.asarray(self.stain_matrix, dtype=np.float64)
        self.max_concentrations = np.asarray(self.max_concentrations, dtype=np.float64)
        if self.stain_matrix.shape != (3, 2):
            raise ValueError(f"stain_matrix must have shape (3, 2), got {self.stain_matrix.shape}")
        if self.max_concentrations.shape != (2,):
            raise ValueError(f"max_concentrations must have shape (2,), got {self.max_concentrations.shape}")
        if not (np.all(np.isfinite(self.stain_matrix)) and np.all(np.isfinite(self.max_concentrations))):
            raise ValueError("MacenkoReference holds non-finite values")
        if np.any(self.max_concentrations <= 0):
            raise ValueError(f"max_concentrations must be positive, got {self.max_concentrations.tolist()}")

    @classmethod
    def default(cls) -> MacenkoReference:
        """The standard H&E reference of Macenko et al. (the one torchstain and the paper's code use)."""
        return cls(np.array(DEFAULT_STAIN_MATRIX), np.array(DEFAULT_MAX_CONCENTRATIONS))

    def to_dict(self) -> dict:
        """Plain JSON-able form."""
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> MacenkoReference:
        """Inverse of `to_dict`; rejects missing or unknown keys."""
        expected = {"stain_matrix", "max_concentrations"}
        if set(data) != expected:
            raise ValueError(f"MacenkoReference keys must be {sorted(expected)}, got {sorted(data)}")
        return cls(np.array(data["stain_matrix"]), np.array(data["max_concentrations"]))

    def to_json(self, path: str | os.PathLike) -> None:
        """Save atomically as a small JSON file."""
        _atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MacenkoReference:
        """Load a reference written by `to_json`."""
        with open(path) as handle:
            return cls.from_dict(json.load(handle))

    def allclose(self, other: MacenkoReference, atol: float = 1e-6) -> bool:
        """True when both matrices agree to `atol`."""
        return bool(
            np.allclose(self.stain_matrix, other.stain_matrix, atol=atol)
            and np.allclose(self.max_concentrations, other.max_concentrations, atol=atol)
        )


# ---------------------------------------------------------------------------------------------------------------
# Batched Macenko
# ---------------------------------------------------------------------------------------------------------------


def optical_density_lut(Io: float = 240, device: torch.device | str = "cpu") -> torch.Tensor:
    """OD of every uint8 level, -log((v + 1) / Io), float32, with the same float ops torchstain uses per pixel."""
    levels = torch.arange(256, dtype=torch.float32, device=device)
    return -torch.log((levels + 1) / Io)


def _kth_smallest_masked(values: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k-th (1-based) smallest of values where mask; k (B,) int64 in 1..mask.sum(1)."""
    k = k.clamp(min=1)
    depth = int(k.max().item())
    keyed = values.masked_fill(~mask, float("inf"))
    smallest = torch.topk(keyed, min(depth, values.shape[1]), dim=1, largest=False, sorted=True).values
    return smallest.gather(1, (k - 1).clamp(max=smallest.shape[1] - 1).unsqueeze(1)).squeeze(1)


def _kth_largest_masked(values: torch.Tensor, mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k-th (1-based) largest of values where mask."""
    k = k.clamp(min=1)
    depth = int(k.max().item())
    keyed = values.masked_fill(~mask, float("-inf"))
    largest = torch.topk(keyed, min(depth, values.shape[1]), dim=1, largest=True, sorted=True).values
    return largest.gather(1, (k - 1).clamp(max=largest.shape[1] - 1).unsqueeze(1)).squeeze(1)


def _nearest_rank(q: float, count: torch.Tensor) -> torch.Tensor:
    """1-based rank of the q-th percentile without interpolation: 1 + round(q/100 * (n - 1)), half to even."""
    return 1 + torch.round((0.01 * float(q)) * (count.to(torch.float64) - 1)).to(torch.int64)


def _macenko_chunk(
    patches: torch.Tensor,
    lut: torch.Tensor,
    target_matrix: torch.Tensor,
    target_max: torch.Tensor,
    Io: float,
    alpha: float,
    beta: float,
    min_tissue_pixels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize one cache-sized chunk (b, H, W, 3) uint8; returns (uint8 out, fallback flags)."""
    b, h, w, _ = patches.shape
    n_pixels = h * w
    pixels = patches.reshape(b, n_pixels, 3)
    od = lut[pixels.long()]  # (b, P, 3) float32
    # OD >= beta on all channels <=> every channel value <= the brightest level whose OD still reaches beta
    tissue_levels = torch.nonzero(lut >= beta)
    if tissue_levels.numel() == 0:
        tissue = torch.zeros(b, n_pixels, dtype=torch.bool, device=patches.device)
    else:
        tissue = pixels.amax(dim=2) <= tissue_levels.max()
    n_tissue = tissue.sum(dim=1)

    # stain plane: the two leading eigenvectors of the tissue-pixel OD covariance
    weight = tissue.unsqueeze(2).to(od.dtype)
    count = n_tissue.clamp(min=1).to(od.dtype).view(b, 1, 1)
    mean = (od * weight).sum(dim=1, keepdim=True) / count
    centered = (od - mean) * weight
    covariance = torch.bmm(centered.transpose(1, 2), centered) / (count - 1).clamp(min=1)
    usable = (n_tissue >= max(int(min_tissue_pixels), 2)) & torch.isfinite(covariance).all(dim=2).all(dim=1)
    # degenerate matrices are swapped for a harmless one so that one bad patch cannot fail the batched eigh
    safe_covariance = torch.where(
        usable.view(b, 1, 1), covariance,
        torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=od.dtype, device=od.device)).expand(b, 3, 3),
    )
    eigenvalues, eigenvectors = torch.linalg.eigh(safe_covariance)
    usable &= eigenvalues[:, 1] > 1e-7 * eigenvalues[:, 2].abs().clamp(min=1e-20)
    plane = eigenvectors[:, :, 1:3]  # (b, 3, 2), like eigvecs[:, [1, 2]]

    # robust extremes of the angle in that plane give the two stain vectors
    projected = torch.bmm(od, plane)
    angle = torch.atan2(projected[..., 1], projected[..., 0])
    min_angle = _kth_smallest_masked(angle, tissue, _nearest_rank(alpha, n_tissue))
    rank_high = _nearest_rank(100 - alpha, n_tissue)
    max_angle = _kth_largest_masked(angle, tissue, n_tissue - rank_high + 1)
    v_min = torch.bmm(plane, torch.stack([torch.cos(min_angle), torch.sin(min_angle)], dim=1).unsqueeze(2))
    v_max = torch.bmm(plane, torch.stack([torch.cos(max_angle), torch.sin(max_angle)], dim=1).unsqueeze(2))
    # hematoxylin first: the vector with the larger red OD component
    min_first = (v_min[:, 0, 0] > v_max[:, 0, 0]).view(b, 1, 1)
    stains = torch.where(min_first, torch.cat([v_min, v_max], dim=2), torch.cat([v_max, v_min], dim=2))

    # concentrations by least squares for every pixel, then their 99th percentiles
    stains64 = stains.to(torch.float64)
    gram = stains64.transpose(1, 2) @ stains64
    gram = torch.where(usable.view(b, 1, 1), gram, torch.eye(2, dtype=gram.dtype, device=gram.device))
    pseudo_inverse = torch.linalg.solve(gram, stains64.transpose(1, 2)).to(od.dtype)  # (b, 2, 3)
    concentrations = torch.bmm(od, pseudo_inverse.transpose(1, 2))  # (b, P, 2)
    top = n_pixels - int(_nearest_rank(99, torch.tensor(n_pixels)).item()) + 1
    max_concentrations = torch.topk(concentrations, top, dim=1, largest=True, sorted=False).values.amin(dim=1)

    # one 3x3 map per patch: OD -> target-stain OD (target_matrix @ diag(target_max / max) @ pinv)
    scale = target_max.to(od.dtype).unsqueeze(0) / max_concentrations
    mixing = target_matrix.to(od.dtype).unsqueeze(0) * scale.unsqueeze(1)  # (b, 3, 2)
    od_map = torch.bmm(mixing, pseudo_inverse)  # (b, 3, 3)
    usable &= torch.isfinite(od_map).all(dim=2).all(dim=1) & (max_concentrations > 0).all(dim=1)
    od_map = torch.where(usable.view(b, 1, 1), od_map, torch.zeros_like(od_map))
    image = Io * torch.exp(-torch.bmm(od, od_map.transpose(1, 2)))
    # torchstain clips at 255 and truncates with .int(); values are positive so truncation is floor
    normalized = image.clamp(max=255).to(torch.uint8).reshape(b, h, w, 3)
    fallback = ~usable
    normalized = torch.where(fallback.view(b, 1, 1, 1), patches, normalized)
    return normalized, fallback


def macenko_normalize_batch(
    patches: torch.Tensor,
    reference: MacenkoReference | None = None,
    Io: float = 240,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_tissue_pixels: int = 100,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko-normalize uint8 (B, H, W, 3) patches to `reference`; returns (uint8 same shape/device, fallback (B,)).

    Matches torchstain's torch backend (nearest-rank percentiles, eigh eigenvector order, hematoxylin-first
    rule). Patches with fewer than `min_tissue_pixels` pixels of OD >= beta on all channels, a covariance of
    rank < 2 or any non-finite intermediate are returned unchanged and flagged; nothing raises on them.
    """
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
    if patches.dtype != torch.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be uint8 (B, H, W, 3), got {patches.dtype} {tuple(patches.shape)}")
    if not 0 <= alpha < 50:
        raise ValueError(f"alpha must be in [0, 50), got {alpha}")
    reference = MacenkoReference.default() if reference is None else reference
    device = patches.device
    out = torch.empty_like(patches)
    fallback = torch.zeros(patches.shape[0], dtype=torch.bool, device=device)
    if patches.shape[0] == 0 or patches.shape[1] * patches.shape[2] == 0:
        fallback[:] = True
        out.copy_(patches)
        return out, fallback
    lut = optical_density_lut(Io, device)
    target_matrix = torch.as_tensor(reference.stain_matrix, dtype=torch.float32, device=device)
    target_max = torch.as_tensor(reference.max_concentrations, dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, patches.shape[0], chunk_size):
            stop = min(start + chunk_size, patches.shape[0])
            out[start:stop], fallback[start:stop] = _macenko_chunk(
                patches[start:stop], lut, target_matrix, target_max, Io, alpha, beta, min_tissue_pixels
            )
    return out, fallback
