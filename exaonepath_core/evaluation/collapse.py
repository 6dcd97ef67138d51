"""WSI-specific feature-collapse metrics: how much of a feature space is slide (or site) identity.

Everything is computed on L2-normalised features with cosine similarity, so the metrics do not depend on
the feature scale of a backbone. Exactness and cost, for N patches of dimension D over S slides:

- silhouette (by slide, class, site): exact over all patches. With cosine distance d = 1 - x.y on unit
  vectors, the summed distance from x to a cluster c is n_c - x.sum_c, so per-cluster sums replace the
  N x N distance matrix (O(N D C) instead of O(N^2 D)).
- kNN metrics: exact neighbours (blocked torch matmul against all N patches) for a random set of at most
  `max_queries` query patches. Each kNN metric is a mean of per-query values in [0, 1] (the gap in
  [-1, 1]), so by Hoeffding's inequality for sampling without replacement the query subsample moves it
  by at most sqrt(ln(2/0.05) / (2 m)) (twice that for the gap) with probability 0.95; that bound is
  written into the metric's note. With N <= max_queries every patch is a query and the value is exact.
- linear probes: multinomial logistic regression (L-BFGS, sklearn's L2 objective with C=1) on z-scored
  features projected to at most `probe_dim` principal components of the training split, trained on at
  most `probe_max_train` patches.
- 95% intervals: percentile bootstrap over slides (slides resampled with replacement, the same draws for
  every metric), applied to the per-patch values of the fitted probe / fixed neighbour graph; neither the
  probe nor the neighbour graph is refitted per draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

# Metric names (rows of the table collapse_metrics returns).
SLIDE_PROBE = "slide_id_probe_accuracy"
SLIDE_PROBE_OVER_CHANCE = "slide_id_probe_accuracy_over_chance"
SAME_SLIDE_NEIGHBOURS = "same_slide_neighbour_fraction"
SILHOUETTE_SLIDE = "silhouette_slide"
SILHOUETTE_CLASS = "silhouette_class"
KNN_WITHIN_SLIDE = "knn_class_accuracy_within_slide"
KNN_LEAVE_ONE_SLIDE_OUT = "knn_class_accuracy_leave_one_slide_out"
KNN_GAP = "knn_class_accuracy_gap"
SITE_PROBE = "site_id_probe_accuracy"
SITE_PROBE_OVER_CHANCE = "site_id_probe_accuracy_over_chance"
SAME_SITE_NEIGHBOURS = "same_site_neighbour_fraction"
SILHOUETTE_SITE = "silhouette_site"

SLIDE_METRICS = (SLIDE_PROBE, SLIDE_PROBE_OVER_CHANCE, SAME_SLIDE_NEIGHBOURS, SILHOUETTE_SLIDE)
CLASS_METRICS = (SILHOUETTE_CLASS, KNN_WITHIN_SLIDE, KNN_LEAVE_ONE_SLIDE_OUT, KNN_GAP)
SITE_METRICS = (SITE_PROBE, SITE_PROBE_OVER_CHANCE, SAME_SITE_NEIGHBOURS, SILHOUETTE_SITE)
ALL_METRICS = SLIDE_METRICS + CLASS_METRICS + SITE_METRICS
TABLE_COLUMNS = ("metric", "value", "ci_low", "ci_high", "chance", "n", "note")

UNLABELLED = -1
# Similarity blocks are capped at this many float32 entries (256 MiB) to bound memory.
_MAX_BLOCK_ENTRIES = 1 << 26


def hoeffding_bound(n_queries: int, delta: float = 0.05, value_range: float = 1.0) -> float:
    """Half-width that a mean of `n_queries` sampled values in a range of `value_range` exceeds w.p. <= delta."""
    if n_queries <= 0:
        return math.inf
    return value_range * math.sqrt(math.log(2.0 / delta) / (2.0 * n_queries))


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
    rows = int(max(64, _MAX_BLOCK_ENTRIES // (4 * max(offsets[-1], dim))))
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


def slide_stratified_split(
    slide_codes: np.ndarray, test_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Split patches within every slide into train/test; returns (train_idx, test_idx, n_train_only_slides).

    Every slide with >= 2 patches puts round(test_fraction * n) (at least 1, at most n - 1) patches into the
    test split; single-patch slides go to train only and are counted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    codes = np.asarray(slide_codes)
    rng = np.random.default_rng(seed)
    train, test, n_train_only = [], [], 0
    for code in np.unique(codes):
        members = rng.permutation(np.flatnonzero(codes == code))
        if members.size < 2:
            train.append(members)
            n_train_only += 1
            continue
        n_test = min(max(1, round(test_fraction * members.size)), members.size - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
        n_train_only,
    )


def grouped_site_split(
    slide_codes: np.ndarray, site_codes: np.ndarray, test_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Split whole slides into train/test within every site; returns (train_idx, test_idx, n_train_only_sites).

    Held-out slides make the site probe measure a lab signature that generalises to unseen slides, not
    slide memorisation. Sites with a single slide go to train only and are counted.
    """
    slide_codes, site_codes = np.asarray(slide_codes), np.asarray(site_codes)
    rng = np.random.default_rng(seed)
    test_slides, n_train_only = [], 0
    for site in np.unique(site_codes):
        slides = rng.permutation(np.unique(slide_codes[site_codes == site]))
        if slides.size < 2:
            n_train_only += 1
            continue
        n_test = min(max(1, round(test_fraction * slides.size)), slides.size - 1)
        test_slides.append(slides[:n_test])
    is_test = np.isin(slide_codes, np.concatenate(test_slides)) if test_slides else np.zeros(len(slide_codes), bool)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test), n_train_only


