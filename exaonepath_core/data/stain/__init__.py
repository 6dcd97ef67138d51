"""Macenko stain normalisation and stain augmentation of uint8 H&E patches, lowest module first.

- `reference`: the target stain vectors and concentrations (`MacenkoReference`) and the estimate's defaults.
- `percentiles`: exact nearest-rank order statistics of many rows at once (torch).
- `batched`: the batched torch Macenko estimate and normalisation (CPU and CUDA).
- `percentile_kernels`, `kernels`: the fused numba kernels of the CPU path; `fused` runs them over threads.
- `macenko`: the entry points, `macenko_normalize_batch`, `fit_reference`, `MacenkoNormalizer`.
- `augment`: random H and E perturbation in each patch's own stain basis (`stain_augment_batch`).
- `qc`: the before/after QC figure (`plot_stain_qc`).

Import from the module that defines a name; this package re-exports nothing.
"""
