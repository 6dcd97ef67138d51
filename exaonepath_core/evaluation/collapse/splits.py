"""Train/test splits of the collapse probes: patches within slides (slide probe), whole slides within sites."""
from __future__ import annotations

import numpy as np


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
