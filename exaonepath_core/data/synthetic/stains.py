"""Site and slide stains: the H and E optical-density vectors, scales, glass brightness and focus blur.

Sites are rotations of the reference H&E vectors (as different labs' haematoxylin and eosin batches and
scanners shift hue); each slide perturbs its site's stains by less than the sites differ.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from exaonepath_core.data.synthetic.spec import CohortSpec

# The reference H&E optical-density vectors (RGB order) commonly used as the Macenko target; sites are
# rotations of these, as different labs' haematoxylin and eosin batches and scanners shift hue.
H_REFERENCE = np.array([0.5626, 0.7201, 0.4062])
E_REFERENCE = np.array([0.2159, 0.8012, 0.5581])
# Focus blur is drawn per slide around one value for all sites: a site-level sharpness difference would be a
# non-colour site signal that stain normalization cannot remove, blurring the experiment's answer key.
_SITE_BLUR_SIGMA = 0.5
# Likewise the glass brightness Io is drawn per slide: Macenko assumes one Io (240), so a per-site Io would
# survive normalization as a site offset in optical density.
_SITE_IO = 245.0


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


def slide_stain_params(site: StainParams, rng: np.random.Generator) -> StainParams:
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
