"""Exact cosine kNN statistics for sampled query patches: same-slide and same-site fractions, kNN class votes.

Each kNN metric is a mean of per-query values in [0, 1] (the gap in [-1, 1]), so by Hoeffding's inequality for
sampling without replacement the query subsample moves it by at most sqrt(ln(2/0.05) / (2 m)) (twice that for
the gap) with probability 0.95 (`hoeffding_bound`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from exaonepath_core.evaluation.collapse.geometry import MAX_BLOCK_ENTRIES
from exaonepath_core.evaluation.collapse.names import UNLABELLED


def hoeffding_bound(n_queries: int, delta: float = 0.05, value_range: float = 1.0) -> float:
    """Half-width that a mean of `n_queries` sampled values in a range of `value_range` exceeds w.p. <= delta."""
    if n_queries <= 0:
        return math.inf
    return value_range * math.sqrt(math.log(2.0 / delta) / (2.0 * n_queries))



@dataclass
class NeighbourStatistics:
    """Per-query values of the kNN metrics (queries index the sorted-by-slide arrays)."""

    same_slide_fraction: np.ndarray | None = None
    same_site_fraction: np.ndarray | None = None  # among neighbours from other slides
    same_site_chance: np.ndarray | None = None
    loso_correct: np.ndarray | None = None  # leave-one-slide-out kNN class vote correct (1/0, NaN: no refs)
    within_correct: np.ndarray | None = None  # within-slide kNN class vote correct (1/0, NaN: no refs)


def _majority_vote(neighbour_labels: torch.Tensor, valid: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Uniform vote over valid neighbours; ties go to the smallest class code (as in sklearn)."""
    counts = torch.zeros(neighbour_labels.shape[0], n_classes, dtype=torch.float32)
    counts.scatter_add_(1, neighbour_labels.clamp(min=0), valid.to(torch.float32))
    return counts.argmax(1)


