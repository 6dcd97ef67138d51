"""Data: tiling, stain normalisation, patch stores, synthetic cohorts, downstream datasets."""
