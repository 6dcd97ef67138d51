"""Exact nearest-rank percentiles of many rows at once (torch, CPU and CUDA), as torchstain's kthvalue.

A histogram over a known value range, one cumulative sum, then an exact sort of only the few values in the
bin holding the rank: a per-row top-k or sort was the largest single cost of the batched Macenko estimate.
"""
from __future__ import annotations

import torch

ANGLE_BINS = 4096
CONCENTRATION_BINS = 4096


def nearest_rank(q: float, count: torch.Tensor) -> torch.Tensor:
    """1-based rank of the q-th percentile without interpolation: 1 + round(q/100 * (n - 1)), half to even."""
    return 1 + torch.round((0.01 * float(q)) * (count.to(torch.float64) - 1)).to(torch.int64)


def histogram_select(values: torch.Tensor, ranks: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bins: int,
                     valid: torch.Tensor | None = None,
                     scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Exact k-th smallest valid values per row of a (rows, n) float tensor, for (rows, t) 1-based ranks.

    Values are binned monotonically over [low, high] per row (values outside land in the end bins, so the
    range only affects speed, never the result), the bin holding each rank is found from cumulative counts,
    and only that bin's values are sorted. `valid` is a float 0/1 mask (rows, n); values must not be NaN.
    Ranks outside [1, valid count] give NaN. `scratch` lends two flat buffers (values' dtype and int32) of at
    least rows * n entries, so that a loop over chunks does not allocate them every call.
    """
    rows, n = values.shape
    device = values.device
    slots = bins + 1  # one extra bin per row collects the invalid entries, after all valid ones
    if scratch is None or scratch[0].numel() < rows * n:
        position = torch.empty(rows, n, dtype=values.dtype, device=device)
        binned = torch.empty(rows, n, dtype=torch.int32, device=device)
    else:
        position = scratch[0][: rows * n].view(rows, n)
        binned = scratch[1][: rows * n].view(rows, n)
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
    result = histogram_select(values, rank.unsqueeze(1), low, high, ANGLE_BINS, usable.to(values.dtype))
    result = result.squeeze(1)
    missing = (k < 1) | (k > n_valid)
    return result.masked_fill(missing, float("-inf") if largest else float("inf"))

