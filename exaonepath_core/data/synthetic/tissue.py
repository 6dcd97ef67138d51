"""Tissue of one slide: the class map (the answer key) with per-region attributes, and periodic textures.

Morphology alone carries the tissue label: regions of a warped Voronoi layout get balanced classes, and
each region varies fibre orientation, nuclear density and stain uptake as real tissue does, independently of
the site. Textures are periodic tables (looked up modulo `TEXTURE_PX`), so any strip renders seamlessly.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from exaonepath_core.data.synthetic.spec import BACKGROUND, CLASS_NAMES, CohortSpec

TEXTURE_PX = 512  # period of the texture tables (256 um at 0.5 um/px: repetition is not visible in a tile)
N_FIBRE_ORIENTATIONS = 4
REGION_VARIATION = 0.3  # per-region nuclear density in [1-v, 1+v]
# per-region H and E uptake in [1-u, 1+u] (larger hides the site colours in raw tiles)
_UPTAKE_VARIATION = 0.1


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(sigma, 0.5), mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def layout_class_map(spec: CohortSpec, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Low-res class map (int8, -1 background) from warped Voronoi regions, plus per-cell region attributes.

    The attributes (fibre orientation, nuclear density, H and E uptake, section thickness) vary morphology and
    staining between regions of one class, as real tissue does, independently of the site.
    """
    size, ds = spec.slide_size_px, spec.class_map_downsample
    cells = -(-size // ds)
    centres = (np.arange(cells) + 0.5) * ds
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    # Tissue: a lumpy ellipse, thresholded at the quantile that gives the requested tissue fraction.
    cy, cx = size / 2 + rng.normal(0, size * 0.03, 2)
    ay, ax = size * rng.uniform(0.42, 0.5, 2)
    radial = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    score = 1.0 - radial + 0.25 * _smooth_noise(rng, (cells, cells), size / 8 / ds)
    tissue = score > np.quantile(score, 1.0 - spec.tissue_fraction)
    # Regions: jittered grid of seeds, coordinates warped by smooth noise so borders are irregular.
    n = max(1, round(size / spec.region_px))
    step = size / n
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    seeds = np.stack([(gy + 0.5 + rng.uniform(-0.35, 0.35, gy.shape)) * step,
                      (gx + 0.5 + rng.uniform(-0.35, 0.35, gx.shape)) * step], axis=-1).reshape(-1, 2)
    warp = 0.25 * step
    wy = yy + warp * _smooth_noise(rng, (cells, cells), step / 3 / ds)
    wx = xx + warp * _smooth_noise(rng, (cells, cells), step / 3 / ds)
    _, region = cKDTree(seeds).query(np.stack([wy.ravel(), wx.ravel()], axis=1))
    region = region.reshape(cells, cells)
    # Balanced classes over the regions that hold tissue (largest first, so every class gets real area).
    area = np.bincount(region[tissue], minlength=len(seeds))
    tissue_regions = [r for r in np.argsort(-area, kind="stable") if area[r] > 0]
    region_class = np.full(len(seeds), BACKGROUND, dtype=np.int8)
    order = np.concatenate([rng.permutation(len(CLASS_NAMES))
                            for _ in range(-(-len(tissue_regions) // len(CLASS_NAMES)))])
    region_class[tissue_regions] = order[: len(tissue_regions)]
    class_map = np.where(tissue, region_class[region], BACKGROUND).astype(np.int8)
    v, u = REGION_VARIATION, _UPTAKE_VARIATION
    thickness = 1.0 + 0.06 * np.clip(_smooth_noise(rng, (cells, cells), size / 10 / ds), -2, 2) / 2
    attributes = {
        "orientation": rng.integers(0, N_FIBRE_ORIENTATIONS, len(seeds)).astype(np.int8)[region],
        "density": rng.uniform(1 - v, 1 + v, len(seeds))[region].astype(np.float32),
        "h_uptake": (rng.uniform(1 - u, 1 + u, len(seeds))[region] * thickness).astype(np.float32),
        "e_uptake": (rng.uniform(1 - u, 1 + u, len(seeds))[region] * thickness).astype(np.float32),
    }
    return class_map, attributes


def _periodic_texture(rng: np.random.Generator, gain: Any) -> np.ndarray:
    """Filtered white noise on a torus (so lookups modulo the period are seamless), zero mean, unit std."""
    p = TEXTURE_PX
    k = np.fft.fftfreq(p)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    spectrum = np.fft.fft2(rng.standard_normal((p, p))) * gain(ky, kx)
    field = np.real(np.fft.ifft2(spectrum))
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _adipocyte_membranes(rng: np.random.Generator) -> np.ndarray:
    """Periodic Voronoi cell walls (fat cells 60-80 px across), 1 on the membrane, 0 inside."""
    p, n = TEXTURE_PX, 7
    step = p / n
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    seeds = np.stack([(gy + 0.5 + rng.uniform(-0.3, 0.3, gy.shape)) * step,
                      (gx + 0.5 + rng.uniform(-0.3, 0.3, gx.shape)) * step], axis=-1).reshape(-1, 2) % p
    yy, xx = np.meshgrid(np.arange(p) + 0.5, np.arange(p) + 0.5, indexing="ij")
    dist, _ = cKDTree(seeds, boxsize=p).query(np.stack([yy.ravel(), xx.ravel()], axis=1), k=2)
    half_gap = (dist[:, 1] - dist[:, 0]) / 2  # distance to the bisector between the two nearest cells
    return np.clip(1.6 - half_gap, 0.0, 1.0).reshape(p, p).astype(np.float32)


def slide_textures(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every periodic texture one slide needs, drawn from the slide's generator."""
    textures: dict[str, np.ndarray] = {}
    fibres = []
    for i in range(N_FIBRE_ORIENTATIONS):
        theta = math.pi * i / N_FIBRE_ORIENTATIONS
        c, s = math.cos(theta), math.sin(theta)

        def fibre_gain(ky: np.ndarray, kx: np.ndarray, c: float = c, s: float = s) -> np.ndarray:
            along = kx * c + ky * s  # frequencies along the fibre: kept low, so fibres are long
            across = -kx * s + ky * c  # across the fibre: a band around 1/12 px, so bundles are thin
            return np.exp(-(along / 0.02) ** 2) * np.exp(-((np.abs(across) - 1 / 12) / 0.05) ** 2)

        t = _periodic_texture(rng, fibre_gain)
        fibres.append(np.clip(0.5 + 0.45 * t, 0.0, 1.0) ** 1.5)
    textures["fibre"] = np.stack(fibres)

    def radial(f0: float, bw: float) -> Any:
        return lambda ky, kx: np.exp(-((np.hypot(ky, kx) - f0) / bw) ** 2)

    def lowpass(f: float) -> Any:
        return lambda ky, kx: np.exp(-(np.hypot(ky, kx) / f) ** 2)

    # Mucin: thin strands along the zero-crossings of smooth noise.
    textures["wisp"] = np.exp(-(_periodic_texture(rng, lowpass(1 / 40)) / 0.35) ** 2).astype(np.float32)
    textures["granular"] = _periodic_texture(rng, radial(1 / 5, 1 / 12))
    textures["cytoplasm"] = _periodic_texture(rng, lowpass(1 / 15))
    # Gland lumens in tumour: the top ~10% of a blob field, soft-edged.
    textures["lumen"] = np.clip((_periodic_texture(rng, lowpass(1 / 45)) - 1.3) * 3.0, 0.0, 1.0)
    textures["membrane"] = _adipocyte_membranes(rng)
    return textures
