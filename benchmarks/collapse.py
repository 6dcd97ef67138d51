"""Collapse metrics: ours (blocked torch kNN, cluster-sum silhouette, torch probe) vs plain scikit-learn.

Both compute the same metrics on the same synthetic features (slide, class and site structure) in one
process; the script prints both timings, their ratio and the largest absolute difference between the two
sets of values, then times ours alone at the issue's scale (10^5 x 768) unless --skip-large.

    .venv/bin/python benchmarks/collapse.py --quick --json /tmp/collapse.json
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exaonepath_core.evaluation import collapse
from exaonepath_core.io import atomic


def synthetic_features(
    n: int, dim: int, n_slides: int, n_classes: int = 6, n_sites: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features = class centre + site shift + slide shift + noise; returns (features, slides, classes, sites)."""
    rng = np.random.default_rng(seed)
    slides = np.sort(rng.integers(0, n_slides, n))
    sites = slides % n_sites
    classes = rng.integers(0, n_classes, n)
    features = (
        1.5 * rng.standard_normal((n_classes, dim), dtype=np.float32)[classes]
        + 0.8 * rng.standard_normal((n_sites, dim), dtype=np.float32)[sites]
        + 1.0 * rng.standard_normal((n_slides, dim), dtype=np.float32)[slides]
        + 2.0 * rng.standard_normal((n, dim), dtype=np.float32)
    )
    return features, slides, classes, sites