def _fraction_of_matches(match: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    n_valid = valid.sum(1).to(torch.float64)
    frac = (match & valid).sum(1).to(torch.float64) / n_valid.clamp(min=1)
    frac[n_valid == 0] = math.nan
    return frac.numpy()


def neighbour_statistics(
    unit: torch.Tensor, slide_codes: np.ndarray, k: int, slide_queries: np.ndarray,
    class_codes: np.ndarray | None = None, class_queries: np.ndarray | None = None,
    site_codes: np.ndarray | None = None,
) -> NeighbourStatistics:
    """Exact cosine kNN statistics for the given queries against all patches (arrays sorted by slide)."""
    n = unit.shape[0]
    slide_codes = np.asarray(slide_codes, dtype=np.int64)
    if np.any(np.diff(slide_codes) < 0):
        raise ValueError("neighbour_statistics expects patches sorted by slide")
    n_slides = int(slide_codes.max()) + 1
    slide_start = np.searchsorted(slide_codes, np.arange(n_slides), side="left")
    slide_end = np.searchsorted(slide_codes, np.arange(n_slides), side="right")
    slide_t = torch.from_numpy(slide_codes)
    site_t = torch.from_numpy(np.asarray(site_codes, dtype=np.int64)) if site_codes is not None else None
    class_t = torch.from_numpy(np.asarray(class_codes, dtype=np.int64)) if class_codes is not None else None
    labelled = class_codes is not None and class_queries is not None
    unlabelled_idx = torch.from_numpy(np.flatnonzero(class_codes == UNLABELLED)) if labelled else None
    n_classes = int(class_codes.max()) + 1 if labelled else 0

    slide_set = np.unique(slide_queries)
    class_set = np.unique(class_queries) if labelled else np.empty(0, np.int64)
    queries = np.union1d(slide_set, class_set)  # one similarity pass serves both query sets
    in_slide_set = np.isin(queries, slide_set)
    in_class_set = np.isin(queries, class_set)

    same_slide = np.full(queries.size, math.nan)
    same_site = np.full(queries.size, math.nan)
    loso_correct = np.full(queries.size, math.nan)
    kk = min(k, n - 1)
    rows = int(max(16, min(4096, MAX_BLOCK_ENTRIES // max(n, 1))))
    for start in range(0, queries.size, rows):
        q = queries[start : start + rows]
        q_t = torch.from_numpy(q)
        sims = unit[q_t] @ unit.T
        sims[torch.arange(q.size), q_t] = -math.inf  # a patch is not its own neighbour
        values, idx = sims.topk(kk, dim=1)
        valid = torch.isfinite(values)
        same_slide[start : start + q.size] = _fraction_of_matches(slide_t[idx] == slide_t[q_t][:, None], valid)
        # hide every query's own slide: the remaining neighbours come from other slides
        q_slides = slide_codes[q]
        bounds = np.flatnonzero(np.diff(q_slides)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, q.size]):
            s = q_slides[lo]
            sims[lo:hi, slide_start[s] : slide_end[s]] = -math.inf
        if site_t is not None:
            values, idx = sims.topk(kk, dim=1)
            valid = torch.isfinite(values)
            same_site[start : start + q.size] = _fraction_of_matches(site_t[idx] == site_t[q_t][:, None], valid)
        if labelled:
            sims.index_fill_(1, unlabelled_idx, -math.inf)
            values, idx = sims.topk(kk, dim=1)
            valid = torch.isfinite(values)
            vote = _majority_vote(class_t[idx], valid, n_classes)
            correct = (vote == class_t[q_t]).to(torch.float64).numpy()
            correct[~valid.any(1).numpy()] = math.nan
            loso_correct[start : start + q.size] = correct

    stats = NeighbourStatistics(same_slide_fraction=same_slide[in_slide_set])
    if site_t is not None:
        same_site_all = same_site[in_slide_set]
        stats.same_site_fraction = same_site_all
        # chance: a random patch from another slide is from the query's site
        site_np = site_t.numpy()
        slide_sizes = slide_end - slide_start
        site_sizes = np.bincount(site_np)
        qs = queries[in_slide_set]
        stats.same_site_chance = (site_sizes[site_np[qs]] - slide_sizes[slide_codes[qs]]) / np.maximum(
            n - slide_sizes[slide_codes[qs]], 1
        )
    if labelled:
        stats.loso_correct = loso_correct[in_class_set]
        stats.within_correct = _within_slide_knn_correct(
            unit, slide_codes, class_codes, queries[in_class_set], slide_start, slide_end, k, n_classes
        )
    return stats


def _within_slide_knn_correct(
    unit: torch.Tensor, slide_codes: np.ndarray, class_codes: np.ndarray, queries: np.ndarray,
    slide_start: np.ndarray, slide_end: np.ndarray, k: int, n_classes: int,
) -> np.ndarray:
    """kNN class vote among the labelled patches of the query's own slide (1/0; NaN when it has no others)."""
    correct = np.full(queries.size, math.nan)
    q_slides = slide_codes[queries]
    for s in np.unique(q_slides):
        ref = np.arange(slide_start[s], slide_end[s])
        ref = ref[class_codes[ref] != UNLABELLED]
        positions = np.flatnonzero(q_slides == s)
        kk = min(k, ref.size - 1)
        if kk < 1:
            continue
        ref_t = torch.from_numpy(ref)
        ref_labels = torch.from_numpy(class_codes[ref])
        rows = int(max(16, min(4096, MAX_BLOCK_ENTRIES // max(ref.size, 1))))
        for lo in range(0, positions.size, rows):
            pos = positions[lo : lo + rows]
            q = queries[pos]
            sims = unit[torch.from_numpy(q)] @ unit[ref_t].T
            sims[torch.arange(q.size), torch.from_numpy(np.searchsorted(ref, q))] = -math.inf
            values, idx = sims.topk(kk, dim=1)
            vote = _majority_vote(ref_labels[idx], torch.isfinite(values), n_classes)
            correct[pos] = (vote.numpy() == class_codes[q]).astype(np.float64)
    return correct
