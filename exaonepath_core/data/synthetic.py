"""The controlled synthetic multi-site cohort: pyramidal TIFF slides whose tissue classes and stains are known.

Why it exists: the paper's "WSI-specific feature collapse" needs many slides whose staining differs by lab
while morphology alone carries the tissue label. Here morphology (nuclear size/density/shape, fibres, fat
cells, mucin strands, debris) is drawn as hematoxylin and eosin concentration maps, one low-resolution class
map per slide is the answer key, and colour comes only from Beer-Lambert rendering
``I = Io * exp(-(C_H * h + C_E * e))`` with a stain matrix per site plus smaller per-slide perturbations
(vector angle, concentration scale, brightness, blur; JPEG noise from the tiles). So colour signals site and
slide and nothing else.

Slides are rendered in strips of one tile row from deterministic functions of level-0 coordinates (object
processes generated per grid row from their own seeds, periodic textures), so memory stays bounded as the
slide grows and the pixels do not depend on the strip size. Every pyramid level is its own top-level tiled
TIFF page (OpenSlide's generic-tiff reader); reduced levels are built from the previous one through a
memory-mapped scratch file.

Files per slide in ``out_dir``: ``<slide_id>.tiff``, ``<slide_id>.json`` (sidecar: site, seed, stain
parameters, class names, class-map file and its downsample) and ``<slide_id>_classmap.npy`` (int8, -1 =
background). Plus ``spec.json`` and ``manifest.csv`` for the cohort.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from exaonepath_core.io import atomic

GENERATOR_VERSION = "5"
CLASS_NAMES: tuple[str, ...] = ("tumor", "stroma", "lymphocytes", "adipose", "mucin", "necrosis")
BACKGROUND = -1
TUMOR, STROMA, LYMPHOCYTES, ADIPOSE, MUCIN, NECROSIS = range(len(CLASS_NAMES))

# The reference H&E optical-density vectors (RGB order) commonly used as the Macenko target; sites are
# rotations of these, as different labs' haematoxylin and eosin batches and scanners shift hue.
H_REFERENCE = np.array([0.5626, 0.7201, 0.4062])
E_REFERENCE = np.array([0.2159, 0.8012, 0.5581])

_TEXTURE_PX = 512  # period of the texture tables (256 um at 0.5 um/px: repetition is not visible in a tile)
_OBJECT_ROW_PX = 64  # height of the grid rows that own the nuclei seeds
_MARGIN_PX = 24  # rows rendered above and below a strip so blur and nuclei cross strip borders seamlessly
_N_FIBRE_ORIENTATIONS = 4
# Focus blur is drawn per slide around one value for all sites: a site-level sharpness difference would be a
# non-colour site signal that stain normalization cannot remove, blurring the experiment's answer key.
_SITE_BLUR_SIGMA = 0.5
# Likewise the glass brightness Io is drawn per slide: Macenko assumes one Io (240), so a per-site Io would
# survive normalization as a site offset in optical density.
_SITE_IO = 245.0

# Nuclear morphology per class (level-0 px at 0.5 um/px). Density is nuclei per px^2; radius is the major
# semi-axis; aspect = major/minor; rim > 0 makes a vesicular nucleus (paler centre); irregularity is the
# amplitude of a 3-lobed outline (pleomorphism, karyorrhexis).
_NUCLEI = {
    #              density  r_min r_max asp_min asp_max int_min int_max rim  irregularity
    TUMOR:        (2.2e-3,  6.5, 12.0, 1.0, 1.7, 0.75, 1.20, 0.55, 0.25),
    STROMA:       (4.0e-4,  7.0, 11.0, 3.0, 4.5, 0.90, 1.30, 0.10, 0.05),
    LYMPHOCYTES:  (7.5e-3,  3.5, 4.8, 1.0, 1.15, 1.30, 1.80, 0.00, 0.04),
    ADIPOSE:      (6.0e-5,  6.0, 9.0, 3.0, 4.0, 0.70, 1.00, 0.10, 0.05),
    MUCIN:        (1.2e-4,  4.0, 6.0, 1.0, 1.3, 0.60, 0.90, 0.10, 0.10),
    NECROSIS:     (5.0e-3,  1.2, 3.0, 1.0, 2.0, 0.90, 1.60, 0.00, 0.35),
}
_NUCLEI_TABLE = np.array([_NUCLEI[c] for c in range(len(CLASS_NAMES))], dtype=np.float64)
_REGION_VARIATION = 0.3  # per-region nuclear density in [1-v, 1+v]
_UPTAKE_VARIATION = 0.1  # per-region H and E uptake in [1-u, 1+u] (larger hides the site colours in raw tiles)
_MAX_DENSITY = float(_NUCLEI_TABLE[:, 0].max()) * (1 + _REGION_VARIATION)
_MAX_NUCLEUS_EXTENT = math.ceil(float((_NUCLEI_TABLE[:, 2] * (1 + _NUCLEI_TABLE[:, 8])).max())) + 2


@dataclass(frozen=True)
class CohortSpec:
    """Size and seed of a synthetic cohort; everything else follows deterministically from it."""

    n_sites: int = 4
    slides_per_site: int = 6
    slide_size_px: int = 3072  # level-0 width and height
    mpp: float = 0.5  # level-0 microns per pixel
    tile_px: int = 256  # TIFF tile size
    n_levels: int = 3
    level_downsample: int = 4  # between consecutive levels
    compression: str = "jpeg"  # "jpeg" or "deflate"
    jpeg_quality: int = 90
    seed: int = 0
    region_px: int = 512  # typical size of one tissue-class region at level 0
    class_map_downsample: int = 8  # class map cell size in level-0 px
    tissue_fraction: float = 0.7  # fraction of the slide area covered by tissue

    def __post_init__(self) -> None:
        errors = []
        for name in ("n_sites", "slides_per_site", "slide_size_px", "tile_px", "n_levels", "level_downsample",
                     "region_px", "class_map_downsample"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                errors.append(f"{name} must be a positive int, got {value!r}")
        if errors:
            raise ValueError("invalid CohortSpec: " + "; ".join(errors))
        if self.compression not in ("jpeg", "deflate"):
            errors.append(f"compression must be 'jpeg' or 'deflate', got {self.compression!r}")
        if not (isinstance(self.mpp, (int, float)) and self.mpp > 0):
            errors.append(f"mpp must be > 0, got {self.mpp!r}")
        if self.tile_px % 16:
            errors.append(f"tile_px must be a multiple of 16 (TIFF tiles), got {self.tile_px}")
        if self.n_levels > 1 and (self.level_downsample < 2 or self.tile_px % self.level_downsample):
            errors.append(f"level_downsample must be >= 2 and divide tile_px ({self.tile_px}), "
                          f"got {self.level_downsample}")
        smallest = self.slide_size_px // self.level_downsample ** (self.n_levels - 1)
        if smallest < 16:
            errors.append(f"the smallest level would be {smallest} px wide: use fewer levels or larger slides")
        if not 1 <= self.jpeg_quality <= 100:
            errors.append(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0.2 <= self.tissue_fraction <= 0.95:
            errors.append(f"tissue_fraction must be in [0.2, 0.95], got {self.tissue_fraction}")
        regions_in_tissue = (self.slide_size_px / self.region_px) ** 2 * self.tissue_fraction
        if regions_in_tissue < len(CLASS_NAMES):
            errors.append(f"about {regions_in_tissue:.1f} class regions fit in the tissue, fewer than the "
                          f"{len(CLASS_NAMES)} classes: lower region_px or raise slide_size_px")
        if self.class_map_downsample > self.region_px // 4:
            errors.append(f"class_map_downsample ({self.class_map_downsample}) must be <= region_px/4")
        if errors:
            raise ValueError("invalid CohortSpec: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored as spec.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CohortSpec:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CohortSpec keys: {unknown}")
        return cls(**data)

    def digest(self) -> str:
        """Short hash of the spec and generator version: equal digests mean byte-identical cohorts."""
        text = json.dumps({"spec": self.to_dict(), "generator_version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StainParams:
    """How one site or slide turns concentrations into RGB: unit OD vectors (RGB), scales, Io, blur."""

    h_od: tuple[float, float, float]
    e_od: tuple[float, float, float]
    h_scale: float
    e_scale: float
    io: float
    blur_sigma: float

    def matrix(self) -> np.ndarray:
        """The 3x2 stain matrix [h | e] (RGB rows), as in Macenko's HE matrix."""
        return np.stack([self.h_od, self.e_od], axis=1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------------------------- stains


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.arccos(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0)))


