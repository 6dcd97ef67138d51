"""The fused CPU path's numba kernels: the same Macenko estimate as `batched`, in about four passes per patch.

Per patch: (1) uint8 -> OD by table, tissue mask, count, sums and second moments in one pass; (2) 3x3 eigh,
projection of the tissue pixels on the stain plane and exact nearest-rank angle percentiles; (3) the 2x2
pseudo-inverse concentrations of every pixel and their exact 99th percentiles; (4) the output, where
Io * exp(-M @ od) = prod_j exp(-M[c, j] * od_j) comes from three 256-entry tables per channel (no exp per
pixel). Percentiles are exact order statistics: a histogram over the observed range, then a sort of only
the bin that holds the rank. Angles are ordered by a cheap monotone pseudo-angle (one division instead of
an atan2 per pixel); atan2 runs on the selected pixel only, so the result is the nearest-rank angle.
The order statistics are `percentile_kernels`. Kernels run with the GIL released; `fused` hands them slices
of patches from several threads. The entry points are `normalize_patches` and `estimate_patches`.
"""
from __future__ import annotations

import numpy as np

from exaonepath_core.data.stain.percentile_kernels import (
    nb_kth_gathered,
    nb_nearest_rank,
    nb_sample_threshold,
    nb_select_two,
    njit,
)


@njit
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


@njit
def _nb_tissue_projection(pixels, p, lut, e1, e2):
    """float32 coordinates (x, y) of pixel p's OD in the stain plane, as the torch path's float32 bmm.

    e1, e2 are tuples of float32 scalars: values, so the compiler keeps them in registers across stores.
    """
    o0 = lut[pixels[p, 0]]
    o1 = lut[pixels[p, 1]]
    o2 = lut[pixels[p, 2]]
    return e1[0] * o0 + e1[1] * o1 + e1[2] * o2, e2[0] * o0 + e2[1] * o1 + e2[2] * o2


@njit
def _nb_cross_product_tails(pixels, lut, e1, e2, tissue_index, n, x_low, y_low, x_high, y_high, candidate_values,
                            candidate_index):
    """The tissue pixels at or beyond the two bounds' angles, ordered by cross products (no division).

    Returns (ok, n_low, n_high): the first n_low entries of the candidates (positions and pseudo-angle keys)
    hold the pixels at or below the low bound, the n_high from the middle on those at or above the high one.
    Not ok (and the candidates unusable) as soon as one pixel is not in the lower half plane (y < 0).
    """
    half = candidate_values.shape[0] // 2
    n_low = 0
    n_high = 0
    for i in range(n):
        x, y = _nb_tissue_projection(pixels, tissue_index[i], lut, e1, e2)
        x = np.float64(x)
        y = np.float64(y)
        if not y < 0.0:
            return False, n_low, n_high
        # store always, keep by advancing the count (no branch to mispredict); keys come after
        candidate_index[n_low] = i
        n_low += x * y_low - y * x_low >= 0.0  # angle <= the low bound's angle
        candidate_index[half + n_high] = i
        n_high += x_high * y - y_high * x >= 0.0  # angle >= the high bound's angle
    for j in range(n_low):
        x, y = _nb_tissue_projection(pixels, tissue_index[candidate_index[j]], lut, e1, e2)
        candidate_values[j] = _nb_pseudo_angle(np.float64(x), np.float64(y))
    for j in range(half, half + n_high):
        x, y = _nb_tissue_projection(pixels, tissue_index[candidate_index[j]], lut, e1, e2)
        candidate_values[j] = _nb_pseudo_angle(np.float64(x), np.float64(y))
    return True, n_low, n_high


@njit
def _nb_key_tails(pixels, lut, e1, e2, tissue_index, n, low_key, high_key, candidate_values, candidate_index):
    """As `_nb_cross_product_tails`, by comparing every pixel's pseudo-angle key with the bounds' keys."""
    half = candidate_values.shape[0] // 2
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
    return n_low, n_high


@njit
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
    low_key = nb_sample_threshold(sample, count, rank_low / n, False)
    high_key = nb_sample_threshold(sample, count, (n - rank_high + 1) / n, True)
    low_at = high_at = 0
    for j in range(count):
        if sample[j] == low_key:
            low_at = int(sample[half + j])
        if sample[j] == high_key:
            high_at = int(sample[half + j])
    x_low, y_low = _nb_tissue_projection(pixels, tissue_index[low_at], lut, e1, e2)
    x_high, y_high = _nb_tissue_projection(pixels, tissue_index[high_at], lut, e1, e2)
    x_low, y_low, x_high, y_high = np.float64(x_low), np.float64(y_low), np.float64(x_high), np.float64(y_high)
    n_low = n_high = 0
    lower_half_plane = y_low < 0.0 and y_high < 0.0
    if lower_half_plane:
        lower_half_plane, n_low, n_high = _nb_cross_product_tails(pixels, lut, e1, e2, tissue_index, n, x_low, y_low,
                                                                  x_high, y_high, candidate_values, candidate_index)
    if not lower_half_plane:
        n_low, n_high = _nb_key_tails(pixels, lut, e1, e2, tissue_index, n, low_key, high_key, candidate_values,
                                      candidate_index)
    below_high = n - n_high  # angles below the high bound
    if n_low >= rank_low and below_high < rank_high:
        pick_low = nb_kth_gathered(candidate_values, candidate_index, n_low, rank_low)
        pick_high = nb_kth_gathered(candidate_values[half:], candidate_index[half:], n_high,
                                     rank_high - below_high)
        return pick_low, pick_high
    low = np.inf
    high = -np.inf
    for i in range(n):
        x, y = _nb_tissue_projection(pixels, tissue_index[i], lut, e1, e2)
        keys[i] = _nb_pseudo_angle(np.float64(x), np.float64(y))
        low = min(low, keys[i])
        high = max(high, keys[i])
    return nb_select_two(keys, n, rank_low, rank_high, low, high, angle_hist, candidate_values,
                          candidate_index)


