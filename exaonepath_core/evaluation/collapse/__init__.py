"""WSI-specific feature-collapse metrics: how much of a feature space is slide (or site) identity.

The front door of the collapse metrics (import from here, not from the modules): `collapse_metrics` (metrics)
builds the long table from cosine geometry (geometry: unit rows, silhouettes), kNN statistics (neighbours),
linear probes (probe) on splits (splits), and slide-bootstrap intervals (bootstrap); names holds its vocabulary.

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

from exaonepath_core.evaluation.collapse.bootstrap import SlideBootstrap
from exaonepath_core.evaluation.collapse.geometry import (
    MAX_BLOCK_ENTRIES,
    cosine_silhouette_samples,
    cosine_silhouettes,
    l2_normalized,
)
from exaonepath_core.evaluation.collapse.metrics import CollapseSettings, collapse_metrics
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
    SLIDE_METRICS,
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
from exaonepath_core.evaluation.collapse.probe import fit_softmax_probe, linear_probe_predictions
from exaonepath_core.evaluation.collapse.splits import grouped_site_split, slide_stratified_split

__all__ = [
    "ALL_METRICS", "CLASS_METRICS", "KNN_GAP", "KNN_LEAVE_ONE_SLIDE_OUT", "KNN_WITHIN_SLIDE", "MAX_BLOCK_ENTRIES",
    "SAME_SITE_NEIGHBOURS", "SAME_SLIDE_NEIGHBOURS", "SILHOUETTE_CLASS", "SILHOUETTE_SITE", "SILHOUETTE_SLIDE",
    "SITE_METRICS", "SITE_PROBE", "SITE_PROBE_OVER_CHANCE", "SLIDE_METRICS", "SLIDE_PROBE", "SLIDE_PROBE_OVER_CHANCE",
    "TABLE_COLUMNS", "UNLABELLED", "CollapseSettings", "NeighbourStatistics", "SlideBootstrap", "collapse_metrics",
    "cosine_silhouette_samples", "cosine_silhouettes", "fit_softmax_probe", "grouped_site_split", "hoeffding_bound",
    "l2_normalized", "linear_probe_predictions", "neighbour_statistics", "slide_stratified_split",
]
