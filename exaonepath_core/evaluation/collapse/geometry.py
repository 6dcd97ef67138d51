"""Cosine geometry of a feature space: L2-normalised rows and exact per-patch cosine silhouettes.

With cosine distance d = 1 - x.y on unit vectors, the summed distance from x to a cluster c is n_c - x.sum_c,
so per-cluster sums replace the N x N distance matrix (O(N D C) instead of O(N^2 D)).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Similarity blocks (here and in the kNN search) are capped at this many float32 entries (256 MiB) to bound memory.
MAX_BLOCK_ENTRIES = 1 << 26


def l2_normalized(features: np.ndarray | torch.Tensor, block_rows: int = 16384) -> torch.Tensor:
    """Rows of `features` scaled to unit L2 norm as float32; rejects non-finite values and zero rows."""
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=torch.float32)
    n_bad_rows, n_zero_rows = 0, 0
    for start in range(0, x.shape[0], block_rows):
        block = x[start : start + block_rows].to(torch.float32)
        n_bad_rows += int((~torch.isfinite(block)).any(dim=1).sum())
        norms = block.norm(dim=1, keepdim=True)
        n_zero_rows += int((norms == 0).sum())
        torch.div(block, norms, out=out[start : start + block_rows])
    if n_bad_rows or n_zero_rows:
        raise ValueError(
            f"features have {n_bad_rows} rows with NaN/inf and {n_zero_rows} all-zero rows; cosine metrics "
            "need finite, non-zero feature vectors (fix the extraction or drop those patches upstream)"
        )
    return out


def cosine_silhouettes(unit_features: torch.Tensor, labellings: list[np.ndarray]) -> list[np.ndarray]:
    """Exact per-patch cosine silhouettes for several labellings in one pass (code -1: not in that labelling).

    sklearn's conventions: 0 for a patch in a singleton cluster; excluded patches get NaN.
    """
    n, dim = unit_features.shape
    blocks, offsets, sizes_all = [], [0], []
    for codes in labellings:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape != (n,):
            raise ValueError(f"cluster codes must have shape ({n},), got {codes.shape}")
        n_clusters = int(codes.max()) + 1 if n else 0
        sizes = np.bincount(codes[codes >= 0], minlength=n_clusters).astype(np.float64)
        if np.count_nonzero(sizes) < 2:
            raise ValueError("silhouette needs at least 2 clusters")
        blocks.append(codes)
        sizes_all.append(sizes)
        offsets.append(offsets[-1] + n_clusters)
    # all labellings' cluster sums side by side: one (block x D) @ (D x sum C) matmul per row block
    sums = torch.zeros(offsets[-1], dim, dtype=torch.float64)
    global_codes = [np.where(c >= 0, c + off, -1) for c, off in zip(blocks, offsets)]
    rows = int(max(64, MAX_BLOCK_ENTRIES // (4 * max(offsets[-1], dim))))
    for start in range(0, n, rows):
        chunk = unit_features[start : start + rows].to(torch.float64)
        for codes in global_codes:
            part = torch.from_numpy(codes[start : start + rows])
            member = part >= 0
            sums.index_add_(0, part[member], chunk[member])
    # float32 matmul: the sums are exact (float64); the products' rounding (~1e-6 of n_c) is far below
    # the silhouette's resolution
    sums32 = sums.to(torch.float32)
    results = [np.full(n, math.nan) for _ in labellings]
    for start in range(0, n, rows):
        x = unit_features[start : start + rows]
        dots = (x @ sums32.T).to(torch.float64)
        self_distance = (1.0 - (x.to(torch.float64) ** 2).sum(1))
        for i, codes in enumerate(blocks):
            own = torch.from_numpy(codes[start : start + rows])
            member = own >= 0
            if not bool(member.any()):
                continue
            sizes_t = torch.from_numpy(sizes_all[i])
            own_m = own[member]
            # summed cosine distance to every cluster; the own cluster's sum includes d(x, x) = 1 - |x|^2
            summed = sizes_t[None, :] - dots[member][:, offsets[i] : offsets[i + 1]]
            own_size = sizes_t[own_m]
            own_sum = summed.gather(1, own_m[:, None]).squeeze(1) - self_distance[member]
            a = own_sum / (own_size - 1).clamp(min=1)
            mean_other = summed / sizes_t.clamp(min=1)[None, :]
            mean_other[:, sizes_t == 0] = math.inf
            mean_other.scatter_(1, own_m[:, None], math.inf)
            b = mean_other.min(dim=1).values
            s = (b - a) / torch.maximum(a, b).clamp(min=1e-12)
            s[own_size <= 1] = 0.0
            out = results[i][start : start + rows]
            out[member.numpy()] = s.numpy()
    return results


def cosine_silhouette_samples(unit_features: torch.Tensor, cluster_codes: np.ndarray) -> np.ndarray:
    """Exact per-patch silhouette with cosine distance (sklearn's convention: 0 for singleton clusters)."""
    return cosine_silhouettes(unit_features, [cluster_codes])[0]
