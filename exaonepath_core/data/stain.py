"""Macenko stain normalization for whole batches in torch (CPU and CUDA), reference fitting, stain augmentation."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exaonepath_core.io import atomic

DEFAULT_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
DEFAULT_MAX_CONCENTRATIONS = (1.9705, 1.0308)
# Io / alpha / beta of the per-patch estimate: the keyword defaults below are the paper's (and torchstain's),
# config.DEFAULT_MACENKO_PARAMS


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
        """The standard H&E reference of Macenko et al., torchstain's built-in default.

        EXAONEPath's official code does not use it: it fits torchstain to one TCGA crop
        (`target_TCGA-55-A48X_coords_[19440  9824]_[4096 4096].png` in its repository), whose stain vectors and
        maximum concentrations differ; pass that image as `normalize.reference_image` (or a reference JSON fitted
        to it as the backbone's `macenko_reference`) to reproduce its colours.
        """
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
        atomic.write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

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
# Speed notes (CPU, measured on 224 px CMU tiles, see benchmarks/macenko.py):
# - Pixels are kept as channel planes (b, 3, P) so every per-pixel op runs over contiguous rows; the uint8
#   input is transposed while widening to int32 (a uint8 -> uint8 transposed copy is ~10x slower in torch),
#   and the output is written with one strided float -> uint8 copy per channel for the same reason.
# - Every large temporary lives in one per-call workspace reused by all chunks: fresh multi-MB allocations
#   (page faults on first touch) cost more than the arithmetic.
# - Percentiles are exact nearest-rank order statistics (torchstain's kthvalue) found by a histogram over a
#   known value range, one cumulative sum, then an exact sort of only the few values in the bin holding the
#   rank: a per-row top-k or sort was the largest single cost.
# - Patches without enough tissue are detected on the integer planes and skipped before any float work.

_ANGLE_BINS = 4096
_CONCENTRATION_BINS = 4096


def optical_density_lut(Io: float = 240, device: torch.device | str = "cpu") -> torch.Tensor:
    """OD of every uint8 level, -log((v + 1) / Io), float32, with the same float ops torchstain uses per pixel."""
    levels = torch.arange(256, dtype=torch.float32, device=device)
    return -torch.log((levels + 1) / Io)


def _nearest_rank(q: float, count: torch.Tensor) -> torch.Tensor:
    """1-based rank of the q-th percentile without interpolation: 1 + round(q/100 * (n - 1)), half to even."""
    return 1 + torch.round((0.01 * float(q)) * (count.to(torch.float64) - 1)).to(torch.int64)


class _Workspace:
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


def _histogram_select(values: torch.Tensor, ranks: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                      bins: int, valid: torch.Tensor | None = None, workspace: _Workspace | None = None) -> torch.Tensor:
    """Exact k-th smallest valid values per row of a (rows, n) float tensor, for (rows, t) 1-based ranks.

    Values are binned monotonically over [low, high] per row (values outside land in the end bins, so the
    range only affects speed, never the result), the bin holding each rank is found from cumulative counts,
    and only that bin's values are sorted. `valid` is a float 0/1 mask (rows, n); values must not be NaN. Ranks outside [1, valid count] give NaN. `workspace` lends scratch buffers.
    """
    rows, n = values.shape
    device = values.device
    slots = bins + 1  # one extra bin per row collects the invalid entries, after all valid ones
    if workspace is None or workspace.position.numel() < rows * n:
        position = torch.empty(rows, n, dtype=values.dtype, device=device)
        binned = torch.empty(rows, n, dtype=torch.int32, device=device)
    else:
        position = workspace.position[: rows * n].view(rows, n)
        binned = workspace.bins[: rows * n].view(rows, n)
    scale = (bins / (high - low).clamp(min=1e-30)).to(values.dtype).unsqueeze(1)
    torch.sub(values, low.to(values.dtype).unsqueeze(1), out=position).mul_(scale).clamp_(0, bins - 1)
    if valid is not None:
        # invalid entries to the extra bin: (p - bins) * 0 + bins; monotone in p for the valid ones
        position.sub_(bins).mul_(valid).add_(bins)
    binned.copy_(position)  # truncation = floor here; NaN becomes INT_MIN, sent to bin 0 by the clamp
    binned.clamp_(min=0)
    row_start = torch.arange(rows, dtype=torch.int32, device=device).mul_(slots).unsqueeze(1)
    binned += row_start
    counts = torch.bincount(binned.view(-1), minlength=rows * slots).view(rows, slots)
    cumulative = counts.cumsum(1)
    ranks = ranks.to(torch.int64).contiguous()
    target = torch.searchsorted(cumulative, ranks)  # first bin whose cumulative count reaches the rank
    found = (ranks >= 1) & (target < bins)
    target = target.clamp(max=bins - 1)
    below = torch.where(target > 0, cumulative.gather(1, (target - 1).clamp(min=0)), 0)
    within = ranks - below  # 1-based rank inside the target bin
    flat_target = torch.where(found, target + row_start, -1).to(torch.int32)
    # candidates: the entries in any row's target bin (a handful per rank for smooth data)
    is_candidate = binned == flat_target[:, :1]
    for column in range(1, flat_target.shape[1]):
        is_candidate |= binned == flat_target[:, column:column + 1]
    where = is_candidate.view(-1).nonzero().squeeze(1)
    if where.numel() == 0:
        return torch.full(ranks.shape, float("nan"), dtype=values.dtype, device=device)
    candidate_values = values.reshape(-1)[where]
    candidate_bins = binned.view(-1)[where]
    # order by (bin, value): sort by value, then stably by bin
    candidate_values, order = torch.sort(candidate_values, stable=True)
    candidate_bins, bin_order = torch.sort(candidate_bins[order], stable=True)
    candidate_values = candidate_values[bin_order]
    start = torch.searchsorted(candidate_bins, flat_target.clamp(min=0))
    pick = (start + within - 1).clamp(0, candidate_values.numel() - 1)
    return torch.where(found, candidate_values[pick], float("nan"))


def select_kth(values: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None,
               largest: bool = False) -> torch.Tensor:
    """Exact per-row k-th smallest (or largest) among the valid entries of a (rows, n) float tensor.

    k is 1-based, shape (rows,); rows with fewer than k valid entries give +inf (smallest) or -inf (largest).
    NaN entries count as invalid.
    """
    if values.shape[0] == 0:
        return values.new_empty(0)
    usable = ~torch.isnan(values) if valid is None else valid & ~torch.isnan(values)
    finite = usable & torch.isfinite(values)
    low = torch.where(finite, values, float("inf")).amin(1).double()
    high = torch.where(finite, values, float("-inf")).amax(1).double()
    low, high = torch.where(low <= high, low, 0.0), torch.where(low <= high, high, 1.0)
    n_valid = usable.sum(1)
    k = k.to(torch.int64).to(values.device)
    rank = n_valid - k + 1 if largest else k
    values = torch.where(usable, values, 0.0)  # NaN * 0 would stay NaN in the validity arithmetic
    result = _histogram_select(values, rank.unsqueeze(1), low, high, _ANGLE_BINS, usable.to(values.dtype))
    result = result.squeeze(1)
    missing = (k < 1) | (k > n_valid)
    return result.masked_fill(missing, float("-inf") if largest else float("inf"))


@dataclass
class _StainEstimate:
    """Per-patch Macenko estimate of a chunk: stain vectors (b, 3, 2), pseudo-inverse (b, 2, 3), max (b, 2)."""

    stains: torch.Tensor
    pseudo_inverse: torch.Tensor
    max_concentrations: torch.Tensor
    usable: torch.Tensor
    n_tissue: torch.Tensor


def _tissue_level(lut: torch.Tensor, beta: float) -> int:
    """The brightest uint8 level whose OD still reaches beta (-1 if none): OD >= beta <=> level <= this."""
    levels = torch.nonzero(lut >= beta)
    return int(levels.max()) if levels.numel() else -1


def _load_planes(patches: torch.Tensor, ws: _Workspace, tissue_level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (b, H, W, 3) -> int32 channel planes (b, 3, P) and the count of tissue pixels per patch."""
    b = patches.shape[0]
    index = ws.index[:b]
    index.copy_(patches.view(b, -1, 3).transpose(1, 2))
    brightest = torch.maximum(index[:, 0], index[:, 1], out=ws.brightest[:b])
    torch.maximum(brightest, index[:, 2], out=brightest)
    # OD >= beta on all channels <=> every channel level <= tissue_level
    n_tissue = torch.le(brightest, tissue_level, out=ws.tissue[:b]).sum(1).to(torch.int64)
    return index, n_tissue


def _keep_rows(ws: _Workspace, keep: torch.Tensor) -> None:
    """Move the kept rows of the loaded planes to the front of the workspace (in place, order kept)."""
    for destination, source in enumerate(keep.tolist()):
        if destination != source:
            ws.index[destination].copy_(ws.index[source])
            ws.brightest[destination].copy_(ws.brightest[source])


def _estimate_stains(ws: _Workspace, b: int, lut: torch.Tensor, tissue_level: int, n_tissue: torch.Tensor,
                     alpha: float, min_tissue_pixels: int) -> _StainEstimate:
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
    ranks = torch.stack([_nearest_rank(alpha, n_tissue), _nearest_rank(100 - alpha, n_tissue)], 1)
    half_turn = torch.full((b,), torch.pi, dtype=torch.float64, device=device)
    extremes = _histogram_select(angle, ranks, -half_turn, half_turn, _ANGLE_BINS, tissue, ws)
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
    rank = _nearest_rank(99, torch.full((2 * b, 1), n_pixels, device=device))
    max_concentrations = _histogram_select(concentrations, rank, low, high, _CONCENTRATION_BINS,
                                           None, ws).view(b, 2)
    usable &= torch.isfinite(max_concentrations).all(1) & (max_concentrations > 0).all(1)
    return _StainEstimate(stains, pseudo_inverse, max_concentrations, usable, n_tissue)


def _macenko_chunk(
    patches: torch.Tensor,
    out: torch.Tensor,
    ws: _Workspace,
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
    _, n_tissue = _load_planes(patches, ws, tissue_level)
    enough = n_tissue >= max(int(min_tissue_pixels), 2)
    keep = torch.nonzero(enough).squeeze(1)
    kept = int(keep.numel())
    if kept < b:
        _keep_rows(ws, keep)
    if kept:
        estimate = _estimate_stains(ws, kept, lut, tissue_level, n_tissue[keep], alpha, min_tissue_pixels)
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


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU path (numba): the same estimate as the torch path in about four passes over each patch's pixels
# ---------------------------------------------------------------------------------------------------------------
# Per patch: (1) uint8 -> OD by table, tissue mask, count, sums and second moments in one pass; (2) 3x3 eigh,
# projection of the tissue pixels on the stain plane and exact nearest-rank angle percentiles; (3) the 2x2
# pseudo-inverse concentrations of every pixel and their exact 99th percentiles; (4) the output, where
# Io * exp(-M @ od) = prod_j exp(-M[c, j] * od_j) comes from three 256-entry tables per channel (no exp per
# pixel). Percentiles are exact order statistics: a histogram over the observed range, then a sort of only
# the bin that holds the rank. Angles are ordered by a cheap monotone pseudo-angle (one division instead of
# an atan2 per pixel); atan2 runs on the selected pixel only, so the result is the nearest-rank angle.
# Kernels run with the GIL released, one contiguous slice of patches per thread.

_NUMBA_KERNEL_KWARGS = {"cache": True, "fastmath": False, "nogil": True}


def _numba_or_none():
    """The numba module, or None where it is not installed (the torch backend still works then)."""
    try:
        import numba
    except ImportError:
        return None
    return numba


_numba = _numba_or_none()
NUMBA_AVAILABLE = _numba is not None

if NUMBA_AVAILABLE:
    _njit = _numba.njit(**_NUMBA_KERNEL_KWARGS)

    @_njit
    def _nb_nearest_rank(q: float, n: int) -> int:
        """1 + round(q/100 * (n - 1)), half to even, as torch.round does."""
        return 1 + np.int64(np.rint((0.01 * q) * (n - 1.0)))

    @_njit
    def _nb_bin(value, low, scale, bins):
        """Histogram bin of a value over [low, ...) with `bins` bins; out-of-range and NaN values go to the ends."""
        position = (value - low) * scale
        if position >= 0.0:
            if position < bins:
                return np.int64(position)
            return bins - 1
        return 0

    @_njit
    def _nb_select_two(values, n, rank_a, rank_b, low, high, hist, candidate_values, candidate_index):
        """Indices of the rank_a-th and rank_b-th smallest (1-based) of values[:n] (low <= values <= high)."""
        bins = hist.shape[0]
        hist[:] = 0
        scale = bins / (high - low) if high > low else 0.0
        for i in range(n):
            hist[_nb_bin(values[i], low, scale, bins)] += 1
        target_a = target_b = -1
        below_a = below_b = 0
        cumulative = 0
        for j in range(bins):
            following = cumulative + hist[j]
            if target_a < 0 and following >= rank_a:
                target_a, below_a = j, cumulative
            if target_b < 0 and following >= rank_b:
                target_b, below_b = j, cumulative
            if target_a >= 0 and target_b >= 0:
                break
            cumulative = following
        same = target_b == target_a
        half = candidate_values.shape[0] // 2  # a's candidates in the first half, b's in the second
        count_a = 0
        count_b = half
        for i in range(n):
            j = _nb_bin(values[i], low, scale, bins)
            if j == target_a:
                candidate_values[count_a] = values[i]
                candidate_index[count_a] = i
                count_a += 1
            elif j == target_b:
                candidate_values[count_b] = values[i]
                candidate_index[count_b] = i
                count_b += 1
        order_a = np.argsort(candidate_values[:count_a], kind="mergesort")
        pick_a = candidate_index[order_a[rank_a - below_a - 1]]
        if same:
            return pick_a, candidate_index[order_a[rank_b - below_b - 1]]
        order_b = np.argsort(candidate_values[half:count_b], kind="mergesort")
        pick_b = candidate_index[half + order_b[rank_b - below_b - 1]]
        return pick_a, pick_b

    @_njit
    def _nb_pseudo_angle(x, y):
        """A strictly increasing function of atan2(y, x) on [-pi, pi] with one division (range [-2, 2])."""
        total = abs(x) + abs(y)
        if total == 0.0:
            return 0.0
        turn = abs(y) / total
        # selects, not branches: x changes sign within a patch, so a branch would mispredict half the time
        half = turn if x >= 0.0 else 2.0 - turn
        upper = y > 0.0 or (y == 0.0 and np.copysign(1.0, y) > 0.0)  # atan2(-0.0, x < 0) is -pi
        return half if upper else -half

    @_njit
    def _nb_sample_threshold(sample, count, fraction, top):
        """A value with comfortably more than `fraction` of the sample beyond it (below it, or above if `top`)."""
        # 4 binomial standard deviations of the sample share plus 0.5%: every candidate costs selection
        # time, a miss costs the exact histogram path (~3 extra passes). With 0.02 + 3 sd the tails kept ~4.3%
        # of pixels instead of ~2.8%; neither margin missed once on 266 tissue tiles (CMU, CRC, stain images)
        margin = 0.005 + 4.0 * np.sqrt(fraction * (1.0 - fraction) / count)
        share = min(fraction + margin, 1.0)
        position = int((1.0 - share) * (count - 1)) if top else int(np.ceil(share * (count - 1)))
        return np.partition(sample[:count], position)[position]

    @_njit
    def _nb_kth_gathered(values, index, count, k):
        """Index (from `index`) of the k-th smallest (1-based) of values[:count]."""
        kth = np.partition(values[:count], k - 1)[k - 1]
        for j in range(count):
            if values[j] == kth:
                return index[j]
        return index[0]  # unreachable: the k-th value is one of the values

    @_njit
    def _nb_tissue_projection(pixels, p, lut, e1, e2):
        """float32 coordinates (x, y) of pixel p's OD in the stain plane, as the torch path's float32 bmm.

        e1, e2 are tuples of float32 scalars: values, so the compiler keeps them in registers across stores.
        """
        o0 = lut[pixels[p, 0]]
        o1 = lut[pixels[p, 1]]
        o2 = lut[pixels[p, 2]]
        return e1[0] * o0 + e1[1] * o1 + e1[2] * o2, e2[0] * o0 + e2[1] * o1 + e2[2] * o2

    @_njit
    def _nb_angle_extremes(pixels, lut, e1, e2, tissue_index, n, rank_low, rank_high, sample, keys,
                           candidate_values, candidate_index, angle_hist):
        """Tissue-list positions of the rank_low-th and rank_high-th smallest angles (exact nearest-rank).

        Two sample pixels whose angles comfortably bound the tails are chosen from a strided sample; one pass
        keeps the pixels beyond them and the ranks are selected among those. When every tissue pixel lies in
        the lower half plane (y < 0: the leading eigenvector is pinned negative and tissue OD is positive),
        angle order is the sign of a cross product, exact in float64 for float32 coordinates, so the pass
        needs no division; otherwise, or where the sample misjudged a tail, all keys are histogrammed.
        """
        half = candidate_values.shape[0] // 2
        stride = max(1, n // 512)
        count = 0
        for i in range(0, n, stride):
            x, y = _nb_tissue_projection(pixels, tissue_index[i], lut, e1, e2)
            sample[count] = _nb_pseudo_angle(np.float64(x), np.float64(y))
            sample[half + count] = i
            count += 1
        low_key = _nb_sample_threshold(sample, count, rank_low / n, False)
        high_key = _nb_sample_threshold(sample, count, (n - rank_high + 1) / n, True)
        low_at = high_at = 0
        for j in range(count):
            if sample[j] == low_key:
                low_at = int(sample[half + j])
            if sample[j] == high_key:
                high_at = int(sample[half + j])
        x_low, y_low = _nb_tissue_projection(pixels, tissue_index[low_at], lut, e1, e2)
        x_high, y_high = _nb_tissue_projection(pixels, tissue_index[high_at], lut, e1, e2)
        x_low, y_low, x_high, y_high = np.float64(x_low), np.float64(y_low), np.float64(x_high), np.float64(y_high)
        lower_half_plane = y_low < 0.0 and y_high < 0.0
        n_low = 0
        n_high = 0
        if lower_half_plane:
            for i in range(n):
                x, y = _nb_tissue_projection(pixels, tissue_index[i], lut, e1, e2)
                x = np.float64(x)
                y = np.float64(y)
                if not y < 0.0:
                    lower_half_plane = False
                    break
                # store always, keep by advancing the count (no branch to mispredict); keys come after
                candidate_index[n_low] = i
                n_low += x * y_low - y * x_low >= 0.0  # angle <= the low bound's angle
                candidate_index[half + n_high] = i
                n_high += x_high * y - y_high * x >= 0.0  # angle >= the high bound's angle
            if lower_half_plane:
                for j in range(n_low):
                    x, y = _nb_tissue_projection(pixels, tissue_index[candidate_index[j]], lut, e1, e2)
                    candidate_values[j] = _nb_pseudo_angle(np.float64(x), np.float64(y))
                for j in range(half, half + n_high):
                    x, y = _nb_tissue_projection(pixels, tissue_index[candidate_index[j]], lut, e1, e2)
                    candidate_values[j] = _nb_pseudo_angle(np.float64(x), np.float64(y))
        if not lower_half_plane:
            n_low = 0
            n_high = 0
            for i in range(n):
                x, y = _nb_tissue_projection(pixels, tissue_index[i], lut, e1, e2)
                key = _nb_pseudo_angle(np.float64(x), np.float64(y))
                if key <= low_key:
                    candidate_values[n_low] = key
                    candidate_index[n_low] = i
                    n_low += 1
                if key >= high_key:
                    candidate_values[half + n_high] = key
                    candidate_index[half + n_high] = i
                    n_high += 1
        below_high = n - n_high  # angles below the high bound
        if n_low >= rank_low and below_high < rank_high:
            pick_low = _nb_kth_gathered(candidate_values, candidate_index, n_low, rank_low)
            pick_high = _nb_kth_gathered(candidate_values[half:], candidate_index[half:], n_high,
                                         rank_high - below_high)
            return pick_low, pick_high
        low = np.inf
        high = -np.inf
        for i in range(n):
            x, y = _nb_tissue_projection(pixels, tissue_index[i], lut, e1, e2)
            keys[i] = _nb_pseudo_angle(np.float64(x), np.float64(y))
            low = min(low, keys[i])
            high = max(high, keys[i])
        return _nb_select_two(keys, n, rank_low, rank_high, low, high, angle_hist, candidate_values,
                              candidate_index)

    @_njit
    def _nb_concentration_maxima(pixels, lut, inverse, rank, sample, concentrations, candidate_values,
                                 candidate_index, concentration_hist):
        """Exact rank-th smallest H and E concentration over all pixels (the 99th percentile), float32.

        As for the angles: sample thresholds, one pass keeping the values above them, selection among those;
        a full histogram selection where the sample misjudged the tail.
        """
        n_pixels = pixels.shape[0]
        half = candidate_values.shape[0] // 2
        stride = max(1, n_pixels // 512)
        # local scalars: loads from `inverse` inside the loops could not be hoisted past the candidate stores
        h0, h1, h2 = inverse[0, 0], inverse[0, 1], inverse[0, 2]
        e0, e1, e2 = inverse[1, 0], inverse[1, 1], inverse[1, 2]
        count = 0
        for p in range(0, n_pixels, stride):
            o0 = lut[pixels[p, 0]]
            o1 = lut[pixels[p, 1]]
            o2 = lut[pixels[p, 2]]
            sample[count] = h0 * o0 + h1 * o1 + h2 * o2
            sample[half + count] = e0 * o0 + e1 * o1 + e2 * o2
            count += 1
        above = (n_pixels - rank + 1) / n_pixels
        limit_h = np.float32(_nb_sample_threshold(sample, count, above, True))
        limit_e = np.float32(_nb_sample_threshold(sample[half:], count, above, True))
        n_h = 0
        n_e = 0
        for p in range(n_pixels):
            o0 = lut[pixels[p, 0]]
            o1 = lut[pixels[p, 1]]
            o2 = lut[pixels[p, 2]]
            h = h0 * o0 + h1 * o1 + h2 * o2
            e = e0 * o0 + e1 * o1 + e2 * o2
            # store always, keep by advancing the count: no branch to mispredict on the ~4% kept
            candidate_values[n_h] = h
            n_h += h >= limit_h
            candidate_values[half + n_e] = e
            n_e += e >= limit_e
        maxima = np.empty(2, np.float32)
        if n_pixels - n_h < rank and n_pixels - n_e < rank:
            k_h = rank - (n_pixels - n_h)
            k_e = rank - (n_pixels - n_e)
            maxima[0] = np.partition(candidate_values[:n_h], k_h - 1)[k_h - 1]
            maxima[1] = np.partition(candidate_values[half:half + n_e], k_e - 1)[k_e - 1]
            return maxima
        low_h = low_e = np.inf
        high_h = high_e = -np.inf
        for p in range(n_pixels):
            o0 = lut[pixels[p, 0]]
            o1 = lut[pixels[p, 1]]
            o2 = lut[pixels[p, 2]]
            h = h0 * o0 + h1 * o1 + h2 * o2
            e = e0 * o0 + e1 * o1 + e2 * o2
            concentrations[0, p] = h
            concentrations[1, p] = e
            low_h = min(low_h, h)
            high_h = max(high_h, h)
            low_e = min(low_e, e)
            high_e = max(high_e, e)
        for stain in range(2):
            row = concentrations[stain]
            low_s = np.float64(low_h if stain == 0 else low_e)
            high_s = np.float64(high_h if stain == 0 else high_e)
            pick, _ = _nb_select_two(row, n_pixels, rank, rank, low_s, high_s, concentration_hist,
                                     candidate_values, candidate_index)
            maxima[stain] = row[pick]
        return maxima

    @_njit
    def _nb_estimate_patch(pixels, lut, tissue_level, alpha, min_tissue, concentration_rank, angle_hist,
                           concentration_hist, tissue_index, keys, concentrations, sample, candidate_values,
                           candidate_index, stains, inverse, maxima):
        """Macenko estimate of one (P, 3) uint8 patch; returns (usable, n_tissue).

        Fills stains (3, 2: H, E OD unit columns), inverse (2, 3: their least-squares pseudo-inverse) and
        maxima (2: 99th-percentile concentrations), all float32, when usable. Scratch buffers are lent.
        """
        n_pixels = pixels.shape[0]
        f32 = np.float32
        # (1) tissue mask, count, sums and second moments of the tissue OD (float64 accumulation)
        n = 0
        s0 = s1 = s2 = 0.0
        p00 = p01 = p02 = p11 = p12 = p22 = 0.0
        for p in range(n_pixels):
            r = pixels[p, 0]
            g = pixels[p, 1]
            b = pixels[p, 2]
            if r <= tissue_level and g <= tissue_level and b <= tissue_level:
                o0 = np.float64(lut[r])
                o1 = np.float64(lut[g])
                o2 = np.float64(lut[b])
                s0 += o0
                s1 += o1
                s2 += o2
                p00 += o0 * o0
                p01 += o0 * o1
                p02 += o0 * o2
                p11 += o1 * o1
                p12 += o1 * o2
                p22 += o2 * o2
                tissue_index[n] = p
                n += 1
        if n < max(min_tissue, 2):
            return False, n
        # (2) stain plane: eigenvectors of the unbiased covariance (as torchstain's cov), eigh in float32
        # like the torch path so both use LAPACK's float32 conventions
        count = np.float64(n)
        covariance = np.empty((3, 3), np.float64)
        sums = (s0, s1, s2)
        products = ((p00, p01, p02), (p01, p11, p12), (p02, p12, p22))
        for i in range(3):
            for j in range(3):
                covariance[i, j] = (products[i][j] - sums[i] * sums[j] / count) / (count - 1.0)
        if not np.all(np.isfinite(covariance)):
            return False, n
        eigenvalues, eigenvectors = np.linalg.eigh(covariance.astype(np.float32))
        if not eigenvalues[1] > 1e-4 * max(abs(np.float64(eigenvalues[2])), 1e-30):
            return False, n
        e1 = eigenvectors[:, 1].copy()
        e2 = eigenvectors[:, 2].copy()
        if e2[0] + e2[1] + e2[2] > 0:  # pin the sign of the leading eigenvector (see the torch path)
            e2 = -e2
        plane_1 = (e1[0], e1[1], e1[2])
        plane_2 = (e2[0], e2[1], e2[2])
        pick_min, pick_max = _nb_angle_extremes(pixels, lut, plane_1, plane_2, tissue_index, n, _nb_nearest_rank(alpha, n),
                                                _nb_nearest_rank(100.0 - alpha, n), sample, keys, candidate_values,
                                                candidate_index, angle_hist)
        plane_vectors = np.empty((3, 2), np.float32)  # columns: v_min, v_max
        for column in range(2):
            x, y = _nb_tissue_projection(pixels, tissue_index[pick_min if column == 0 else pick_max], lut, plane_1,
                                         plane_2)
            angle = np.arctan2(y, x)  # float32, as torch.atan2 on the float32 projections
            c = np.cos(angle)
            s = np.sin(angle)
            for k in range(3):
                plane_vectors[k, column] = e1[k] * c + e2[k] * s
        h_column = 0 if plane_vectors[0, 0] > plane_vectors[0, 1] else 1  # hematoxylin: larger red OD
        for k in range(3):
            stains[k, 0] = plane_vectors[k, h_column]
            stains[k, 1] = plane_vectors[k, 1 - h_column]
        if not np.all(np.isfinite(stains)):
            return False, n
        # (3) least-squares concentrations of every pixel (closed-form 2x2 pseudo-inverse in float64)
        s64 = stains.astype(np.float64)
        g00 = s64[0, 0] * s64[0, 0] + s64[1, 0] * s64[1, 0] + s64[2, 0] * s64[2, 0]
        g01 = s64[0, 0] * s64[0, 1] + s64[1, 0] * s64[1, 1] + s64[2, 0] * s64[2, 1]
        g11 = s64[0, 1] * s64[0, 1] + s64[1, 1] * s64[1, 1] + s64[2, 1] * s64[2, 1]
        determinant = g00 * g11 - g01 * g01
        if not determinant > 1e-10:
            return False, n
        for k in range(3):
            inverse[0, k] = f32((g11 / determinant) * s64[k, 0] + (-g01 / determinant) * s64[k, 1])
            inverse[1, k] = f32((-g01 / determinant) * s64[k, 0] + (g00 / determinant) * s64[k, 1])
        maxima[:] = _nb_concentration_maxima(pixels, lut, inverse, concentration_rank, sample, concentrations,
                                             candidate_values, candidate_index, concentration_hist)
        if not (np.all(np.isfinite(maxima)) and maxima[0] > 0 and maxima[1] > 0):
            return False, n
        return True, n

    @_njit
    def _nb_normalize_patch(pixels, out, lut, tissue_level, target_matrix, target_max, log_io, alpha,
                            min_tissue, concentration_rank, angle_hist, concentration_hist, tissue_index, keys,
                            concentrations, sample, candidate_values, candidate_index, tables):
        """Normalize one (P, 3) uint8 patch into `out`; returns (usable, n_tissue). Scratch buffers are lent."""
        stains = np.empty((3, 2), np.float32)
        inverse = np.empty((2, 3), np.float32)
        maxima = np.empty(2, np.float32)
        usable, n = _nb_estimate_patch(pixels, lut, tissue_level, alpha, min_tissue, concentration_rank,
                                       angle_hist, concentration_hist, tissue_index, keys, concentrations, sample,
                                       candidate_values, candidate_index, stains, inverse, maxima)
        if not usable:
            return False, n
        n_pixels = pixels.shape[0]
        # (4) output: OD -> target OD map, target_matrix @ diag(target_max / max) @ pinv (float32 as torch)
        od_map = np.empty((3, 3), np.float32)
        for c in range(3):
            for k in range(3):
                od_map[c, k] = (target_matrix[c, 0] * (target_max[0] / maxima[0]) * inverse[0, k]
                                + target_matrix[c, 1] * (target_max[1] / maxima[1]) * inverse[1, k])
        if not np.all(np.isfinite(od_map)):
            return False, n
        # tables[k, level, c] = exp(-od_map[c, k] * od(level)), Io folded into k = 0: one pixel reads three
        # rows of three adjacent entries
        tables_ok = True
        for k in range(3):
            offset = log_io if k == 0 else 0.0
            for level in range(256):
                for c in range(3):
                    value = np.exp(offset - np.float64(od_map[c, k]) * np.float64(lut[level]))
                    tables[k, level, c] = value
                    if not (value > 0.0 and value < np.inf):
                        tables_ok = False
        if tables_ok:
            flat = tables.reshape(3 * 256 * 3)
            for p in range(n_pixels):
                red = np.int64(pixels[p, 0]) * 3
                green = 768 + np.int64(pixels[p, 1]) * 3
                blue = 1536 + np.int64(pixels[p, 2]) * 3
                out[p, 0] = np.uint8(min(flat[red] * flat[green] * flat[blue], 255.0))
                out[p, 1] = np.uint8(min(flat[red + 1] * flat[green + 1] * flat[blue + 1], 255.0))
                out[p, 2] = np.uint8(min(flat[red + 2] * flat[green + 2] * flat[blue + 2], 255.0))
        else:  # extreme maps over- or underflow a factor: exponentiate the sum per pixel instead
            for p in range(n_pixels):
                for c in range(3):
                    exponent = log_io
                    for k in range(3):
                        exponent -= np.float64(od_map[c, k]) * np.float64(lut[pixels[p, k]])
                    out[p, c] = np.uint8(min(np.exp(exponent), 255.0))
        return True, n

    @_njit
    def _nb_normalize_patches(pixels, out, fallback, lut, tissue_level, target_matrix, target_max, log_io, alpha,
                              min_tissue, concentration_rank, angle_hist, concentration_hist, tissue_index, keys,
                              concentrations, sample, candidate_values, candidate_index, tables):
        """Normalize a (b, P, 3) uint8 slice into `out`, flags into `fallback` (unusable patches copied).

        The scratch buffers (see `_NumbaScratch`) are lent by the caller, so that one thread reuses them over
        all the chunks it takes: fresh multi-MB buffers per call would cost page faults on every chunk.
        """
        for i in range(pixels.shape[0]):
            usable, _ = _nb_normalize_patch(pixels[i], out[i], lut, tissue_level, target_matrix, target_max, log_io,
                                            alpha, min_tissue, concentration_rank, angle_hist, concentration_hist,
                                            tissue_index, keys, concentrations, sample, candidate_values,
                                            candidate_index, tables)
            fallback[i] = not usable
            if not usable:
                # a flat loop over the contiguous bytes compiles to a vectorized copy; the 2-D slice
                # assignment out[i, :, :] = pixels[i, :, :] ran element by element, ~8x slower
                source = pixels[i].reshape(-1)
                destination = out[i].reshape(-1)
                for j in range(source.shape[0]):
                    destination[j] = source[j]


    @_njit
    def _nb_estimate_patches(pixels, usable, n_tissue, stains, maxima, lut, tissue_level, alpha, min_tissue,
                             concentration_rank, angle_hist, concentration_hist, tissue_index, keys,
                             concentrations, sample, candidate_values, candidate_index, tables):
        """Macenko estimates of a (b, P, 3) uint8 slice into usable (b,), n_tissue (b,), stains (b, 3, 2) and
        maxima (b, 2); `tables` is unused (the scratch tuple is shared with `_nb_normalize_patches`)."""
        inverse = np.empty((2, 3), np.float32)
        for i in range(pixels.shape[0]):
            usable[i], n_tissue[i] = _nb_estimate_patch(pixels[i], lut, tissue_level, alpha, min_tissue,
                                                        concentration_rank, angle_hist, concentration_hist,
                                                        tissue_index, keys, concentrations, sample,
                                                        candidate_values, candidate_index, stains[i], inverse,
                                                        maxima[i])

def _numba_scratch(n_pixels: int) -> tuple[np.ndarray, ...]:
    """One thread's scratch buffers for `_nb_normalize_patches`, in its argument order."""
    return (
        np.empty(_ANGLE_BINS, np.int64),  # angle_hist
        np.empty(_CONCENTRATION_BINS, np.int64),  # concentration_hist
        np.empty(n_pixels, np.int32),  # tissue_index
        np.empty(n_pixels, np.float64),  # keys
        np.empty((2, n_pixels), np.float32),  # concentrations
        np.empty(2 * n_pixels, np.float64),  # sample
        np.empty(2 * n_pixels, np.float64),  # candidate_values
        np.empty(2 * n_pixels, np.int64),  # candidate_index
        np.empty((3, 256, 3), np.float64),  # tables
    )


# Patches per kernel call when threads share a batch. Work is taken dynamically, a chunk at a time: the cost
# of a patch varies ~15x (background tiles stop after one pass), and tissue clusters in space, so equal
# contiguous slices per thread left one thread idle for ~15% of a CMU batch. A call costs ~10 us of dispatch;
# 4 patches are ~2 ms of work.
_NUMBA_CHUNK = 4


def _run_in_chunks(b: int, n_pixels: int, threads: int, kernel) -> None:
    """Call kernel(start, stop, scratch) over [0, b) in chunks of `_NUMBA_CHUNK`, taken dynamically by threads.

    `threads` threads (the caller's included) each own one `_numba_scratch`; kernels release the GIL.
    """
    threads = max(1, min(int(threads), -(-b // _NUMBA_CHUNK)))
    if threads == 1:
        kernel(0, b, _numba_scratch(n_pixels))
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor

    starts = iter(range(0, b, _NUMBA_CHUNK))
    lock = threading.Lock()

    def work() -> None:
        scratch = _numba_scratch(n_pixels)
        while True:
            with lock:
                start = next(starts, None)
            if start is None:
                return
            kernel(start, min(start + _NUMBA_CHUNK, b), scratch)

    with ThreadPoolExecutor(max_workers=threads - 1) as pool:
        helpers = [pool.submit(work) for _ in range(threads - 1)]
        work()  # the calling thread is one of the workers
        for helper in helpers:
            helper.result()  # re-raises a worker's exception here


def _concentration_rank(n_pixels: int) -> int:
    """Nearest rank of the 99th percentile over n_pixels, as `_nearest_rank(99, n)` computes it."""
    return 1 + round((0.01 * 99.0) * (n_pixels - 1))


def _macenko_numba(patches: torch.Tensor, out: torch.Tensor, fallback: torch.Tensor, lut: torch.Tensor,
                   tissue_level: int, reference: MacenkoReference, Io: float, alpha: float,
                   min_tissue_pixels: int, threads: int) -> None:
    """Run the fused kernel over a contiguous CPU batch into `out` and the fallback flags."""
    b = patches.shape[0]
    n_pixels = patches.shape[1] * patches.shape[2]
    pixels = patches.numpy().reshape(b, n_pixels, 3)
    out_pixels = out.numpy().reshape(b, n_pixels, 3)
    flags = fallback.numpy()
    arguments = (
        lut.numpy(), int(tissue_level), np.ascontiguousarray(reference.stain_matrix, dtype=np.float32),
        np.ascontiguousarray(reference.max_concentrations, dtype=np.float32), float(np.log(float(Io))),
        float(alpha), int(max(min_tissue_pixels, 2)), _concentration_rank(n_pixels),
    )

    def kernel(start: int, stop: int, scratch: tuple[np.ndarray, ...]) -> None:
        _nb_normalize_patches(pixels[start:stop], out_pixels[start:stop], flags[start:stop], *arguments, *scratch)

    _run_in_chunks(b, n_pixels, threads, kernel)


def _estimate_numba(patches: torch.Tensor, Io: float, alpha: float, beta: float, min_tissue_pixels: int,
                    threads: int | None = None) -> _StainEstimate:
    """The fused kernel's per-patch Macenko estimate of a uint8 (b, H, W, 3) CPU batch (no output image)."""
    b = patches.shape[0]
    n_pixels = patches.shape[1] * patches.shape[2]
    pixels = patches.contiguous().numpy().reshape(b, n_pixels, 3)
    lut = optical_density_lut(Io)
    usable = np.zeros(b, np.bool_)
    n_tissue = np.zeros(b, np.int64)
    stains = np.zeros((b, 3, 2), np.float32)
    maxima = np.ones((b, 2), np.float32)
    arguments = (lut.numpy(), _tissue_level(lut, beta), float(alpha), int(max(min_tissue_pixels, 2)),
                 _concentration_rank(n_pixels))

    def kernel(start: int, stop: int, scratch: tuple[np.ndarray, ...]) -> None:
        _nb_estimate_patches(pixels[start:stop], usable[start:stop], n_tissue[start:stop], stains[start:stop],
                             maxima[start:stop], *arguments, *scratch)

    _run_in_chunks(b, n_pixels, torch.get_num_threads() if threads is None else threads, kernel)
    stains[~usable] = np.eye(3, 2, dtype=np.float32)  # as the torch path: a harmless stand-in when unusable
    maxima[~usable] = 1.0
    stains_t = torch.from_numpy(stains)
    stains64 = stains_t.double()
    pseudo_inverse = torch.linalg.pinv(stains64).to(torch.float32)
    return _StainEstimate(stains_t, pseudo_inverse, torch.from_numpy(maxima), torch.from_numpy(usable),
                          torch.from_numpy(n_tissue))


def _check_patches(patches: torch.Tensor) -> None:
    if not isinstance(patches, torch.Tensor):
        raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
    if patches.dtype != torch.uint8 or patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be uint8 (B, H, W, 3), got {patches.dtype} {tuple(patches.shape)}")


def macenko_normalize_batch(
    patches: torch.Tensor,
    reference: MacenkoReference | None = None,
    Io: float = 240,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_tissue_pixels: int = 100,
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
    (numba for CPU tensors when numba is installed, else torch). Both give the same fallback rules.
    `chunk_size` patches are processed at a time by the torch backend (default 8 on CPU, measured fastest with
    4-16; 256 on CUDA). `threads`: worker threads of the numba backend (default torch.get_num_threads()).
    `out`: an optional contiguous uint8 tensor of the same shape and device to write into (and return), so
    that a loop over batches reuses one buffer instead of faulting in fresh pages for every batch.
    """
    _check_patches(patches)
    if out is not None:
        _check_patches(out)
        if out.shape != patches.shape or out.device != patches.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of shape {tuple(patches.shape)} on {patches.device}, "
                             f"got {tuple(out.shape)} on {out.device} (contiguous: {out.is_contiguous()})")
        if out.data_ptr() == patches.data_ptr():
            raise ValueError("out must not be the input tensor (patches are read after outputs are written)")
    backend = _resolve_backend(backend, patches.device)
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
    tissue_level = _tissue_level(lut, beta)
    target_matrix = torch.as_tensor(reference.stain_matrix, dtype=torch.float32, device=device)
    target_max = torch.as_tensor(reference.max_concentrations, dtype=torch.float32, device=device)
    if backend == "numba":
        _macenko_numba(patches, out, fallback, lut, tissue_level, reference, Io, alpha, min_tissue_pixels,
                       torch.get_num_threads() if threads is None else threads)
        return out, fallback
    ws = _Workspace(min(chunk_size, patches.shape[0]), patches.shape[1] * patches.shape[2], device)
    with torch.no_grad():
        for start in range(0, patches.shape[0], chunk_size):
            stop = min(start + chunk_size, patches.shape[0])
            fallback[start:stop] = _macenko_chunk(patches[start:stop], out[start:stop], ws, lut, tissue_level,
                                                  target_matrix, target_max, Io, alpha, min_tissue_pixels)
    return out, fallback


def _estimate_all(patches: torch.Tensor, Io: float, alpha: float, beta: float,
                  min_tissue_pixels: int) -> tuple[_StainEstimate, torch.Tensor]:
    """Stain estimate of every patch of a (b, H, W, 3) uint8 batch (no skipping); returns it and the OD planes."""
    b, h, w, _ = patches.shape
    lut = optical_density_lut(Io, patches.device)
    tissue_level = _tissue_level(lut, beta)
    ws = _Workspace(b, h * w, patches.device)
    _, n_tissue = _load_planes(patches.contiguous(), ws, tissue_level)
    estimate = _estimate_stains(ws, b, lut, tissue_level, n_tissue, alpha, min_tissue_pixels)
    return estimate, ws.od


def _resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'numba' for CPU tensors when numba is installed, else 'torch'; checks the choice."""
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")
    if backend == "auto":
        return "numba" if NUMBA_AVAILABLE and device.type == "cpu" else "torch"
    if backend == "numba":
        if not NUMBA_AVAILABLE:
            raise RuntimeError("backend='numba' needs the numba package (pip install numba)")
        if device.type != "cpu":
            raise ValueError(f"backend='numba' runs on CPU tensors only, got device {device}")
    return backend


def fit_reference(image: np.ndarray, Io: float = 240, alpha: float = 1.0, beta: float = 0.15,
                  min_tissue_pixels: int = 100, backend: str = "auto") -> MacenkoReference:
    """Fit a MacenkoReference (stain vectors, 99th-percentile concentrations) to one uint8 HWC H&E image.

    `backend` as in `macenko_normalize_batch` ("auto": the numba kernel when installed, else torch).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"reference image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    patches = torch.from_numpy(np.array(image[..., :3], order="C"))[None]  # a writable copy
    backend = _resolve_backend(backend, patches.device)
    with torch.no_grad():
        if backend == "numba":
            estimate = _estimate_numba(patches, Io, alpha, beta, min_tissue_pixels, threads=1)
        else:
            estimate, _ = _estimate_all(patches, Io, alpha, beta, min_tissue_pixels)
    if not bool(estimate.usable[0]):
        n_tissue = int(estimate.n_tissue[0])
        if n_tissue < min_tissue_pixels:
            reason = (f"only {n_tissue} tissue pixels (optical density >= {beta} on every channel), need "
                      f"{min_tissue_pixels}: the image is mostly background")
        else:
            reason = (f"its {n_tissue} tissue pixels give a degenerate stain estimate (a singular or non-finite "
                      f"optical-density covariance or stain matrix): the image has no two distinct stains, e.g. "
                      f"a single colour, black or saturated regions")
        raise ValueError(f"cannot fit a Macenko reference: {reason}. Choose a well-stained H&E tissue region.")
    return MacenkoReference(estimate.stains[0].double().numpy(), estimate.max_concentrations[0].double().numpy())


class MacenkoNormalizer:
    """torchstain-style fit/normalize over numpy or torch, single (H, W, 3) or batched (B, H, W, 3) uint8."""

    def __init__(self, reference: MacenkoReference | None = None, Io: float = 240, alpha: float = 1.0,
                 beta: float = 0.15, min_tissue_pixels: int = 100, device: str | torch.device | None = None,
                 chunk_size: int | None = None, backend: str = "auto") -> None:
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


def stain_augment_batch(
    patches: torch.Tensor,
    generator: torch.Generator,
    sigma_scale: float = 0.2,
    sigma_shift: float = 0.05,
    sigma_stain: float = 0.0,
    reference: MacenkoReference | None = None,
    Io: float = 240,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_tissue_pixels: int = 100,
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
    _check_patches(patches)
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
        if _resolve_backend(backend, device) == "numba":
            estimate = _estimate_numba(patches, Io, alpha, beta, min_tissue_pixels)
            od = optical_density_lut(Io)[patches.reshape(b, h * w, 3).transpose(1, 2).long()]  # (b, 3, P)
        else:
            estimate, od = _estimate_all(patches, Io, alpha, beta, min_tissue_pixels)
        fallback_stains = torch.as_tensor(reference.stain_matrix, dtype=torch.float32, device=device)
        stains = torch.where(estimate.usable.view(b, 1, 1), estimate.stains, fallback_stains)
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


def plot_stain_qc(before: list[np.ndarray], after: list[np.ndarray], titles: list[str],
                  reference: MacenkoReference | None, out_png: str | os.PathLike) -> Path:
    """Before/after grid (one row per slide) plus swatches of each image's fitted stain vectors; saves a PNG."""
    from matplotlib.figure import Figure  # a bare Figure needs no pyplot backend (Agg when saving)

    if not (len(before) == len(after) == len(titles)) or not before:
        raise ValueError(f"need equally many before/after/titles (>= 1), got {len(before)}/{len(after)}/{len(titles)}")
    reference = MacenkoReference.default() if reference is None else reference

    def swatch(stain_matrix: np.ndarray) -> np.ndarray:
        # the colour of one unit of each stain: Io * exp(-v) per channel, shown as two blocks (H, E)
        colours = np.clip(np.exp(-np.asarray(stain_matrix).T), 0, 1)  # (2, 3)
        return np.repeat(np.repeat(colours[None], 20, axis=0), 20, axis=1)

    rows = len(before)
    figure = Figure(figsize=(12, 3 * (rows + 1)))
    axes = figure.subplots(rows + 1, 4, gridspec_kw={"width_ratios": [3, 3, 1.3, 1.3]}, squeeze=False)
    for row, (raw, normalized, title) in enumerate(zip(before, after, titles)):
        axes[row, 0].imshow(raw)
        axes[row, 0].set_title(f"{title}: before", fontsize=10)
        axes[row, 1].imshow(normalized)
        axes[row, 1].set_title(f"{title}: after", fontsize=10)
        for column, image, label in ((2, raw, "stains before"), (3, normalized, "stains after")):
            try:
                fitted = fit_reference(np.asarray(image)).stain_matrix
                axes[row, column].imshow(swatch(fitted))
                axes[row, column].set_title(f"{label}\nH | E", fontsize=9)
            except ValueError:
                axes[row, column].text(0.5, 0.5, "no tissue", ha="center", va="center")
    axes[rows, 0].imshow(swatch(reference.stain_matrix))
    axes[rows, 0].set_title("reference stain vectors: H | E", fontsize=10)
    matrix_text = "\n".join(
        f"{channel}: H {h:.3f}  E {e:.3f}" for channel, (h, e) in zip("RGB", reference.stain_matrix)
    )
    axes[rows, 1].text(0.02, 0.5, f"reference OD vectors\n{matrix_text}\nmax C: "
                       f"{reference.max_concentrations[0]:.3f}, {reference.max_concentrations[1]:.3f}",
                       family="monospace", fontsize=9, va="center")
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes[rows, 1:]:
        axis.axis("off")
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    figure.savefig(tmp, dpi=120)
    os.replace(tmp, out_png)
    return out_png
