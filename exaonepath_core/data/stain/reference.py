"""The Macenko reference (target stain vectors and concentrations) and the per-patch estimate's defaults."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exaonepath_core.config import DEFAULT_MACENKO_PARAMS
from exaonepath_core.io import atomic

DEFAULT_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
DEFAULT_MAX_CONCENTRATIONS = (1.9705, 1.0308)
# Io / alpha / beta of the per-patch estimate as the paper (and torchstain) set them (config.DEFAULT_MACENKO_PARAMS,
# one rule with normalize.Io/alpha/beta); every function of this package takes its keyword defaults from here
IO = DEFAULT_MACENKO_PARAMS["Io"]
ALPHA = DEFAULT_MACENKO_PARAMS["alpha"]
BETA = DEFAULT_MACENKO_PARAMS["beta"]
MIN_TISSUE_PIXELS = 100  # patches with fewer tissue pixels are passed through unchanged (flagged as fallback)

@dataclass
class MacenkoReference:
    """Target stain vectors (OD unit columns H, E) and 99th-percentile concentrations of a reference image."""

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray

    def __post_init__(self) -> None:
        self.stain_matrix = np.asarray(self.stain_matrix, dtype=np.float64)
        self.max_concentrations = np.asarray(self.max_concentrations, dtype=np.float64)
        if self.stain_matrix.shape != (3, 2):
            raise ValueError(f"stain_matrix must have shape (3, 2), got {self.stain_matrix.shape}")
        if self.max_concentrations.shape != (2,):
            raise ValueError(f"max_concentrations must have shape (2,), got {self.max_concentrations.shape}")
        if not (np.all(np.isfinite(self.stain_matrix)) and np.all(np.isfinite(self.max_concentrations))):
            raise ValueError("MacenkoReference holds non-finite values")
        if np.any(self.max_concentrations <= 0):
            raise ValueError(f"max_concentrations must be positive, got {self.max_concentrations.tolist()}")

    @classmethod
    def default(cls) -> MacenkoReference:
        """The standard H&E reference of Macenko et al., torchstain's built-in default.

        EXAONEPath's official code does not use it: it fits torchstain to one TCGA crop
        (`target_TCGA-55-A48X_coords_[19440  9824]_[4096 4096].png` in its repository), whose stain vectors and
        maximum concentrations differ; pass that image as `normalize.reference_image` (or a reference JSON fitted
        to it as the backbone's `macenko_reference`) to reproduce its colours.
        """
        return cls(np.array(DEFAULT_STAIN_MATRIX), np.array(DEFAULT_MAX_CONCENTRATIONS))

    def to_dict(self) -> dict:
        """Plain JSON-able form."""
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> MacenkoReference:
        """Inverse of `to_dict`; rejects missing or unknown keys."""
        expected = {"stain_matrix", "max_concentrations"}
        if set(data) != expected:
            raise ValueError(f"MacenkoReference keys must be {sorted(expected)}, got {sorted(data)}")
        return cls(np.array(data["stain_matrix"]), np.array(data["max_concentrations"]))

    def to_json(self, path: str | os.PathLike) -> None:
        """Save atomically as a small JSON file."""
        atomic.write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MacenkoReference:
        """Load a reference written by `to_json`."""
        with open(path) as handle:
            return cls.from_dict(json.load(handle))

    def allclose(self, other: MacenkoReference, atol: float = 1e-6) -> bool:
        """True when both matrices agree to `atol`."""
        return bool(
            np.allclose(self.stain_matrix, other.stain_matrix, atol=atol)
            and np.allclose(self.max_concentrations, other.max_concentrations, atol=atol)
        )
