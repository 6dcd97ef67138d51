"""The cohort's spec (size, seed, pyramid, compression) and its vocabulary: tissue classes and slide ids.

Everything a cohort holds follows deterministically from a `CohortSpec` and `GENERATOR_VERSION`, so equal
digests mean byte-identical cohorts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

GENERATOR_VERSION = "5"
CLASS_NAMES: tuple[str, ...] = ("tumor", "stroma", "lymphocytes", "adipose", "mucin", "necrosis")
BACKGROUND = -1
TUMOR, STROMA, LYMPHOCYTES, ADIPOSE, MUCIN, NECROSIS = range(len(CLASS_NAMES))


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
            errors.append(f"the smallest level would be {smallest} px wide: use fewer levels or larger "
                          "slides")
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



def slide_id_for(site: int, slide: int) -> str:
    """The slide id of slide `slide` of site `site` (also its file stem)."""
    return f"syn_s{site}_{slide:02d}"