@njit
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
    limit_h = np.float32(nb_sample_threshold(sample, count, above, True))
    limit_e = np.float32(nb_sample_threshold(sample[half:], count, above, True))
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
        pick, _ = nb_select_two(row, n_pixels, rank, rank, low_s, high_s, concentration_hist,
                                 candidate_values, candidate_index)
        maxima[stain] = row[pick]
    return maxima


@njit
def _nb_tissue_covariance(pixels, lut, tissue_level, tissue_index, covariance):
    """Count of the tissue pixels of a (P, 3) uint8 patch (OD >= beta on every channel: all levels <=
    tissue_level), their positions into tissue_index, and, when there are two or more, the unbiased covariance
    of their OD (as torchstain's cov, float64 accumulation) into the (3, 3) covariance."""
    n_pixels = pixels.shape[0]
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
    if n < 2:
        return n
    count = np.float64(n)
    sums = (s0, s1, s2)
    products = ((p00, p01, p02), (p01, p11, p12), (p02, p12, p22))
    for i in range(3):
        for j in range(3):
            covariance[i, j] = (products[i][j] - sums[i] * sums[j] / count) / (count - 1.0)
    return n


@njit
def _nb_pseudo_inverse(stains, inverse):
    """The least-squares pseudo-inverse (2, 3) of the (3, 2) float32 stains into inverse (float32, closed-form
    2x2 inverse in float64); False where the stains are (nearly) parallel."""
    f32 = np.float32
    s64 = stains.astype(np.float64)
    g00 = s64[0, 0] * s64[0, 0] + s64[1, 0] * s64[1, 0] + s64[2, 0] * s64[2, 0]
    g01 = s64[0, 0] * s64[0, 1] + s64[1, 0] * s64[1, 1] + s64[2, 0] * s64[2, 1]
    g11 = s64[0, 1] * s64[0, 1] + s64[1, 1] * s64[1, 1] + s64[2, 1] * s64[2, 1]
    determinant = g00 * g11 - g01 * g01
    if not determinant > 1e-10:
        return False
    for k in range(3):
        inverse[0, k] = f32((g11 / determinant) * s64[k, 0] + (-g01 / determinant) * s64[k, 1])
        inverse[1, k] = f32((-g01 / determinant) * s64[k, 0] + (g00 / determinant) * s64[k, 1])
    return True


@njit
def _nb_estimate_patch(pixels, lut, tissue_level, alpha, min_tissue, concentration_rank, angle_hist,
                       concentration_hist, tissue_index, keys, concentrations, sample, candidate_values,
                       candidate_index, stains, inverse, maxima):
    """Macenko estimate of one (P, 3) uint8 patch; returns (usable, n_tissue).

    Fills stains (3, 2: H, E OD unit columns), inverse (2, 3: their least-squares pseudo-inverse) and
    maxima (2: 99th-percentile concentrations), all float32, when usable. Scratch buffers are lent.
    """
    # (1) tissue mask, count and covariance of the tissue OD; (2) stain plane: its leading eigenvectors, eigh
    # in float32 like the torch path so both use LAPACK's float32 conventions
    covariance = np.empty((3, 3), np.float64)
    n = _nb_tissue_covariance(pixels, lut, tissue_level, tissue_index, covariance)
    if n < max(min_tissue, 2):
        return False, n
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
    pick_min, pick_max = _nb_angle_extremes(pixels, lut, plane_1, plane_2, tissue_index, n, nb_nearest_rank(alpha, n),
                                            nb_nearest_rank(100.0 - alpha, n), sample, keys, candidate_values,
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
    # (3) least-squares concentrations of every pixel
    if not _nb_pseudo_inverse(stains, inverse):
        return False, n
    maxima[:] = _nb_concentration_maxima(pixels, lut, inverse, concentration_rank, sample, concentrations,
                                         candidate_values, candidate_index, concentration_hist)
    if not (np.all(np.isfinite(maxima)) and maxima[0] > 0 and maxima[1] > 0):
        return False, n
    return True, n


@njit
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


@njit
def normalize_patches(pixels, out, fallback, lut, tissue_level, target_matrix, target_max, log_io, alpha,
                          min_tissue, concentration_rank, angle_hist, concentration_hist, tissue_index, keys,
                          concentrations, sample, candidate_values, candidate_index, tables):
    """Normalize a (b, P, 3) uint8 slice into `out`, flags into `fallback` (unusable patches copied).

    The scratch buffers (`fused.numba_scratch`) are lent by the caller, so that one thread reuses them over
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


@njit
def estimate_patches(pixels, usable, n_tissue, stains, maxima, lut, tissue_level, alpha, min_tissue,
                         concentration_rank, angle_hist, concentration_hist, tissue_index, keys,
                         concentrations, sample, candidate_values, candidate_index, tables):
    """Macenko estimates of a (b, P, 3) uint8 slice into usable (b,), n_tissue (b,), stains (b, 3, 2) and
    maxima (b, 2); `tables` is unused (the scratch tuple is shared with `normalize_patches`)."""
    inverse = np.empty((2, 3), np.float32)
    for i in range(pixels.shape[0]):
        usable[i], n_tissue[i] = _nb_estimate_patch(pixels[i], lut, tissue_level, alpha, min_tissue,
                                                    concentration_rank, angle_hist, concentration_hist,
                                                    tissue_index, keys, concentrations, sample,
                                                    candidate_values, candidate_index, stains[i], inverse,
                                                    maxima[i])
