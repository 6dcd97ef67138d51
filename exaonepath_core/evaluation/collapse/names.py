"""The collapse table's vocabulary: metric names (its rows), their groups, its columns, the unlabelled code."""
from __future__ import annotations

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

UNLABELLED = -1  # class code of a patch without a tissue label
