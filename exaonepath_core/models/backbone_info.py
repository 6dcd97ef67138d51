"""What a loaded backbone is and expects: its identity, embedding size and input contract (`PreprocessSpec`).

Shared by every backbone source (`backbones` for ours, timm and the official EXAONEPath checkpoint, `peers` for
the released pathology models); `backbones.make_transform` turns a spec into the batched transform.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreprocessSpec:
    """What a backbone expects: optional Macenko, shorter-side resize, centre crop, mean/std."""

    resize: int
    crop: int
    macenko: bool = False
    macenko_reference: dict | None = None  # MacenkoReference.to_dict(); None = MacenkoReference.default()
    macenko_params: dict | None = None  # Io / alpha / beta of the per-patch estimate; None = 240 / 1 / 0.15
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)


@dataclass
class BackboneInfo:
    """Identity and input contract of a loaded backbone (goes into every feature manifest)."""

    name: str
    embed_dim: int
    input_size: int
    preprocess: PreprocessSpec
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return asdict(self)