def sklearn_reference_metrics(
    features: np.ndarray, slides: np.ndarray, classes: np.ndarray, sites: np.ndarray | None, k: int,
    probe_dim: int | None = 128, test_fraction: float = 0.3, seed: int = 0,
) -> dict[str, float]:
    """The same metrics with plain scikit-learn (all patches as queries, no subsampling)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler, normalize

    x = normalize(np.asarray(features, dtype=np.float64))
    n = x.shape[0]
    out: dict[str, float] = {}

    def probe_accuracy(labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
        steps = [StandardScaler()]
        if probe_dim is not None and probe_dim < x.shape[1]:
            steps.append(PCA(probe_dim, svd_solver="full"))
        model = make_pipeline(*steps, LogisticRegression(C=1.0, max_iter=2000, tol=1e-8))
        model.fit(x[train], labels[train])
        return float((model.predict(x[test]) == labels[test]).mean())

    train, test, _ = collapse.slide_stratified_split(slides, test_fraction, seed)
    out[collapse.SLIDE_PROBE] = probe_accuracy(slides, train, test)
    nearest = NearestNeighbors(n_neighbors=min(k, n - 1), metric="cosine", algorithm="brute").fit(x)
    neighbours = nearest.kneighbors(return_distance=False)  # without X: excludes each point itself
    out[collapse.SAME_SLIDE_NEIGHBOURS] = float((slides[neighbours] == slides[:, None]).mean())
    out[collapse.SILHOUETTE_SLIDE] = float(silhouette_score(x, slides, metric="cosine"))
    out[collapse.SILHOUETTE_CLASS] = float(silhouette_score(x, classes, metric="cosine"))

    within, loso, same_site = [], [], []
    for slide in np.unique(slides):
        own, other = slides == slide, slides != slide
        classifier = KNeighborsClassifier(n_neighbors=min(k, int(other.sum())), metric="cosine", algorithm="brute")
        classifier.fit(x[other], classes[other])
        loso.append(classifier.predict(x[own]) == classes[own])
        kk = min(k, int(own.sum()) - 1)
        if kk >= 1:
            own_nn = NearestNeighbors(n_neighbors=kk, metric="cosine", algorithm="brute").fit(x[own])
            own_labels = classes[own]
            votes = own_labels[own_nn.kneighbors(return_distance=False)]
            predicted = np.array([np.bincount(v, minlength=classes.max() + 1).argmax() for v in votes])
            within.append(predicted == own_labels)
        else:
            within.append(np.full(int(own.sum()), np.nan))
        if sites is not None:
            other_nn = NearestNeighbors(n_neighbors=min(k, int(other.sum())), metric="cosine", algorithm="brute")
            idx = other_nn.fit(x[other]).kneighbors(x[own], return_distance=False)
            same_site.append((sites[other][idx] == sites[own][:, None]).mean(1))
    within_all, loso_all = np.concatenate(within).astype(float), np.concatenate(loso).astype(float)
    paired = np.isfinite(within_all)
    out[collapse.KNN_WITHIN_SLIDE] = float(within_all[paired].mean())
    out[collapse.KNN_LEAVE_ONE_SLIDE_OUT] = float(loso_all[paired].mean())
    out[collapse.KNN_GAP] = out[collapse.KNN_WITHIN_SLIDE] - out[collapse.KNN_LEAVE_ONE_SLIDE_OUT]
    if sites is not None:
        s_train, s_test, _ = collapse.grouped_site_split(slides, sites, test_fraction, seed)
        out[collapse.SITE_PROBE] = probe_accuracy(sites, s_train, s_test)
        out[collapse.SAME_SITE_NEIGHBOURS] = float(np.concatenate(same_site).mean())
        out[collapse.SILHOUETTE_SITE] = float(silhouette_score(x, sites, metric="cosine"))
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print and optionally write the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute under load)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--n", type=int, default=None, help="patches for the side-by-side comparison")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--slides", type=int, default=None)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--large-n", type=int, default=None,
                        help="patches for the ours-only timing (default 10^5; 2x10^4 with --quick)")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args(argv)
    n = args.n or (2000 if args.quick else 8000)
    n_slides = args.slides or (20 if args.quick else 40)
    large_n = args.large_n or (20_000 if args.quick else 100_000)

    features, slides, classes, sites = synthetic_features(n, args.dim, n_slides)
    t0, c0 = time.perf_counter(), time.process_time()
    ours = collapse.collapse_metrics(features, slides, classes, sites, k=args.k, n_boot=200, max_queries=None)
    ours_s, ours_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    reference = sklearn_reference_metrics(features, slides, classes, sites, args.k)
    baseline_s, baseline_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    ours_values = dict(zip(ours["metric"], ours["value"]))
    errors = {m: abs(ours_values[m] - v) for m, v in reference.items()}
    summary = {
        "ours_s": round(ours_s, 3), "baseline_s": round(baseline_s, 3),
        "ratio": round(baseline_s / ours_s, 2) if ours_s > 0 else math.nan,
        "ours_cpu_s": round(ours_cpu_s, 3), "baseline_cpu_s": round(baseline_cpu_s, 3),
        "n": n, "dim": args.dim, "n_slides": n_slides, "k": args.k,
        "max_abs_error": max(errors.values()), "max_abs_error_metric": max(errors, key=errors.get),
        "abs_error_by_metric": errors,
    }
    print(f"n={n} dim={args.dim} slides={n_slides}: ours {ours_s:.2f} s, scikit-learn {baseline_s:.2f} s, "
          f"speed-up x{summary['ratio']} (CPU {ours_cpu_s:.1f} s vs {baseline_cpu_s:.1f} s); max |ours - sklearn| = {summary['max_abs_error']:.2e} "
          f"({summary['max_abs_error_metric']})")

    if not args.skip_large:
        large_slides = 100
        features, slides, classes, sites = synthetic_features(large_n, args.dim, large_slides, seed=1)
        t0, c0 = time.perf_counter(), time.process_time()
        large = collapse.collapse_metrics(features, slides, classes, sites, k=args.k, n_boot=200)
        summary["ours_large_s"] = round(time.perf_counter() - t0, 3)
        summary["ours_large_cpu_s"] = round(time.process_time() - c0, 3)
        summary["large_n"], summary["large_slides"] = large_n, large_slides
        summary["large_values"] = dict(zip(large["metric"], large["value"]))
        print(f"ours alone, n={large_n} dim={args.dim} slides={large_slides} (default max_queries=5000): "
              f"{summary['ours_large_s']:.2f} s wall, {summary['ours_large_cpu_s']:.2f} s CPU")
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS {summary['peak_rss_mb']} MB")
    if args.json is not None:
        atomic.write_text(args.json, json.dumps(summary, indent=2, default=float) + "\n")
    return summary


if __name__ == "__main__":
    main()
