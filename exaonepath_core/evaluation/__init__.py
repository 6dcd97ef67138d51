"""Evaluation: features, linear probes, collapse metrics, published numbers."""
