"""95% intervals of the collapse metrics: percentile bootstrap over slides, the same draws for every metric."""
from __future__ import annotations

import math

import numpy as np


class SlideBootstrap:
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