def fit_softmax_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, n_classes: int, inverse_regularization: float = 1.0,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS with sklearn's objective C*sum(loss) + |W|^2/2; returns (W, b)."""
    n, d = x_train.shape
    weight = torch.zeros(d, n_classes, dtype=x_train.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x_train.dtype, requires_grad=True)
    l2 = 1.0 / (inverse_regularization * n)  # the objective divided by C*n: mean loss + l2/2 |W|^2
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=1e-7,
        tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe_predictions(
    features: np.ndarray | torch.Tensor, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
    probe_dim: int | None = 128, inverse_regularization: float = 1.0, max_iter: int = 300,
) -> np.ndarray:
    """Fit a softmax probe on z-scored (then PCA-reduced to probe_dim) train features; predict the test codes."""
    x = torch.as_tensor(features)
    labels = np.asarray(labels, dtype=np.int64)
    x_train = x[torch.from_numpy(train_idx)].to(torch.float32)
    mean = x_train.mean(0, dtype=torch.float64)
    # sklearn StandardScaler: population std
    std = ((x_train.to(torch.float64) - mean) ** 2).mean(0).sqrt().clamp(min=1e-8)
    scale = (1.0 / std).to(torch.float32)
    x_train = (x_train - mean.to(torch.float32)) * scale
    projection = None
    if probe_dim is not None and probe_dim < x_train.shape[1]:
        # eigh of the D x D covariance: exact PCA without an N x D SVD
        covariance = (x_train.T @ x_train).to(torch.float64) / max(1, x_train.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(covariance)
        projection = eigvecs[:, torch.argsort(eigvals, descending=True)[:probe_dim]].to(torch.float32)
        x_train = x_train @ projection
    x_test = (x[torch.from_numpy(test_idx)].to(torch.float32) - mean.to(torch.float32)) * scale
    if projection is not None:
        x_test = x_test @ projection
    n_classes = int(labels.max()) + 1
    weight, bias = fit_softmax_probe(
        x_train, torch.from_numpy(labels[train_idx]), n_classes, inverse_regularization, max_iter
    )
    return (x_test @ weight + bias).argmax(1).numpy()


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
    rows = int(max(16, min(4096, _MAX_BLOCK_ENTRIES // max(n, 1))))
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
        rows = int(max(16, min(4096, _MAX_BLOCK_ENTRIES // max(ref.size, 1))))
        for lo in range(0, positions.size, rows):
            pos = positions[lo : lo + rows]
            q = queries[pos]
            sims = unit[torch.from_numpy(q)] @ unit[ref_t].T
            sims[torch.arange(q.size), torch.from_numpy(np.searchsorted(ref, q))] = -math.inf
            values, idx = sims.topk(kk, dim=1)
            vote = _majority_vote(ref_labels[idx], torch.isfinite(values), n_classes)
            correct[pos] = (vote.numpy() == class_codes[q]).astype(np.float64)
    return correct


class _SlideBootstrap:
    """Percentile intervals of per-patch means with slides resampled with replacement (same draws for all)."""

    def __init__(self, n_slides: int, n_boot: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n_slides, size=(n_boot, n_slides))
        self.weights = np.zeros((n_boot, n_slides))
        np.add.at(self.weights, (np.repeat(np.arange(n_boot), n_slides), draws.ravel()), 1.0)
        self.n_slides = n_slides

    def interval(self, values: np.ndarray, slide_codes: np.ndarray) -> tuple[float, float]:
        """95% percentile interval of mean(values) over slide-resampled draws (NaN values are ignored)."""
        if self.weights.shape[0] == 0:
            return math.nan, math.nan
        keep = np.isfinite(values)
        sums = np.bincount(slide_codes[keep], weights=values[keep], minlength=self.n_slides)
        counts = np.bincount(slide_codes[keep], minlength=self.n_slides).astype(np.float64)
        totals = self.weights @ counts
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (self.weights @ sums) / totals
        means = means[totals > 0]
        if means.size == 0:
            return math.nan, math.nan
        low, high = np.percentile(means, [2.5, 97.5])
        return float(low), float(high)


def _codes(values: np.ndarray | list, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like features' first axis, got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN/inf")
    uniques, codes = np.unique(arr.astype(str) if arr.dtype == object else arr, return_inverse=True)
    return uniques, codes.astype(np.int64)


def collapse_metrics(
    features: np.ndarray | torch.Tensor,
    slide_ids: np.ndarray | list,
    class_labels: np.ndarray | list | None = None,
    site_ids: np.ndarray | list | None = None,
    k: int = 20,
    n_boot: int = 200,
    seed: int = 0,
    max_samples: int | None = None,
    *,
    max_queries: int | None = 5000,
    probe_dim: int | None = 128,
    probe_max_train: int | None = 20000,
    test_fraction: float = 0.3,
) -> pd.DataFrame:
    """WSI-collapse metrics of features (N, D) with slide ids; long table: metric, value, ci_low, ci_high, chance, n, note.

    `class_labels` (ints, -1 = unlabelled) enables the class metrics, `site_ids` the per-site ones; rows of
    skipped metrics are kept with value NaN and the reason in `note`.
    """
    x = torch.as_tensor(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty 2-D array (N, D), got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    n_total = x.shape[0]
    _, slide_codes = _codes(slide_ids, "slide_ids", n_total)
    class_codes = None
    if class_labels is not None:
        raw_labels = np.asarray(class_labels)
        if raw_labels.shape != (n_total,):
            raise ValueError(f"class_labels must have shape ({n_total},), got {raw_labels.shape}")
        if raw_labels.dtype.kind not in "iu":
            if raw_labels.dtype.kind == "f" and np.all(np.isfinite(raw_labels)) and np.all(raw_labels % 1 == 0):
                raw_labels = raw_labels.astype(np.int64)
            else:
                raise ValueError(f"class_labels must be integers (-1 = unlabelled), got dtype {raw_labels.dtype}")
        if np.any(raw_labels < UNLABELLED):
            raise ValueError(f"class_labels must be >= 0 or -1 (unlabelled); found {int(raw_labels.min())}")
        class_codes = raw_labels.astype(np.int64)
    site_codes = None
    if site_ids is not None:
        _, site_codes = _codes(site_ids, "site_ids", n_total)
        per_slide_sites = pd.Series(site_codes).groupby(slide_codes).nunique()
        if (per_slide_sites > 1).any():
            raise ValueError(f"{int((per_slide_sites > 1).sum())} slides have patches from more than one site")

    notes_common: list[str] = []
    rng = np.random.default_rng(seed)
    keep = np.arange(n_total)
    if max_samples is not None and n_total > max_samples:
        keep = np.sort(rng.choice(n_total, size=max_samples, replace=False))
        notes_common.append(f"uniform random subsample of {max_samples} of {n_total} patches")
    # sort by slide so that a slide is a contiguous block (cheap masking of a query's own slide)
    keep = keep[np.argsort(slide_codes[keep], kind="stable")]
    unit = l2_normalized(x[torch.from_numpy(keep)])
    _, slide_codes = np.unique(slide_codes[keep], return_inverse=True)
    n = keep.size
    n_slides = int(slide_codes.max()) + 1
    if n_slides < 2:
        raise ValueError(f"collapse metrics need patches from at least 2 slides, got {n_slides}")
    if site_codes is not None:
        _, site_codes = np.unique(site_codes[keep], return_inverse=True)
    n_unlabelled = 0
    if class_codes is not None:
        class_codes = class_codes[keep]
        n_unlabelled = int((class_codes == UNLABELLED).sum())
        labelled_values = np.unique(class_codes[class_codes != UNLABELLED])
        # compact codes keep the vote tables small; order is preserved so ties still go to the smallest label
        remap = np.full(int(class_codes.max()) + 2, UNLABELLED, dtype=np.int64)
        remap[labelled_values] = np.arange(labelled_values.size)
        class_codes = np.where(class_codes == UNLABELLED, UNLABELLED, remap[np.maximum(class_codes, 0)])

    boot = _SlideBootstrap(n_slides, n_boot, seed + 1)
    rows: list[dict] = []

    def add(metric: str, values: np.ndarray, codes: np.ndarray, chance: float, note: str,
            scale: float = 1.0) -> None:
        finite = np.isfinite(values)
        value = float(values[finite].mean()) if finite.any() else math.nan
        low, high = boot.interval(values, codes)
        rows.append({"metric": metric, "value": value / scale, "ci_low": low / scale, "ci_high": high / scale,
                         "chance": chance, "n": int(finite.sum()),
                         "note": "; ".join([*notes_common, note] if note else notes_common)})

    def skip(metric: str, reason: str) -> None:
        rows.append({"metric": metric, "value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "chance": math.nan,
                         "n": 0, "note": "; ".join([*notes_common, f"skipped: {reason}"])})

    # ---- slide-ID linear probe (held-out patches within slides) ----
    train_idx, test_idx, n_single = slide_stratified_split(slide_codes, test_fraction, seed)
    train_note = ""
    if probe_max_train is not None and train_idx.size > probe_max_train:
        train_idx = np.sort(rng.choice(train_idx, size=probe_max_train, replace=False))
        train_note = f"; probe trained on a random {probe_max_train} of the train patches"
    dim_note = f"top-{probe_dim} PCs of z-scored features" if probe_dim and probe_dim < unit.shape[1] else "z-scored features"
    predicted = linear_probe_predictions(unit, slide_codes, train_idx, test_idx, probe_dim)
    correct = (predicted == slide_codes[test_idx]).astype(np.float64)
    majority = np.bincount(slide_codes[test_idx]).max() / test_idx.size
    chance = max(1.0 / n_slides, float(majority))
    probe_note = (f"softmax probe on {dim_note}, within-slide split {1 - test_fraction:.0%}/{test_fraction:.0%}"
                  f"{train_note}; {n_single} single-patch slides train-only; chance = max(1/n_slides, majority rate)")
    add(SLIDE_PROBE, correct, slide_codes[test_idx], chance, probe_note)
    add(SLIDE_PROBE_OVER_CHANCE, correct, slide_codes[test_idx], 1.0, probe_note, scale=chance)

    # ---- neighbours ----
    def draw_queries(pool: np.ndarray) -> np.ndarray:
        if max_queries is None or pool.size <= max_queries:
            return pool
        return np.sort(np.random.default_rng(seed + 2).choice(pool, size=max_queries, replace=False))

    slide_queries = draw_queries(np.arange(n))
    labelled_pool = np.flatnonzero(class_codes != UNLABELLED) if class_codes is not None else np.empty(0, int)
    has_classes = class_codes is not None and labelled_pool.size > 0 and np.unique(class_codes[labelled_pool]).size >= 2
    class_queries = (slide_queries if labelled_pool.size == n else draw_queries(labelled_pool)) if has_classes else None
    stats = neighbour_statistics(
        unit, slide_codes, k, slide_queries,
        class_codes=class_codes if has_classes else None, class_queries=class_queries, site_codes=site_codes,
    )

    def query_note(m: int, total: int, value_range: float = 1.0) -> str:
        if m >= total:
            return f"exact cosine kNN, k={k}, all {total} patches as queries"
        return (f"exact cosine kNN, k={k}, {m} random queries of {total}; query-sampling error <= "
                f"{hoeffding_bound(m, 0.05, value_range):.3f} w.p. 0.95 (Hoeffding)")

    slide_sizes = np.bincount(slide_codes)
    same_slide_chance = float(np.mean((slide_sizes[slide_codes[slide_queries]] - 1) / max(n - 1, 1)))
    add(SAME_SLIDE_NEIGHBOURS, stats.same_slide_fraction, slide_codes[slide_queries], same_slide_chance,
        query_note(slide_queries.size, n) + "; chance = expected fraction for random neighbours")
    n_sites = int(site_codes.max()) + 1 if site_codes is not None else 0
    labellings = [slide_codes]
    if has_classes:
        labellings.append(class_codes)
    if n_sites >= 2:
        labellings.append(site_codes)
    silhouettes = cosine_silhouettes(unit, labellings)
    add(SILHOUETTE_SLIDE, silhouettes[0], slide_codes, 0.0, f"exact cosine silhouette over all {n} patches")

    # ---- class metrics ----
    if class_codes is None:
        for metric in CLASS_METRICS:
            skip(metric, "no class labels given")
    elif not has_classes:
        for metric in CLASS_METRICS:
            skip(metric, f"fewer than 2 labelled classes ({n_unlabelled} unlabelled patches)")
    else:
        unl = f"{n_unlabelled} unlabelled patches excluded" if n_unlabelled else "all patches labelled"
        lab = labelled_pool
        add(SILHOUETTE_CLASS, silhouettes[1], slide_codes, 0.0, f"exact cosine silhouette over {lab.size} labelled patches; {unl}")
        paired = np.isfinite(stats.within_correct) & np.isfinite(stats.loso_correct)
        n_unpaired = int((~paired).sum())
        qn = query_note(class_queries.size, lab.size)
        pair_note = (f"{qn}; {unl}; {n_unpaired} queries without a labelled neighbour in their own or in "
                     "other slides excluded")
        q_slides = slide_codes[class_queries][paired]
        majority_class = np.bincount(class_codes[class_queries][paired]).max() / max(paired.sum(), 1)
        add(KNN_WITHIN_SLIDE, stats.within_correct[paired], q_slides, float(majority_class),
            pair_note + "; chance = majority class rate")
        add(KNN_LEAVE_ONE_SLIDE_OUT, stats.loso_correct[paired], q_slides, float(majority_class),
            pair_note + "; chance = majority class rate")
        add(KNN_GAP, stats.within_correct[paired] - stats.loso_correct[paired], q_slides, 0.0,
            f"within-slide minus leave-one-slide-out accuracy (paired); "
            f"{query_note(class_queries.size, lab.size, 2.0)}; {unl}; {n_unpaired} unpaired queries excluded")

    # ---- site metrics ----
    if site_codes is None or n_sites < 2:
        reason = "no site ids given" if site_codes is None else "fewer than 2 sites"
        for metric in SITE_METRICS:
            skip(metric, reason)
    else:
        s_train, s_test, n_single_site = grouped_site_split(slide_codes, site_codes, test_fraction, seed)
        if s_test.size == 0:
            skip(SITE_PROBE, "no site has 2 or more slides (site probe needs held-out slides)")
            skip(SITE_PROBE_OVER_CHANCE, "no site has 2 or more slides (site probe needs held-out slides)")
        else:
            site_train_note = ""
            if probe_max_train is not None and s_train.size > probe_max_train:
                s_train = np.sort(rng.choice(s_train, size=probe_max_train, replace=False))
                site_train_note = f"; probe trained on a random {probe_max_train} of the train patches"
            predicted = linear_probe_predictions(unit, site_codes, s_train, s_test, probe_dim)
            correct = (predicted == site_codes[s_test]).astype(np.float64)
            chance = max(1.0 / n_sites, float(np.bincount(site_codes[s_test]).max() / s_test.size))
            note = (f"softmax probe on {dim_note}, held-out slides within each site{site_train_note}; "
                    f"{n_single_site} single-slide sites train-only; chance = max(1/n_sites, majority rate)")
            add(SITE_PROBE, correct, slide_codes[s_test], chance, note)
            add(SITE_PROBE_OVER_CHANCE, correct, slide_codes[s_test], 1.0, note, scale=chance)
        add(SAME_SITE_NEIGHBOURS, stats.same_site_fraction, slide_codes[slide_queries],
            float(np.nanmean(stats.same_site_chance)),
            "among the k nearest neighbours from other slides; " + query_note(slide_queries.size, n)
            + "; chance = expected fraction for random other-slide neighbours")
        add(SILHOUETTE_SITE, silhouettes[-1], slide_codes, 0.0,
            f"exact cosine silhouette over all {n} patches")

    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    order = {m: i for i, m in enumerate(ALL_METRICS)}
    return table.sort_values("metric", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
