"""`collapse_metrics`: the long table of WSI-collapse metrics of one feature space (slide, class and site rows).

The steps, in the order they run (and consume the seeded generator): check and encode the ids, subsample and
sort the patches by slide, the slide-ID probe, the kNN statistics and silhouettes, the class rows, the site rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from exaonepath_core.evaluation.collapse.bootstrap import SlideBootstrap
from exaonepath_core.evaluation.collapse.geometry import cosine_silhouettes, l2_normalized
from exaonepath_core.evaluation.collapse.names import (
    ALL_METRICS,
    CLASS_METRICS,
    KNN_GAP,
    KNN_LEAVE_ONE_SLIDE_OUT,
    KNN_WITHIN_SLIDE,
    SAME_SITE_NEIGHBOURS,
    SAME_SLIDE_NEIGHBOURS,
    SILHOUETTE_CLASS,
    SILHOUETTE_SITE,
    SILHOUETTE_SLIDE,
    SITE_METRICS,
    SITE_PROBE,
    SITE_PROBE_OVER_CHANCE,
    SLIDE_PROBE,
    SLIDE_PROBE_OVER_CHANCE,
    TABLE_COLUMNS,
    UNLABELLED,
)
from exaonepath_core.evaluation.collapse.neighbours import (
    NeighbourStatistics,
    hoeffding_bound,
    neighbour_statistics,
)
from exaonepath_core.evaluation.collapse.probe import linear_probe_predictions
from exaonepath_core.evaluation.collapse.splits import grouped_site_split, slide_stratified_split


@dataclass(frozen=True)
class CollapseSettings:
    """The knobs of `collapse_metrics` (see its signature); one object so the steps take one argument."""

    k: int = 20
    seed: int = 0
    max_queries: int | None = 5000
    probe_dim: int | None = 128
    probe_max_train: int | None = 20000
    test_fraction: float = 0.3


@dataclass
class _Patches:
    """The patches the table is computed on: unit features sorted by slide, with compact 0..C-1 codes."""

    unit: torch.Tensor
    slide_codes: np.ndarray
    class_codes: np.ndarray | None  # UNLABELLED (-1) where a patch has no class
    site_codes: np.ndarray | None
    n_unlabelled: int
    notes: list[str] = field(default_factory=list)  # said in every row's note (e.g. the subsample)

    @property
    def n(self) -> int:
        return int(self.slide_codes.size)

    @property
    def n_slides(self) -> int:
        return int(self.slide_codes.max()) + 1

    @property
    def n_sites(self) -> int:
        return int(self.site_codes.max()) + 1 if self.site_codes is not None else 0


class _Table:
    """The rows of the long table: a metric's mean over finite per-patch values with its slide-bootstrap CI."""

    def __init__(self, boot: SlideBootstrap, notes: list[str]) -> None:
        self.boot, self.notes, self.rows = boot, notes, []

    def add(self, metric: str, values: np.ndarray, codes: np.ndarray, chance: float, note: str,
            scale: float = 1.0) -> None:
        finite = np.isfinite(values)
        value = float(values[finite].mean()) if finite.any() else math.nan
        low, high = self.boot.interval(values, codes)
        self.rows.append({"metric": metric, "value": value / scale, "ci_low": low / scale, "ci_high": high / scale,
                          "chance": chance, "n": int(finite.sum()),
                          "note": "; ".join([*self.notes, note] if note else self.notes)})

    def skip(self, metric: str, reason: str) -> None:
        self.rows.append({"metric": metric, "value": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                          "chance": math.nan, "n": 0, "note": "; ".join([*self.notes, f"skipped: {reason}"])})

    def frame(self) -> pd.DataFrame:
        table = pd.DataFrame(self.rows, columns=list(TABLE_COLUMNS))
        order = {m: i for i, m in enumerate(ALL_METRICS)}
        return table.sort_values("metric", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def _codes(values: np.ndarray | list, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like features' first axis, got {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN/inf")
    uniques, codes = np.unique(arr.astype(str) if arr.dtype == object else arr, return_inverse=True)
    return uniques, codes.astype(np.int64)


def _class_codes(class_labels: np.ndarray | list, n: int) -> np.ndarray:
    """Integer class labels as int64 (integral floats accepted; -1 = unlabelled); anything else is an error."""
    raw_labels = np.asarray(class_labels)
    if raw_labels.shape != (n,):
        raise ValueError(f"class_labels must have shape ({n},), got {raw_labels.shape}")
    if raw_labels.dtype.kind not in "iu":
        if raw_labels.dtype.kind == "f" and np.all(np.isfinite(raw_labels)) and np.all(raw_labels % 1 == 0):
            raw_labels = raw_labels.astype(np.int64)
        else:
            raise ValueError(f"class_labels must be integers (-1 = unlabelled), got dtype {raw_labels.dtype}")
    if np.any(raw_labels < UNLABELLED):
        raise ValueError(f"class_labels must be >= 0 or -1 (unlabelled); found {int(raw_labels.min())}")
    return raw_labels.astype(np.int64)


def _site_codes(site_ids: np.ndarray | list, slide_codes: np.ndarray) -> np.ndarray:
    """Site codes of the patches; a slide whose patches name two sites is an error."""
    _, site_codes = _codes(site_ids, "site_ids", slide_codes.size)
    per_slide_sites = pd.Series(site_codes).groupby(slide_codes).nunique()
    if (per_slide_sites > 1).any():
        raise ValueError(f"{int((per_slide_sites > 1).sum())} slides have patches from more than one site")
    return site_codes


def _compact_classes(class_codes: np.ndarray) -> np.ndarray:
    """Labelled classes renumbered 0..C-1 in their order (ties of a vote still go to the smallest label)."""
    labelled_values = np.unique(class_codes[class_codes != UNLABELLED])
    remap = np.full(int(class_codes.max()) + 2, UNLABELLED, dtype=np.int64)  # small vote tables
    remap[labelled_values] = np.arange(labelled_values.size)
    return np.where(class_codes == UNLABELLED, UNLABELLED, remap[np.maximum(class_codes, 0)])


def _patches(x: torch.Tensor, slide_codes: np.ndarray, class_codes: np.ndarray | None,
             site_codes: np.ndarray | None, max_samples: int | None, rng: np.random.Generator) -> _Patches:
    """Subsample (max_samples), sort by slide (a slide is a contiguous block: cheap masking), L2-normalise."""
    n_total = x.shape[0]
    notes: list[str] = []
    keep = np.arange(n_total)
    if max_samples is not None and n_total > max_samples:
        keep = np.sort(rng.choice(n_total, size=max_samples, replace=False))
        notes.append(f"uniform random subsample of {max_samples} of {n_total} patches")
    keep = keep[np.argsort(slide_codes[keep], kind="stable")]
    unit = l2_normalized(x[torch.from_numpy(keep)])
    _, slides = np.unique(slide_codes[keep], return_inverse=True)
    if int(slides.max()) + 1 < 2:
        raise ValueError(f"collapse metrics need patches from at least 2 slides, got {int(slides.max()) + 1}")
    sites = np.unique(site_codes[keep], return_inverse=True)[1] if site_codes is not None else None
    classes, n_unlabelled = None, 0
    if class_codes is not None:
        classes = class_codes[keep]
        n_unlabelled = int((classes == UNLABELLED).sum())
        classes = _compact_classes(classes)
    return _Patches(unit, slides, classes, sites, n_unlabelled, notes)


def _probe_train_subset(train_idx: np.ndarray, settings: CollapseSettings, rng: np.random.Generator
                        ) -> tuple[np.ndarray, str]:
    """At most `probe_max_train` random training patches, and the note that says so."""
    if settings.probe_max_train is not None and train_idx.size > settings.probe_max_train:
        chosen = np.sort(rng.choice(train_idx, size=settings.probe_max_train, replace=False))
        return chosen, f"; probe trained on a random {settings.probe_max_train} of the train patches"
    return train_idx, ""


def _probe_features_note(patches: _Patches, settings: CollapseSettings) -> str:
    if settings.probe_dim and settings.probe_dim < patches.unit.shape[1]:
        return f"top-{settings.probe_dim} PCs of z-scored features"
    return "z-scored features"


def _slide_probe_rows(table: _Table, patches: _Patches, settings: CollapseSettings,
                      rng: np.random.Generator) -> None:
    """Slide-ID linear probe on patches held out within each slide, and its accuracy over chance."""
    slides, test_fraction = patches.slide_codes, settings.test_fraction
    train_idx, test_idx, n_single = slide_stratified_split(slides, test_fraction, settings.seed)
    train_idx, train_note = _probe_train_subset(train_idx, settings, rng)
    predicted = linear_probe_predictions(patches.unit, slides, train_idx, test_idx, settings.probe_dim)
    correct = (predicted == slides[test_idx]).astype(np.float64)
    majority = np.bincount(slides[test_idx]).max() / test_idx.size
    chance = max(1.0 / patches.n_slides, float(majority))
    note = (f"softmax probe on {_probe_features_note(patches, settings)}, within-slide split "
            f"{1 - test_fraction:.0%}/{test_fraction:.0%}{train_note}; {n_single} single-patch slides train-only; "
            "chance = max(1/n_slides, majority rate)")
    table.add(SLIDE_PROBE, correct, slides[test_idx], chance, note)
    table.add(SLIDE_PROBE_OVER_CHANCE, correct, slides[test_idx], 1.0, note, scale=chance)


def _draw_queries(pool: np.ndarray, settings: CollapseSettings) -> np.ndarray:
    """At most `max_queries` query patches of `pool` (every draw from the same seed: nested pools agree)."""
    if settings.max_queries is None or pool.size <= settings.max_queries:
        return pool
    return np.sort(np.random.default_rng(settings.seed + 2).choice(pool, size=settings.max_queries, replace=False))


def _query_note(settings: CollapseSettings, m: int, total: int, value_range: float = 1.0) -> str:
    if m >= total:
        return f"exact cosine kNN, k={settings.k}, all {total} patches as queries"
    return (f"exact cosine kNN, k={settings.k}, {m} random queries of {total}; query-sampling error <= "
            f"{hoeffding_bound(m, 0.05, value_range):.3f} w.p. 0.95 (Hoeffding)")


@dataclass
class _Neighbours:
    """The kNN statistics and silhouettes the class and site rows read."""

    stats: NeighbourStatistics
    slide_queries: np.ndarray
    class_queries: np.ndarray | None  # None: fewer than two labelled classes
    labelled_pool: np.ndarray
    silhouettes: list[np.ndarray]  # slide, then class (if classes), then site (if >= 2 sites)


def _neighbour_rows(table: _Table, patches: _Patches, settings: CollapseSettings) -> _Neighbours:
    """kNN statistics for the query patches and every silhouette in one pass; adds the slide rows of both."""
    slides, classes, n = patches.slide_codes, patches.class_codes, patches.n
    slide_queries = _draw_queries(np.arange(n), settings)
    labelled_pool = np.flatnonzero(classes != UNLABELLED) if classes is not None else np.empty(0, int)
    has_classes = classes is not None and labelled_pool.size > 0 and np.unique(classes[labelled_pool]).size >= 2
    class_queries = None
    if has_classes:
        class_queries = slide_queries if labelled_pool.size == n else _draw_queries(labelled_pool, settings)
    stats = neighbour_statistics(patches.unit, slides, settings.k, slide_queries,
                                 class_codes=classes if has_classes else None, class_queries=class_queries,
                                 site_codes=patches.site_codes)
    slide_sizes = np.bincount(slides)
    same_slide_chance = float(np.mean((slide_sizes[slides[slide_queries]] - 1) / max(n - 1, 1)))
    table.add(SAME_SLIDE_NEIGHBOURS, stats.same_slide_fraction, slides[slide_queries], same_slide_chance,
              _query_note(settings, slide_queries.size, n) + "; chance = expected fraction for random neighbours")
    labellings = [slides] + ([classes] if has_classes else []) + ([patches.site_codes] if patches.n_sites >= 2 else [])
    silhouettes = cosine_silhouettes(patches.unit, labellings)
    table.add(SILHOUETTE_SLIDE, silhouettes[0], slides, 0.0, f"exact cosine silhouette over all {n} patches")
    return _Neighbours(stats, slide_queries, class_queries, labelled_pool, silhouettes)


def _class_rows(table: _Table, patches: _Patches, near: _Neighbours, settings: CollapseSettings) -> None:
    """Class silhouette and the within-slide vs leave-one-slide-out kNN class accuracy (paired queries)."""
    if patches.class_codes is None or near.class_queries is None:
        reason = ("no class labels given" if patches.class_codes is None
                  else f"fewer than 2 labelled classes ({patches.n_unlabelled} unlabelled patches)")
        for metric in CLASS_METRICS:
            table.skip(metric, reason)
        return
    slides, classes, stats, queries = patches.slide_codes, patches.class_codes, near.stats, near.class_queries
    n_labelled = near.labelled_pool.size
    unl = f"{patches.n_unlabelled} unlabelled patches excluded" if patches.n_unlabelled else "all patches labelled"
    table.add(SILHOUETTE_CLASS, near.silhouettes[1], slides, 0.0,
              f"exact cosine silhouette over {n_labelled} labelled patches; {unl}")
    paired = np.isfinite(stats.within_correct) & np.isfinite(stats.loso_correct)
    n_unpaired = int((~paired).sum())
    pair_note = (f"{_query_note(settings, queries.size, n_labelled)}; {unl}; {n_unpaired} queries without a "
                 "labelled neighbour in their own or in other slides excluded")
    q_slides = slides[queries][paired]
    majority_class = float(np.bincount(classes[queries][paired]).max() / max(paired.sum(), 1))
    table.add(KNN_WITHIN_SLIDE, stats.within_correct[paired], q_slides, majority_class,
              pair_note + "; chance = majority class rate")
    table.add(KNN_LEAVE_ONE_SLIDE_OUT, stats.loso_correct[paired], q_slides, majority_class,
              pair_note + "; chance = majority class rate")
    table.add(KNN_GAP, stats.within_correct[paired] - stats.loso_correct[paired], q_slides, 0.0,
              f"within-slide minus leave-one-slide-out accuracy (paired); "
              f"{_query_note(settings, queries.size, n_labelled, 2.0)}; {unl}; {n_unpaired} unpaired queries excluded")


def _site_probe_rows(table: _Table, patches: _Patches, settings: CollapseSettings,
                     rng: np.random.Generator) -> None:
    """Site-ID linear probe on whole slides held out within each site, and its accuracy over chance."""
    slides, sites = patches.slide_codes, patches.site_codes
    s_train, s_test, n_single_site = grouped_site_split(slides, sites, settings.test_fraction, settings.seed)
    if s_test.size == 0:
        for metric in (SITE_PROBE, SITE_PROBE_OVER_CHANCE):
            table.skip(metric, "no site has 2 or more slides (site probe needs held-out slides)")
        return
    s_train, train_note = _probe_train_subset(s_train, settings, rng)
    predicted = linear_probe_predictions(patches.unit, sites, s_train, s_test, settings.probe_dim)
    correct = (predicted == sites[s_test]).astype(np.float64)
    chance = max(1.0 / patches.n_sites, float(np.bincount(sites[s_test]).max() / s_test.size))
    note = (f"softmax probe on {_probe_features_note(patches, settings)}, held-out slides within each site"
            f"{train_note}; {n_single_site} single-slide sites train-only; chance = max(1/n_sites, majority rate)")
    table.add(SITE_PROBE, correct, slides[s_test], chance, note)
    table.add(SITE_PROBE_OVER_CHANCE, correct, slides[s_test], 1.0, note, scale=chance)


def _site_rows(table: _Table, patches: _Patches, near: _Neighbours, settings: CollapseSettings,
               rng: np.random.Generator) -> None:
    """Site probe, same-site fraction among other-slide neighbours, site silhouette (skipped below 2 sites)."""
    if patches.site_codes is None or patches.n_sites < 2:
        reason = "no site ids given" if patches.site_codes is None else "fewer than 2 sites"
        for metric in SITE_METRICS:
            table.skip(metric, reason)
        return
    _site_probe_rows(table, patches, settings, rng)
    slides, n = patches.slide_codes, patches.n
    table.add(SAME_SITE_NEIGHBOURS, near.stats.same_site_fraction, slides[near.slide_queries],
              float(np.nanmean(near.stats.same_site_chance)),
              "among the k nearest neighbours from other slides; " + _query_note(settings, near.slide_queries.size, n)
              + "; chance = expected fraction for random other-slide neighbours")
    table.add(SILHOUETTE_SITE, near.silhouettes[-1], slides, 0.0, f"exact cosine silhouette over all {n} patches")


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
    settings = CollapseSettings(k=k, seed=seed, max_queries=max_queries, probe_dim=probe_dim,
                                probe_max_train=probe_max_train, test_fraction=test_fraction)
    _, slide_codes = _codes(slide_ids, "slide_ids", x.shape[0])
    class_codes = _class_codes(class_labels, x.shape[0]) if class_labels is not None else None
    site_codes = _site_codes(site_ids, slide_codes) if site_ids is not None else None
    rng = np.random.default_rng(seed)  # drawn from in this order: subsample, slide probe, site probe
    patches = _patches(x, slide_codes, class_codes, site_codes, max_samples, rng)
    table = _Table(SlideBootstrap(patches.n_slides, n_boot, seed + 1), patches.notes)
    _slide_probe_rows(table, patches, settings, rng)
    near = _neighbour_rows(table, patches, settings)
    _class_rows(table, patches, near, settings)
    _site_rows(table, patches, near, settings, rng)
    return table.frame()