def _rotate_randomly(v: np.ndarray, angle_rad: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector `v` by `angle_rad` towards a random orthogonal direction; OD stays positive."""
    u = rng.standard_normal(3)
    u -= np.dot(u, v) * v
    u = _unit(u)
    w = math.cos(angle_rad) * v + math.sin(angle_rad) * u
    return _unit(np.clip(w, 0.02, None))


def _stains_are_plausible(h: np.ndarray, e: np.ndarray) -> bool:
    # Macenko tells H from E by the larger red OD; keep that true and the two vectors apart.
    # Every OD component stays >= 0.1: a stain that barely absorbs one channel leaves its pixels below
    # Macenko's per-channel beta threshold, which real H&E does not do.
    return (_angle(h, e) > math.radians(15) and h[0] > e[0] + 0.15 and bool(np.all(h >= 0.1))
            and bool(np.all(e >= 0.1)))


def site_stain_params(spec: CohortSpec) -> list[StainParams]:
    """One stain setting per site: H/E vectors rotated 8-20 degrees from the reference, mutually distinct."""
    rng = np.random.default_rng([spec.seed, 0x517E])
    sites: list[StainParams] = []
    attempts = 0
    while len(sites) < spec.n_sites:
        attempts += 1
        if attempts > 100_000:
            raise RuntimeError("could not draw plausible site stains")
        h = _rotate_randomly(H_REFERENCE / np.linalg.norm(H_REFERENCE), math.radians(rng.uniform(8, 20)), rng)
        e = _rotate_randomly(E_REFERENCE / np.linalg.norm(E_REFERENCE), math.radians(rng.uniform(8, 20)), rng)
        h_scale, e_scale = rng.uniform(0.75, 1.35), rng.uniform(0.7, 1.35)
        if not _stains_are_plausible(h, e):
            continue
        # Many sites cannot all be 8 degrees apart: relax the separation after enough tries.
        min_separation = math.radians(8) if attempts < 5_000 else 0.0
        if any(max(_angle(h, np.array(s.h_od)), _angle(e, np.array(s.e_od))) < min_separation for s in sites):
            continue
        sites.append(StainParams(tuple(map(float, h)), tuple(map(float, e)), float(h_scale), float(e_scale),
                                 _SITE_IO, _SITE_BLUR_SIGMA))
    return sites


def _slide_stain_params(site: StainParams, rng: np.random.Generator) -> StainParams:
    """Per-slide perturbation of a site's stains, smaller than the differences between sites."""
    h0, e0 = np.array(site.h_od), np.array(site.e_od)
    for _ in range(1000):
        h = _rotate_randomly(h0, math.radians(min(abs(rng.normal(0, 2.0)), 5.0)), rng)
        e = _rotate_randomly(e0, math.radians(min(abs(rng.normal(0, 2.0)), 5.0)), rng)
        if _stains_are_plausible(h, e):
            break
    else:  # pragma: no cover - the site itself is plausible, so a small jitter almost never fails
        h, e = h0, e0
    return StainParams(
        tuple(map(float, h)), tuple(map(float, e)),
        h_scale=float(site.h_scale * math.exp(rng.normal(0, 0.06))),
        e_scale=float(site.e_scale * math.exp(rng.normal(0, 0.06))),
        io=float(site.io + rng.uniform(-5, 5)),
        blur_sigma=float(site.blur_sigma + rng.uniform(-0.2, 0.2)),
    )


# ------------------------------------------------------------------------------------- layout + textures


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(sigma, 0.5), mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _layout_class_map(spec: CohortSpec, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
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
    v = _REGION_VARIATION
    thickness = 1.0 + 0.06 * np.clip(_smooth_noise(rng, (cells, cells), size / 10 / ds), -2, 2) / 2
    attributes = {
        "orientation": rng.integers(0, _N_FIBRE_ORIENTATIONS, len(seeds)).astype(np.int8)[region],
        "density": rng.uniform(1 - v, 1 + v, len(seeds))[region].astype(np.float32),
        "h_uptake": (rng.uniform(1 - _UPTAKE_VARIATION, 1 + _UPTAKE_VARIATION, len(seeds))[region] * thickness).astype(np.float32),
        "e_uptake": (rng.uniform(1 - _UPTAKE_VARIATION, 1 + _UPTAKE_VARIATION, len(seeds))[region] * thickness).astype(np.float32),
    }
    return class_map, attributes


def _periodic_texture(rng: np.random.Generator, gain: Any) -> np.ndarray:
    """Filtered white noise on a torus (so lookups modulo the period are seamless), zero mean, unit std."""
    p = _TEXTURE_PX
    k = np.fft.fftfreq(p)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    spectrum = np.fft.fft2(rng.standard_normal((p, p))) * gain(ky, kx)
    field = np.real(np.fft.ifft2(spectrum))
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _adipocyte_membranes(rng: np.random.Generator) -> np.ndarray:
    """Periodic Voronoi cell walls (fat cells 60-80 px across), 1 on the membrane, 0 inside."""
    p, n = _TEXTURE_PX, 7
    step = p / n
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    seeds = np.stack([(gy + 0.5 + rng.uniform(-0.3, 0.3, gy.shape)) * step,
                      (gx + 0.5 + rng.uniform(-0.3, 0.3, gx.shape)) * step], axis=-1).reshape(-1, 2) % p
    yy, xx = np.meshgrid(np.arange(p) + 0.5, np.arange(p) + 0.5, indexing="ij")
    dist, _ = cKDTree(seeds, boxsize=p).query(np.stack([yy.ravel(), xx.ravel()], axis=1), k=2)
    half_gap = (dist[:, 1] - dist[:, 0]) / 2  # distance to the bisector between the two nearest cells
    return np.clip(1.6 - half_gap, 0.0, 1.0).reshape(p, p).astype(np.float32)


def _slide_textures(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every periodic texture one slide needs, drawn from the slide's generator."""
    textures: dict[str, np.ndarray] = {}
    fibres = []
    for i in range(_N_FIBRE_ORIENTATIONS):
        theta = math.pi * i / _N_FIBRE_ORIENTATIONS
        c, s = math.cos(theta), math.sin(theta)

        def fibre_gain(ky: np.ndarray, kx: np.ndarray, c: float = c, s: float = s) -> np.ndarray:
            along = kx * c + ky * s  # frequencies along the fibre: kept low, so fibres are long
            across = -kx * s + ky * c  # across the fibre: a band around 1/12 px, so bundles are thin
            return np.exp(-(along / 0.02) ** 2) * np.exp(-((np.abs(across) - 1 / 12) / 0.05) ** 2)

        t = _periodic_texture(rng, fibre_gain)
        fibres.append(np.clip(0.5 + 0.45 * t, 0.0, 1.0) ** 1.5)
    textures["fibre"] = np.stack(fibres)
    radial = lambda f0, bw: (lambda ky, kx: np.exp(-((np.hypot(ky, kx) - f0) / bw) ** 2))
    lowpass = lambda f: (lambda ky, kx: np.exp(-(np.hypot(ky, kx) / f) ** 2))
    # Mucin: thin strands along the zero-crossings of smooth noise.
    textures["wisp"] = np.exp(-(_periodic_texture(rng, lowpass(1 / 40)) / 0.35) ** 2).astype(np.float32)
    textures["granular"] = _periodic_texture(rng, radial(1 / 5, 1 / 12))
    textures["cytoplasm"] = _periodic_texture(rng, lowpass(1 / 15))
    # Gland lumens in tumour: the top ~10% of a blob field, soft-edged.
    textures["lumen"] = np.clip((_periodic_texture(rng, lowpass(1 / 45)) - 1.3) * 3.0, 0.0, 1.0)
    textures["membrane"] = _adipocyte_membranes(rng)
    return textures


# ---------------------------------------------------------------------------------------------- rendering


@dataclass
class _SlideContext:
    """Everything needed to render any row range of one slide (built once per slide, read-only after)."""

    spec: CohortSpec
    entropy: tuple[int, ...]
    class_map: np.ndarray
    region_maps: dict[str, np.ndarray]
    textures: dict[str, np.ndarray]
    stain: StainParams

    @property
    def size(self) -> int:
        return self.spec.slide_size_px


def _slide_entropy(spec: CohortSpec, site: int, slide: int) -> tuple[int, ...]:
    return (int(spec.seed), 0x5EED, int(site), int(slide))


def _build_context(spec: CohortSpec, site: int, slide: int, site_stain: StainParams) -> _SlideContext:
    entropy = _slide_entropy(spec, site, slide)
    rng = np.random.default_rng(list(entropy))
    stain = _slide_stain_params(site_stain, rng)
    class_map, region_maps = _layout_class_map(spec, rng)
    textures = _slide_textures(rng)
    return _SlideContext(spec, entropy, class_map, region_maps, textures, stain)


def _class_at(ctx: _SlideContext, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Class under level-0 points (float or int coords); -1 outside the slide."""
    ds = ctx.spec.class_map_downsample
    yi, xi = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    inside = (yi >= 0) & (yi < ctx.size) & (xi >= 0) & (xi < ctx.size)
    out = np.full(yi.shape, BACKGROUND, dtype=np.int8)
    out[inside] = ctx.class_map[yi[inside] // ds, xi[inside] // ds]
    return out


def _nuclei_in_row(ctx: _SlideContext, row: int) -> dict[str, np.ndarray]:
    """Nuclei whose centres lie in grid row `row`; a thinned Poisson process, seeded by the row alone."""
    rng = np.random.default_rng([*ctx.entropy, 0x0B1, row])
    width = ctx.size
    n = int(rng.poisson(_MAX_DENSITY * _OBJECT_ROW_PX * width))
    # A fixed number of uniforms per candidate keeps the stream aligned whatever the classes are.
    u = rng.random((n, 9))
    x = u[:, 0] * width
    y = (row + u[:, 1]) * _OBJECT_ROW_PX
    cls = _class_at(ctx, y, x)
    tissue = cls >= 0
    table = _NUCLEI_TABLE[np.where(tissue, cls, 0)]
    ds = ctx.spec.class_map_downsample
    cell_y = np.clip(y.astype(np.int64) // ds, 0, ctx.class_map.shape[0] - 1)
    cell_x = np.clip(x.astype(np.int64) // ds, 0, ctx.class_map.shape[1] - 1)
    density = table[:, 0] * ctx.region_maps["density"][cell_y, cell_x]
    keep = tissue & (u[:, 2] < density / _MAX_DENSITY)
    p = _TEXTURE_PX
    in_lumen = ctx.textures["lumen"][y.astype(np.int64) % p, x.astype(np.int64) % p] > 0.3
    keep &= ~((cls == TUMOR) & in_lumen)
    u, x, y, cls, table = u[keep], x[keep], y[keep], cls[keep], table[keep]
    lerp = lambda lo, hi, t: lo + (hi - lo) * t
    r_major = lerp(table[:, 1], table[:, 2], u[:, 3])
    aspect = lerp(table[:, 3], table[:, 4], u[:, 4])
    theta = u[:, 5] * math.pi
    # Stromal nuclei lie along their fibres.
    oriented = cls == STROMA
    if oriented.any():
        ori = ctx.region_maps["orientation"][y[oriented].astype(np.int64) // ds, x[oriented].astype(np.int64) // ds]
        theta[oriented] = ori * math.pi / _N_FIBRE_ORIENTATIONS + (u[oriented, 5] - 0.5) * 0.3
    return {"x": x, "y": y, "rx": r_major, "ry": r_major / aspect, "theta": theta,
                "intensity": lerp(table[:, 5], table[:, 6], u[:, 6]), "rim": table[:, 7],
                "irregularity": table[:, 8] * (0.5 + 0.5 * u[:, 8]), "phase": u[:, 7] * 2 * math.pi}


def _nuclei_in_rows(ctx: _SlideContext, y_lo: int, y_hi: int) -> dict[str, np.ndarray]:
    first, last = max(0, y_lo // _OBJECT_ROW_PX), min((ctx.size - 1) // _OBJECT_ROW_PX, y_hi // _OBJECT_ROW_PX)
    rows = [_nuclei_in_row(ctx, r) for r in range(first, last + 1)]
    keys = ("x", "y", "rx", "ry", "theta", "intensity", "rim", "irregularity", "phase")
    return {k: np.concatenate([r[k] for r in rows]) if rows else np.zeros(0) for k in keys}


def _stamp_nuclei(nuclei: dict[str, np.ndarray], y0: int, height: int, width: int) -> np.ndarray:
    """Hematoxylin of all nuclei summed into a flat (height*width) float32 window starting at row y0."""
    acc = np.zeros(height * width, dtype=np.float64)
    if len(nuclei["x"]) == 0:
        return acc.astype(np.float32)
    half = np.ceil(nuclei["rx"] * (1 + nuclei["irregularity"])).astype(np.int64) + 1
    for h in np.unique(half):
        sel = half == h
        k = np.arange(-h, h + 1)
        def f32(name: str, sel: np.ndarray = sel) -> np.ndarray:
            return nuclei[name][sel][:, None, None].astype(np.float32)

        cx, cy = nuclei["x"][sel][:, None, None], nuclei["y"][sel][:, None, None]
        px = np.floor(cx).astype(np.int64) + k[None, None, :]
        py = np.floor(cy).astype(np.int64) + k[None, :, None]
        # Offsets from the centre in float32 (the stamp arithmetic dominates the render time).
        du = (k[None, None, :] + 0.5 - (cx - np.floor(cx))).astype(np.float32)
        dv = (k[None, :, None] + 0.5 - (cy - np.floor(cy))).astype(np.float32)
        c, s = np.cos(f32("theta")), np.sin(f32("theta"))
        a, b = du * c + dv * s, -du * s + dv * c
        rx, ry = f32("rx"), f32("ry")
        q = np.sqrt((a / rx) ** 2 + (b / ry) ** 2)
        # Lobed outline (pleomorphism): r(phi) scaled by 1 + amp*(0.6 cos(2phi+p) + 0.4 cos(3phi+p')),
        # with the harmonics expanded in cos/sin of phi (cheaper than arctan2).
        radius = np.sqrt(a * a + b * b) + 1e-6
        cos1, sin1 = a / radius, b / radius
        cos2, sin2 = 2 * cos1 * cos1 - 1, 2 * sin1 * cos1
        cos3, sin3 = cos1 * (4 * cos1 * cos1 - 3), sin1 * (3 - 4 * sin1 * sin1)
        amp, phase = f32("irregularity"), f32("phase")
        lobes = 0.6 * (cos2 * np.cos(phase) - sin2 * np.sin(phase)) \
            + 0.4 * (cos3 * np.cos(2 * phase) - sin3 * np.sin(2 * phase))
        q = q / (1 + amp * lobes)
        edge = np.clip((1 - q) * np.sqrt(rx * ry) + 0.5, 0.0, 1.0)  # about one pixel of soft border
        rim = f32("rim")
        value = f32("intensity") * edge * (1 - rim + rim * np.minimum(q, 1.0))
        row = py - y0
        ok = (value > 0) & (row >= 0) & (row < height) & (px >= 0) & (px < width)
        ok = np.broadcast_to(ok, value.shape)
        flat = np.broadcast_to(row * width + px, value.shape)[ok]
        acc += np.bincount(flat, weights=value[ok], minlength=height * width)
    return acc.astype(np.float32)


def _concentrations(ctx: _SlideContext, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (float32, (y1-y0, width)) of level-0 rows [y0, y1)."""
    width, p, ds = ctx.size, _TEXTURE_PX, ctx.spec.class_map_downsample
    height = y1 - y0
    rows = np.arange(y0, y1)
    inside = (rows >= 0) & (rows < ctx.size)
    row_cells = np.clip(rows // ds, 0, ctx.class_map.shape[0] - 1)
    col_cells = np.arange(width) // ds
    cls = ctx.class_map[row_cells][:, col_cells]
    cls[~inside] = BACKGROUND
    cls = cls.ravel()
    ch = np.zeros(height * width, dtype=np.float32)
    ce = np.zeros(height * width, dtype=np.float32)
    tex = ctx.textures

    def lookup(name: str, idx: np.ndarray) -> np.ndarray:
        return tex[name][(idx // width + y0) % p, (idx % width) % p]

    idx = np.flatnonzero(cls == TUMOR)
    open_ = 1.0 - lookup("lumen", idx)
    ce[idx] = (0.45 + 0.12 * lookup("cytoplasm", idx)) * open_
    ch[idx] = 0.06 * open_
    idx = np.flatnonzero(cls == STROMA)
    ori = ctx.region_maps["orientation"][(idx // width + y0).clip(0, ctx.size - 1) // ds, (idx % width) // ds]
    fibre = tex["fibre"][ori, (idx // width + y0) % p, (idx % width) % p]
    ce[idx] = 0.25 + 0.9 * fibre
    ch[idx] = 0.05
    idx = np.flatnonzero(cls == LYMPHOCYTES)
    ce[idx] = 0.25 + 0.05 * lookup("cytoplasm", idx)
    ch[idx] = 0.08
    idx = np.flatnonzero(cls == ADIPOSE)
    membrane = lookup("membrane", idx)
    ce[idx] = 0.04 + 0.8 * membrane
    ch[idx] = 0.02 + 0.12 * membrane
    idx = np.flatnonzero(cls == MUCIN)
    wisp = lookup("wisp", idx)
    ce[idx] = 0.18 + 0.3 * wisp
    ch[idx] = 0.22 + 0.35 * wisp  # mucin takes haematoxylin faintly: pale blue-grey strands
    idx = np.flatnonzero(cls == NECROSIS)
    grain = lookup("granular", idx)
    ce[idx] = np.clip(0.5 + 0.15 * grain, 0.05, None)
    ch[idx] = np.clip(0.14 + 0.08 * grain, 0.0, None)

    nuclei = _stamp_nuclei(_nuclei_in_rows(ctx, y0 - _MAX_NUCLEUS_EXTENT, y1 + _MAX_NUCLEUS_EXTENT),
                           y0, height, width)
    idx = np.flatnonzero(nuclei)
    nuclei[idx] *= 0.85 + 0.12 * lookup("granular", idx)  # chromatin texture
    ch += nuclei
    ce *= 1.0 - 0.6 * np.clip(nuclei, 0.0, 1.0)  # nuclei displace cytoplasm and fibres
    ch, ce = ch.reshape(height, width), ce.reshape(height, width)
    ch *= ctx.region_maps["h_uptake"][row_cells][:, col_cells]
    ce *= ctx.region_maps["e_uptake"][row_cells][:, col_cells]
    return ch, ce


def _render_rows(ctx: _SlideContext, y0: int, y1: int) -> np.ndarray:
    """RGB uint8 (y1-y0, width, 3) of level-0 rows [y0, y1): Beer-Lambert of the blurred concentrations."""
    ch, ce = _concentrations(ctx, y0 - _MARGIN_PX, y1 + _MARGIN_PX)
    st = ctx.stain
    ch *= st.h_scale
    ce *= st.e_scale
    if st.blur_sigma > 0.05:
        ch = ndimage.gaussian_filter(ch, st.blur_sigma, mode="nearest", truncate=3.0)
        ce = ndimage.gaussian_filter(ce, st.blur_sigma, mode="nearest", truncate=3.0)
    ch, ce = ch[_MARGIN_PX:-_MARGIN_PX], ce[_MARGIN_PX:-_MARGIN_PX]
    rgb = np.empty(ch.shape + (3,), dtype=np.uint8)
    for channel in range(3):
        od = ch * np.float32(-st.h_od[channel])
        od -= ce * np.float32(st.e_od[channel])
        np.exp(od, out=od)
        od *= np.float32(st.io)
        od += np.float32(0.5)
        rgb[..., channel] = np.clip(od, 0, 255, out=od)
    return rgb


# -------------------------------------------------------------------------------------------- TIFF writing


def _tiles_of_strip(strip: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Full tiles of one strip, left to right; edges padded by replication (no black seams in JPEG blocks)."""
    _h, w = strip.shape[:2]
    for x0 in range(0, w, tile_px):
        tile = strip[:, x0:x0 + tile_px]
        if tile.shape[0] != tile_px or tile.shape[1] != tile_px:
            tile = np.pad(tile, ((0, tile_px - tile.shape[0]), (0, tile_px - tile.shape[1]), (0, 0)), mode="edge")
        yield np.ascontiguousarray(tile)


def _downsample_into(strip: np.ndarray, y0: int, factor: int, target: np.ndarray) -> None:
    """Box-average a strip of the finer level into rows y0/factor... of the coarser level array."""
    t0 = y0 // factor
    rows = min(strip.shape[0] // factor, target.shape[0] - t0)
    cols = target.shape[1]
    if rows <= 0:
        return
    block = strip[: rows * factor, : cols * factor].reshape(rows, factor, cols, factor, 3)
    mean = block.sum(axis=(1, 3), dtype=np.float32) / np.float32(factor * factor)
    target[t0:t0 + rows] = np.clip(mean + 0.5, 0, 255).astype(np.uint8)


def _write_pyramid(ctx: _SlideContext, path: Path, description: str) -> list[tuple[int, int]]:
    """Write the slide as a tiled pyramidal TIFF (every level a top-level page) to `path`; returns level sizes."""
    import tifffile

    spec = ctx.spec
    sizes = [(spec.slide_size_px // spec.level_downsample ** k,) * 2 for k in range(spec.n_levels)]
    compression: dict[str, Any] = (
        {"compression": "jpeg", "compressionargs": {"level": spec.jpeg_quality}} if spec.compression == "jpeg"
        else {"compression": "deflate", "compressionargs": {"level": 6}})
    bigtiff = spec.slide_size_px ** 2 * 3 * 1.4 > 2 ** 31
    with tempfile.TemporaryDirectory(prefix=".pyramid-", dir=path.parent) as scratch, \
            tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        # Reduced levels go through memory-mapped scratch arrays so RAM holds one strip, not a level.
        levels: list[np.ndarray | None] = [None] + [
            np.lib.format.open_memmap(Path(scratch) / f"level{k}.npy", mode="w+", dtype=np.uint8,
                                      shape=(sizes[k][1], sizes[k][0], 3)) for k in range(1, spec.n_levels)]

        def level_tiles(k: int) -> Iterator[np.ndarray]:
            height = sizes[k][1]
            for y0 in range(0, height, spec.tile_px):
                y1 = min(height, y0 + spec.tile_px)
                strip = _render_rows(ctx, y0, y1) if k == 0 else np.asarray(levels[k][y0:y1])
                if k + 1 < spec.n_levels:
                    _downsample_into(strip, y0, spec.level_downsample, levels[k + 1])
                yield from _tiles_of_strip(strip, spec.tile_px)

        for k, (w, h) in enumerate(sizes):
            mpp = spec.mpp * spec.level_downsample ** k
            tif.write(level_tiles(k), shape=(h, w, 3), dtype=np.uint8, tile=(spec.tile_px, spec.tile_px),
                      photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                      subfiletype=0 if k == 0 else 1, description=description if k == 0 else None,
                      metadata=None, software="exaonepath_core.data.synthetic", **compression)
        levels.clear()  # drop the memmaps before their scratch folder goes
    return sizes


def _atomic_write_bytes(path: Path, writer: Any) -> None:
    """Call writer(tmp_path) then move the result into place, so readers never see a half-written file."""
    with atomic.atomic_path(path) as tmp:
        writer(tmp)


# ----------------------------------------------------------------------------------------------- cohort


def slide_id_for(site: int, slide: int) -> str:
    """The slide id of slide `slide` of site `site` (also its file stem)."""
    return f"syn_s{site}_{slide:02d}"


def _generate_slide(out_dir: str, spec_dict: dict[str, Any], site: int, slide: int) -> dict[str, Any]:
    """Render one slide and its sidecar and class map (atomic writes); returns its manifest row."""
    spec = CohortSpec.from_dict(spec_dict)
    out = Path(out_dir)
    site_stain = site_stain_params(spec)[site]
    ctx = _build_context(spec, site, slide, site_stain)
    slide_id = slide_id_for(site, slide)
    tiff_path = out / f"{slide_id}.tiff"
    map_path = out / f"{slide_id}_classmap.npy"
    sidecar_path = out / f"{slide_id}.json"
    description = f"EXAONEPath synthetic slide {slide_id} site{site} spec {spec.digest()}"
    sizes: list[tuple[int, int]] = []

    def write_tiff(tmp: Path) -> None:
        sizes.extend(_write_pyramid(ctx, tmp, description))

    def write_map(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, ctx.class_map)

    _atomic_write_bytes(tiff_path, write_tiff)
    _atomic_write_bytes(map_path, write_map)
    counts = np.bincount(ctx.class_map[ctx.class_map >= 0], minlength=len(CLASS_NAMES))
    fractions = {name: float(c) / ctx.class_map.size for name, c in zip(CLASS_NAMES, counts)}
    sidecar = {
        "slide_id": slide_id, "site": f"site{site}", "site_index": site, "slide_index": slide,
        "seed": list(ctx.entropy), "spec_digest": spec.digest(), "generator_version": GENERATOR_VERSION,
        "width": spec.slide_size_px, "height": spec.slide_size_px, "mpp": spec.mpp,
        "level_dimensions": [list(s) for s in sizes],
        "level_downsamples": [spec.level_downsample ** k for k in range(spec.n_levels)],
        "stain": ctx.stain.to_dict(), "site_stain": site_stain.to_dict(),
        "class_names": list(CLASS_NAMES), "background_label": BACKGROUND,
        "class_map_path": map_path.name, "class_map_downsample": spec.class_map_downsample,
        "class_map_shape": list(ctx.class_map.shape), "class_area_fractions": fractions,
    }
    # The sidecar is written last: its presence with a matching digest marks the slide as complete.
    atomic.write_text(sidecar_path, json.dumps(sidecar, indent=1))
    return _manifest_row(out, sidecar)


def _manifest_row(out: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    st, site_st = sidecar["stain"], sidecar["site_stain"]
    row: dict[str, Any] = {
        "slide_id": sidecar["slide_id"], "site": sidecar["site"], "site_index": sidecar["site_index"],
        "slide_index": sidecar["slide_index"],
        "path": str((out / f"{sidecar['slide_id']}.tiff").resolve()),
        "sidecar_path": str((out / f"{sidecar['slide_id']}.json").resolve()),
        "class_map_path": str((out / sidecar["class_map_path"]).resolve()),
        "width": sidecar["width"], "height": sidecar["height"], "mpp": sidecar["mpp"],
        "n_levels": len(sidecar["level_dimensions"]),
    }
    for prefix, params in (("", st), ("site_", site_st)):
        for stain in ("h", "e"):
            for channel, value in zip("rgb", params[f"{stain}_od"]):
                row[f"{prefix}{stain}_od_{channel}"] = value
        for key in ("h_scale", "e_scale", "io", "blur_sigma"):
            row[f"{prefix}{key}"] = params[key]
    for name, fraction in sidecar["class_area_fractions"].items():
        row[f"area_{name}"] = fraction
    return row


def _complete_sidecar(out: Path, site: int, slide: int, digest: str) -> dict[str, Any] | None:
    """The sidecar of a finished slide of this spec, or None when the slide must be (re)generated."""
    slide_id = slide_id_for(site, slide)
    sidecar_path = out / f"{slide_id}.json"
    if not sidecar_path.is_file() or not (out / f"{slide_id}.tiff").is_file():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if sidecar.get("spec_digest") != digest or not (out / sidecar.get("class_map_path", "")).is_file():
        return None
    return sidecar


def _read_manifest(out: Path) -> pd.DataFrame:
    manifest = pd.read_csv(out / "manifest.csv")
    # Every file of the cohort lives in its folder: anchor the stored absolute paths to the folder being read,
    # so a cohort copied or moved elsewhere is read from where it is now, never from where it was written.
    for column in ("path", "sidecar_path", "class_map_path"):
        manifest[column] = [str((out / Path(p).name).resolve()) for p in manifest[column]]
    return manifest


def generate_cohort(out_dir: str | os.PathLike, spec: CohortSpec, force: bool = False, progress: bool = True,
                    workers: int | None = None) -> pd.DataFrame:
    """Generate (or reuse) the cohort in `out_dir`; returns the manifest also written to out_dir/manifest.csv.

    Reuse: an existing manifest of the same spec is returned untouched, and finished slides of an interrupted
    run are kept. A folder holding a different spec is refused unless `force` (then it is regenerated).
    `workers` processes render slides in parallel (default: up to 2, the CPU count otherwise).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path, manifest_path = out / "spec.json", out / "manifest.csv"
    wanted = {"spec": spec.to_dict(), "digest": spec.digest(), "generator_version": GENERATOR_VERSION}
    if spec_path.is_file():
        try:
            stored = json.loads(spec_path.read_text())
        except json.JSONDecodeError as err:
            if not force:
                raise FileExistsError(f"{spec_path} is not valid JSON ({err}); pass force=True to regenerate "
                                      f"the cohort or choose another folder") from err
            stored = {}
        # The same spec from an older generator version (another digest) is a stale cache of ours: it is
        # regenerated below without asking; only a different spec is refused.
        if not force and stored.get("spec") != wanted["spec"]:
            raise FileExistsError(
                f"{out} holds a synthetic cohort of another spec ({stored.get('spec')}); "
                f"pass force=True to regenerate it or choose another folder")
        if stored.get("digest") == wanted["digest"] and manifest_path.is_file() and not force:
            manifest = _read_manifest(out)
            missing = [p for p in manifest["path"] if not Path(p).is_file()]
            if not missing and len(manifest) == spec.n_sites * spec.slides_per_site:
                return manifest
    if manifest_path.exists():
        manifest_path.unlink()  # stale until the new one is complete
    atomic.write_text(spec_path, json.dumps(wanted, indent=1, sort_keys=True))

    jobs = [(site, slide) for site in range(spec.n_sites) for slide in range(spec.slides_per_site)]
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    todo = []
    for site, slide in jobs:
        sidecar = None if force else _complete_sidecar(out, site, slide, spec.digest())
        if sidecar is None:
            todo.append((site, slide))
        else:
            rows[(site, slide)] = _manifest_row(out, sidecar)
    workers = min(len(todo), workers if workers is not None else min(2, os.cpu_count() or 1)) if todo else 0
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"synthetic slides -> {out.name}", unit="slide")
    try:
        if workers <= 1:
            for site, slide in todo:
                rows[(site, slide)] = _generate_slide(str(out), spec.to_dict(), site, slide)
                if bar is not None:
                    bar.update()
        else:
            # fork: spawn would re-run an unguarded calling script (no `if __name__ == "__main__"`) in every
            # worker. The workers use only numpy/scipy code paths without thread pools, so inheriting a parent's
            # torch/OpenMP threads is harmless here.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
                futures = {pool.submit(_generate_slide, str(out), spec.to_dict(), site, slide): (site, slide)
                           for site, slide in todo}
                for future in as_completed(futures):
                    rows[futures[future]] = future.result()
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    manifest = pd.DataFrame([rows[job] for job in jobs])
    _atomic_write_bytes(manifest_path, lambda tmp: manifest.to_csv(tmp, index=False))
    return manifest


# ------------------------------------------------------------------------------------------ answer key


def load_sidecar(sidecar_path: str | os.PathLike) -> dict[str, Any]:
    """Read a slide's sidecar JSON."""
    return json.loads(Path(sidecar_path).read_text())


def load_class_map(sidecar_path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The slide's class map (int8, -1 background) and its downsample relative to level 0."""
    sidecar = load_sidecar(sidecar_path)
    class_map = np.load(Path(sidecar_path).parent / sidecar["class_map_path"])
    return class_map, int(sidecar["class_map_downsample"])


def tile_class_labels(sidecar_path: str | os.PathLike, coords: np.ndarray, level0_patch_size: int,
                      min_purity: float = 0.6) -> np.ndarray:
    """Majority class (int, (N,)) under each level-0 tile at `coords` (x, y top-left); -1 for background/mixed.

    Counts the class-map cells whose centres fall inside the tile (the cell under the tile centre when none
    does); cells outside the slide count as background. A tile is labelled when its majority class covers at
    least `min_purity` of those cells.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be an (N, 2) array of level-0 (x, y), got shape {coords.shape}")
    if level0_patch_size <= 0:
        raise ValueError(f"level0_patch_size must be > 0, got {level0_patch_size}")
    if not 0 < min_purity <= 1:
        raise ValueError(f"min_purity must be in (0, 1], got {min_purity}")
    if len(coords) == 0:
        return np.zeros(0, dtype=np.int64)
    class_map, ds = load_class_map(sidecar_path)
    mh, mw = class_map.shape
    n_classes = len(CLASS_NAMES)
    # Summed-area table per class makes every tile O(1) whatever its size.
    onehot = (class_map[None] == np.arange(n_classes, dtype=np.int8)[:, None, None]).astype(np.int32)
    sat = np.zeros((n_classes, mh + 1, mw + 1), dtype=np.int64)
    sat[:, 1:, 1:] = onehot.cumsum(1).cumsum(2)
    x, y = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    size = float(level0_patch_size)
    c0, c1 = np.ceil(x / ds - 0.5).astype(np.int64), np.ceil((x + size) / ds - 0.5).astype(np.int64)
    r0, r1 = np.ceil(y / ds - 0.5).astype(np.int64), np.ceil((y + size) / ds - 0.5).astype(np.int64)
    small = (c1 <= c0) | (r1 <= r0)  # tile smaller than a cell: use the cell under its centre
    c0[small] = np.floor((x[small] + size / 2) / ds).astype(np.int64)
    r0[small] = np.floor((y[small] + size / 2) / ds).astype(np.int64)
    c1[small], r1[small] = c0[small] + 1, r0[small] + 1
    total = (c1 - c0) * (r1 - r0)
    cc0, cc1 = np.clip(c0, 0, mw), np.clip(c1, 0, mw)
    rr0, rr1 = np.clip(r0, 0, mh), np.clip(r1, 0, mh)
    counts = sat[:, rr1, cc1] - sat[:, rr0, cc1] - sat[:, rr1, cc0] + sat[:, rr0, cc0]  # (classes, N)
    best = counts.argmax(axis=0)
    purity = counts[best, np.arange(len(coords))] / total
    return np.where(purity >= min_purity, best, BACKGROUND).astype(np.int64)


# ---------------------------------------------------------------------------------------------- figure


def _example_tile(row: pd.Series, class_index: int, tile_px: int, target_mpp: float) -> np.ndarray | None:
    """A tile of one class from one slide (the purest, nearest the class's centre of mass), or None."""
    import openslide

    level0 = round(tile_px * target_mpp / float(row["mpp"]))
    class_map, ds = load_class_map(row["sidecar_path"])
    ys, xs = np.nonzero(class_map == class_index)
    if len(ys) == 0:
        return None
    step = max(ds, level0 // 4)
    grid = np.stack(np.meshgrid(np.arange(0, int(row["width"]) - level0 + 1, step),
                                np.arange(0, int(row["height"]) - level0 + 1, step)), -1).reshape(-1, 2)
    labels = tile_class_labels(row["sidecar_path"], grid, level0, min_purity=1.0)
    candidates = grid[labels == class_index]
    if len(candidates) == 0:
        return None
    centre = np.array([xs.mean(), ys.mean()]) * ds
    x, y = candidates[np.argmin(((candidates + level0 / 2 - centre) ** 2).sum(1))]
    with openslide.OpenSlide(str(row["path"])) as slide:
        region = slide.read_region((int(x), int(y)), 0, (level0, level0)).convert("RGB")
    return np.asarray(region.resize((tile_px, tile_px)))


def plot_cohort_examples(manifest: pd.DataFrame, out_png: str | os.PathLike, tile_px: int = 96,
                         target_mpp: float = 1.0) -> Path:
    """Save a grid of example tiles: one row per tissue class, one column per site (first slide of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted(manifest["site"].unique())
    fig, axes = plt.subplots(len(CLASS_NAMES), len(sites), figsize=(1.6 * len(sites) + 1.2,
                                                                   1.6 * len(CLASS_NAMES) + 0.6),
                             squeeze=False)
    for col, site in enumerate(sites):
        slides = manifest[manifest["site"] == site].sort_values("slide_id")
        for row_index, name in enumerate(CLASS_NAMES):
            ax = axes[row_index, col]
            tile = None
            for _, slide in slides.iterrows():  # first slide of the site that shows this class
                tile = _example_tile(slide, row_index, tile_px, target_mpp)
                if tile is not None:
                    break
            if tile is not None:
                ax.imshow(tile)
            else:
                ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            if row_index == 0:
                ax.set_title(str(site), fontsize=10)
            if col == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.suptitle(f"Synthetic cohort: tissue class (rows) x site stain (columns), {tile_px} px at {target_mpp} um/px",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out
