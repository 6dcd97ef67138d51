"""WSI-collapse metrics on constructed features with a known answer, and agreement with scikit-learn."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from exaonepath_core.evaluation import collapse

REPO_ROOT = Path(__file__).resolve().parents[1]

N_SLIDES, PER_SLIDE, DIM, N_CLASSES = 12, 50, 32, 4


def _metrics_dict(table) -> dict[str, dict]:
    return {row["metric"]: row for row in table.to_dict("records")}


def _cohort(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    slides = np.repeat(np.arange(N_SLIDES), PER_SLIDE)
    sites = slides % 3
    classes = rng.integers(0, N_CLASSES, slides.size)
    return slides, sites, classes, rng


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("collapse_benchmark", REPO_ROOT / "benchmarks" / "collapse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slide_identity_features_collapse_completely():
    slides, sites, classes, rng = _cohort()
    features = 4.0 * rng.standard_normal((N_SLIDES, DIM))[slides] + rng.standard_normal((slides.size, DIM))
    table = collapse.collapse_metrics(features, [f"slide-{s}" for s in slides], classes, sites, k=10, n_boot=100)
    m = _metrics_dict(table)
    assert m[collapse.SLIDE_PROBE]["value"] >= 0.95
    assert m[collapse.SLIDE_PROBE]["chance"] == pytest.approx(1 / N_SLIDES)
    assert m[collapse.SLIDE_PROBE_OVER_CHANCE]["value"] >= 0.95 * N_SLIDES
    assert m[collapse.SAME_SLIDE_NEIGHBOURS]["value"] >= 0.95
    assert m[collapse.SAME_SLIDE_NEIGHBOURS]["chance"] == pytest.approx((PER_SLIDE - 1) / (slides.size - 1))
    assert m[collapse.SILHOUETTE_SLIDE]["value"] > 0.5
    # class carries no signal here: its clusters overlap completely
    assert m[collapse.SILHOUETTE_CLASS]["value"] < 0.02
    assert abs(m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["value"] - m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["chance"]) < 0.15


def test_slide_independent_features_sit_at_chance():
    slides, sites, classes, rng = _cohort(1)
    features = rng.standard_normal((slides.size, DIM))
    m = _metrics_dict(collapse.collapse_metrics(features, slides, classes, sites, k=10, n_boot=100))
    chance = 1 / N_SLIDES
    assert m[collapse.SLIDE_PROBE]["value"] < chance + 0.1
    assert m[collapse.SLIDE_PROBE_OVER_CHANCE]["value"] < 2.2
    assert abs(m[collapse.SAME_SLIDE_NEIGHBOURS]["value"] - m[collapse.SAME_SLIDE_NEIGHBOURS]["chance"]) < 0.04
    assert m[collapse.SILHOUETTE_SLIDE]["value"] < 0.0
    assert abs(m[collapse.SAME_SITE_NEIGHBOURS]["value"] - m[collapse.SAME_SITE_NEIGHBOURS]["chance"]) < 0.06


def test_class_features_give_positive_class_silhouette_and_no_knn_gap():
    slides, sites, classes, rng = _cohort(2)
    features = 3.0 * rng.standard_normal((N_CLASSES, DIM))[classes] + rng.standard_normal((slides.size, DIM))
    m = _metrics_dict(collapse.collapse_metrics(features, slides, classes, sites, k=10, n_boot=100))
    assert m[collapse.SILHOUETTE_CLASS]["value"] > 0.3
    assert m[collapse.SILHOUETTE_SLIDE]["value"] < 0.0
    assert m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["value"] > 0.95
    assert abs(m[collapse.KNN_GAP]["value"]) < 0.05


def test_slide_specific_class_codes_open_a_knn_gap():
    """Classes separable inside each slide but with a different code per slide: within >> leave-one-slide-out."""
    slides, sites, classes, rng = _cohort(3)
    centres = 3.0 * rng.standard_normal((N_SLIDES, N_CLASSES, DIM))
    features = centres[slides, classes] + rng.standard_normal((slides.size, DIM))
    m = _metrics_dict(collapse.collapse_metrics(features, slides, classes, sites, k=5, n_boot=100))
    assert m[collapse.KNN_WITHIN_SLIDE]["value"] > 0.9
    assert m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["value"] < 0.5
    assert m[collapse.KNN_GAP]["value"] > 0.5
    assert m[collapse.KNN_GAP]["value"] == pytest.approx(
        m[collapse.KNN_WITHIN_SLIDE]["value"] - m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["value"]
    )


def test_intervals_contain_the_point_estimates():
    slides, sites, classes, rng = _cohort(4)
    features = (1.0 * rng.standard_normal((N_SLIDES, DIM))[slides] + 1.5 * rng.standard_normal((N_CLASSES, DIM))[classes]
                + 2.0 * rng.standard_normal((slides.size, DIM)))
    table = collapse.collapse_metrics(features, slides, classes, sites, k=10, n_boot=300, seed=5)
    assert list(table["metric"]) == list(collapse.ALL_METRICS)
    assert list(table.columns) == list(collapse.TABLE_COLUMNS)
    for row in table.to_dict("records"):
        assert math.isfinite(row["value"]), row
        assert row["ci_low"] <= row["value"] <= row["ci_high"], row
        assert row["ci_high"] - row["ci_low"] > 0 or row["value"] in (0.0, 1.0), row
    # resampling slides makes intervals wider when slides disagree: the probe's interval is not degenerate
    probe = _metrics_dict(table)[collapse.SLIDE_PROBE]
    assert probe["ci_high"] - probe["ci_low"] > 0.01


def test_agrees_with_scikit_learn_on_small_n():
    bench = _benchmark_module()
    features, slides, classes, sites = bench.synthetic_features(360, 24, 9, n_classes=4, n_sites=3, seed=7)
    ours = _metrics_dict(collapse.collapse_metrics(features, slides, classes, sites, k=7, n_boot=0, max_queries=None))
    reference = bench.sklearn_reference_metrics(features, slides, classes, sites, k=7)
    assert set(reference) <= set(ours)
    for metric, expected in reference.items():
        tolerance = 0.02 if metric.endswith("probe_accuracy") else 1e-6
        assert ours[metric]["value"] == pytest.approx(expected, abs=tolerance), metric
        assert math.isnan(ours[metric]["ci_low"])  # n_boot=0: no interval


def test_silhouette_matches_sklearn_samples_with_singletons_and_exclusions():
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(8)
    features = rng.standard_normal((80, 6))
    labels = rng.integers(0, 5, 80)
    labels[0] = 9  # a singleton cluster: silhouette 0 by convention
    unit = collapse.l2_normalized(features)
    ours = collapse.cosine_silhouette_samples(unit, labels)
    np.testing.assert_allclose(ours, silhouette_samples(features, labels, metric="cosine"), atol=1e-6)
    assert ours[0] == 0.0
    excluded = labels.copy()
    excluded[:10] = -1
    both = collapse.cosine_silhouettes(unit, [labels, excluded])
    np.testing.assert_allclose(both[0], ours, atol=1e-6)
    assert np.isnan(both[1][:10]).all()
    keep = excluded >= 0
    np.testing.assert_allclose(both[1][keep], silhouette_samples(features[keep], excluded[keep], metric="cosine"),
                               atol=1e-6)


def test_query_subsampling_stays_within_its_stated_bound():
    slides, _, classes, rng = _cohort(9)
    features = 0.7 * rng.standard_normal((N_SLIDES, DIM))[slides] + rng.standard_normal((slides.size, DIM))
    exact = _metrics_dict(collapse.collapse_metrics(features, slides, classes, None, k=10, n_boot=0, max_queries=None))
    m = 150
    bound = collapse.hoeffding_bound(m)
    assert bound == pytest.approx(math.sqrt(math.log(40) / (2 * m)))
    for seed in range(3):
        sub = _metrics_dict(collapse.collapse_metrics(features, slides, classes, None, k=10, n_boot=0, seed=seed,
                                                      max_queries=m))
        row = sub[collapse.SAME_SLIDE_NEIGHBOURS]
        assert row["n"] == m
        assert f"{bound:.3f}" in row["note"]
        assert abs(row["value"] - exact[collapse.SAME_SLIDE_NEIGHBOURS]["value"]) <= bound
        assert abs(sub[collapse.KNN_GAP]["value"] - exact[collapse.KNN_GAP]["value"]) <= 2 * bound


def test_unlabelled_patches_are_excluded_and_counted():
    slides, _, classes, rng = _cohort(10)
    features = 3.0 * rng.standard_normal((N_CLASSES, DIM))[classes] + rng.standard_normal((slides.size, DIM))
    labels = classes.copy()
    labels[::5] = -1
    n_unlabelled = int((labels == -1).sum())
    m = _metrics_dict(collapse.collapse_metrics(features, slides, labels, None, k=10, n_boot=50))
    assert m[collapse.SILHOUETTE_CLASS]["n"] == slides.size - n_unlabelled
    assert f"{n_unlabelled} unlabelled patches excluded" in m[collapse.SILHOUETTE_CLASS]["note"]
    assert m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["n"] == slides.size - n_unlabelled
    assert m[collapse.KNN_LEAVE_ONE_SLIDE_OUT]["value"] > 0.95
    # slide metrics still use every patch
    assert m[collapse.SAME_SLIDE_NEIGHBOURS]["n"] == slides.size


def test_class_and_site_metrics_are_skipped_with_a_note():
    slides, _, _, rng = _cohort(11)
    features = rng.standard_normal((slides.size, DIM))
    m = _metrics_dict(collapse.collapse_metrics(features, slides, None, None, n_boot=10, max_samples=400))
    for metric in collapse.CLASS_METRICS:
        assert math.isnan(m[metric]["value"]) and "skipped: no class labels" in m[metric]["note"]
    for metric in collapse.SITE_METRICS:
        assert math.isnan(m[metric]["value"]) and "skipped: no site ids" in m[metric]["note"]
    assert "subsample of 400 of 600" in m[collapse.SAME_SLIDE_NEIGHBOURS]["note"]
    assert m[collapse.SAME_SLIDE_NEIGHBOURS]["n"] == 400


def test_pca_reduced_probe_separates_slides():
    slides, _, _, rng = _cohort(12)
    features = 3.0 * rng.standard_normal((N_SLIDES, 200))[slides] + rng.standard_normal((slides.size, 200))
    train, test, n_single = collapse.slide_stratified_split(slides, 0.3, seed=0)
    assert n_single == 0 and np.intersect1d(train, test).size == 0 and train.size + test.size == slides.size
    assert np.all(np.bincount(slides[test]) == 15)
    predicted = collapse.linear_probe_predictions(torch.as_tensor(features), slides, train, test, probe_dim=16)
    assert (predicted == slides[test]).mean() > 0.95


def test_bad_input_is_rejected_clearly():
    slides, _, classes, rng = _cohort()
    features = rng.standard_normal((slides.size, DIM))
    with pytest.raises(ValueError, match="at least 2 slides"):
        collapse.collapse_metrics(features, np.zeros(slides.size), n_boot=0)
    with pytest.raises(ValueError, match="shape"):
        collapse.collapse_metrics(features, slides[:-1], n_boot=0)
    bad = features.copy()
    bad[3] = np.nan
    bad[4] = 0.0
    with pytest.raises(ValueError, match="1 rows with NaN/inf and 1 all-zero rows"):
        collapse.collapse_metrics(bad, slides, n_boot=0)
    with pytest.raises(ValueError, match="-1 \\(unlabelled\\)"):
        collapse.collapse_metrics(features, slides, classes - 2, n_boot=0)
    mixed_sites = slides % 3
    mixed_sites[0] = 2  # slide 0 now has patches from two sites
    with pytest.raises(ValueError, match="more than one site"):
        collapse.collapse_metrics(features, slides, classes, mixed_sites, n_boot=0)


def _metric_rows(arm: str, rows: dict[str, tuple[float, float, float]]) -> list[dict]:
    return [{"arm": arm, "metric": m, "value": v, "ci_low": lo, "ci_high": hi} for m, (v, lo, hi) in rows.items()]


def test_verdict_counts_a_drop_only_when_the_intervals_are_apart():
    from exaonepath_core.evaluation import collapse
    from exaonepath_core.stages.verdict import collapse_verdict

    knn = collapse.KNN_LEAVE_ONE_SLIDE_OUT
    raw = {collapse.SLIDE_PROBE: (0.69, 0.60, 0.78), collapse.SAME_SLIDE_NEIGHBOURS: (0.53, 0.48, 0.58),
           knn: (0.65, 0.60, 0.70)}
    apart = {collapse.SLIDE_PROBE: (0.16, 0.10, 0.22), collapse.SAME_SLIDE_NEIGHBOURS: (0.20, 0.17, 0.23),
             knn: (0.68, 0.63, 0.73)}
    # lower point values, but the slide-ID intervals overlap the raw arm's: not evidence of a drop
    overlap = {collapse.SLIDE_PROBE: (0.66, 0.55, 0.75), collapse.SAME_SLIDE_NEIGHBOURS: (0.20, 0.17, 0.23),
               knn: (0.66, 0.61, 0.71)}
    nan = math.nan
    no_ci = {collapse.SLIDE_PROBE: (0.30, nan, nan), collapse.SAME_SLIDE_NEIGHBOURS: (0.25, nan, nan),
             knn: (0.64, nan, nan)}
    metrics = pd.DataFrame(_metric_rows("raw", raw) + _metric_rows("macenko", apart)
                           + _metric_rows("stain_augmentation", overlap) + _metric_rows("untrained_raw", raw)
                           + _metric_rows("untrained_macenko", no_ci))
    verdict = collapse_verdict(metrics).set_index(["comparison", "metric"])["outcome"]
    assert verdict[("macenko vs raw", collapse.SLIDE_PROBE)] == "lower (CIs apart)"
    assert verdict[("macenko vs raw", "claim_holds")] == "holds"
    assert verdict[("stain_augmentation vs raw", collapse.SLIDE_PROBE)] == "lower, CIs overlap (not counted)"
    assert verdict[("stain_augmentation vs raw", collapse.SAME_SLIDE_NEIGHBOURS)] == "lower (CIs apart)"
    assert verdict[("stain_augmentation vs raw", "claim_holds")] == "does not hold"
    assert verdict[("untrained_macenko vs untrained_raw", collapse.SLIDE_PROBE)] == "lower (point values; no CIs)"
    assert verdict[("untrained_macenko vs untrained_raw", "claim_holds")] == "holds"  # knn fell by 0.01 <= 0.05: kept


def test_verdict_judges_pretraining_arms_only_not_extra_backbones():
    from exaonepath_core.evaluation import collapse
    from exaonepath_core.stages.verdict import collapse_verdict

    rows = {collapse.SLIDE_PROBE: (0.69, 0.60, 0.78), collapse.SAME_SLIDE_NEIGHBOURS: (0.53, 0.48, 0.58)}
    low = {collapse.SLIDE_PROBE: (0.10, 0.05, 0.15), collapse.SAME_SLIDE_NEIGHBOURS: (0.10, 0.05, 0.15)}
    metrics = pd.DataFrame(_metric_rows("raw", rows) + _metric_rows("macenko", low)
                           + _metric_rows("timm_vit_small_patch16_224", low) + _metric_rows("exaonepath", low))
    verdict = collapse_verdict(metrics)
    assert set(verdict.comparison) == {"macenko vs raw"}


def test_report_states_the_verdict_in_words(tmp_path):
    from exaonepath_core.stages.verdict import collapse_verdict, verdict_paragraph

    assert verdict_paragraph(tmp_path) == ""  # no stage 06 yet: nothing claimed
    rows = {collapse.SLIDE_PROBE: (0.69, 0.60, 0.78), collapse.SAME_SLIDE_NEIGHBOURS: (0.53, 0.48, 0.58),
            collapse.KNN_LEAVE_ONE_SLIDE_OUT: (0.65, 0.60, 0.70)}
    low = {collapse.SLIDE_PROBE: (0.16, 0.10, 0.22), collapse.SAME_SLIDE_NEIGHBOURS: (0.20, 0.17, 0.23),
           collapse.KNN_LEAVE_ONE_SLIDE_OUT: (0.68, 0.63, 0.73)}
    metrics = pd.DataFrame(_metric_rows("raw", rows) + _metric_rows("macenko", low)
                           + _metric_rows("stain_augmentation", rows))
    metrics.insert(0, "cohort", "synthetic")
    collapse_verdict(metrics).to_csv(tmp_path / "collapse_verdict.csv", index=False)
    text = verdict_paragraph(tmp_path)
    assert "synthetic: macenko vs raw &rarr; <b>holds</b>" in text
    assert "synthetic: stain_augmentation vs raw &rarr; <b>does not hold</b>" in text
