"""The pretraining section: `PretrainConfig`, every setting of a DINO run with its one set of defaults.

`ProjectConfig.pretrain` holds the keys a profile sets (validated here at load time; the stage-03 hash covers
just those, so a new default changes no hash), and `PretrainConfig.from_mapping` fills in the rest from the
fields below: the defaults live in this class only (configs/paper.yaml writes the paper's values out).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exaonepath_core.config.values import ConfigError, check_value, describe_type
from exaonepath_core.config.vocabulary import (
    CENTERINGS,
    CLIP_MODES,
    DATA_SOURCES,
    DEVICES,
    INPUT_ARMS,
    ON_CORRUPT,
    PRECISIONS,
    parse_length,
)

# settings a resumed run may change without breaking "same step, same schedules, same data order"
RESUME_MUTABLE_KEYS = frozenset(
    {"max_steps", "output_dir", "num_workers", "saveckp_freq", "keep_numbered_checkpoints", "log_every",
     "compile", "device", "data_root", "progress_bar", "tensorboard", "wandb_project", "store_max_open_files"}
)


@dataclass
class PretrainConfig:
    """Every setting of a DINO pretraining run (defaults: the DINO ViT recipe; the smoke profile overrides sizes)."""

    # model
    arch: str = "vit_base_patch16_224"
    patch_size: int | None = None
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    norm_last_layer: bool = True
    # multi-crop
    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 8
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # optimisation (lr is the base rate for a total batch of 256, scaled linearly as DINO)
    # epochs may be fractional (the same images seen on a store of another size); the three schedule lengths
    # below take epochs (fractions allowed) or a step count written "2500 steps" (config.vocabulary.parse_length)
    epochs: float = 100
    batch_size_per_gpu: int = 64
    lr: float = 0.0005
    min_lr: float = 1e-6
    warmup_epochs: float | str = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    clip_grad_mode: str = "per_parameter"  # per_parameter (DINO) | global (DINOv2's clip_grad_norm_)
    freeze_last_layer: float | str = 1
    # DINO loss and teacher
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float | str = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "center"  # center (DINO) | sinkhorn_knopp (DINOv2/SwAV balanced teacher targets)
    sinkhorn_iterations: int = 3
    # speed
    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (avx512_bf16 / AMX), fp32 elsewhere; fp16 uses a
    # GradScaler as DINO. The head's last layer and the loss stay fp32 under autocast unless fp32_last_layer=false
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    fp32_last_layer: bool = True
    use_amp: bool = True  # older configs: false means fp32 (with precision auto); true lets `precision` decide
    fused_adamw: bool = True
    compile: bool = False
    channels_last: bool = False
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda
    # data
    data_root: str = ""
    input_arm: str = "macenko"  # raw | macenko | stain_augmentation
    normalize_on_the_fly: bool = False  # macenko arm only: read a raw store, normalise each batch on the device
    macenko_reference: str = ""  # JSON written by stain.MacenkoReference.to_json; empty: the standard reference
    # slides never trained on even when the store holds them (held-out slides of stage 01; a reused store keeps
    # every slide it ever wrote)
    exclude_slide_ids: list[str] = field(default_factory=list)
    # store: data_root holds a patch store (shards or .npy) written by stage 02; storeless: a coordinate index,
    # tiles read from the slides at each sample (raw; the macenko arm then needs normalize_on_the_fly)
    data_source: str = "store"
    store_on_corrupt: str = "raise"  # raise | skip (a corrupt shard record: stop, or count it and read the next)
    store_max_open_files: int = 64  # open shard files (or slides, storeless) per loader worker
    # run
    seed: int = 0
    deterministic: bool = False
    saveckp_freq: int = 1000
    keep_numbered_checkpoints: bool = False
    log_every: int = 1
    progress_bar: bool = True
    tensorboard: bool = True  # event files in OUTPUT_DIR/tensorboard when the tensorboard package is installed
    wandb_project: str = ""  # a Weights & Biases project to log to (empty: none)
    max_steps: int | None = None
    output_dir: str = "results/smoke/03_pretrain"

    def __post_init__(self) -> None:
        if self.input_arm not in INPUT_ARMS:
            raise ConfigError(f"input_arm must be one of {INPUT_ARMS}, got {self.input_arm!r}")
        if self.normalize_on_the_fly and self.input_arm != "macenko":
            raise ConfigError("normalize_on_the_fly applies to input_arm 'macenko' only (it reads a raw store)")
        if self.data_source not in DATA_SOURCES:
            raise ConfigError(f"data_source must be store or storeless, got {self.data_source!r}")
        if self.store_on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"store_on_corrupt must be raise or skip, got {self.store_on_corrupt!r}")
        if self.store_max_open_files < 1:
            raise ConfigError(f"store_max_open_files must be >= 1, got {self.store_max_open_files}")
        if self.clip_grad_mode not in CLIP_MODES:
            raise ConfigError(f"clip_grad_mode must be one of {CLIP_MODES}, got {self.clip_grad_mode!r}")
        if self.centering not in CENTERINGS:
            raise ConfigError(f"centering must be one of {CENTERINGS}, got {self.centering!r}")
        if self.precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"precision must be one of auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
        if not self.use_amp and self.precision not in ("auto", "fp32"):
            raise ConfigError(f"use_amp is false but precision is {self.precision!r}: drop use_amp (superseded by "
                              "precision) or set precision: fp32")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("epochs", "batch_size_per_gpu", "out_dim", "global_crop_size", "local_crop_size",
                     "saveckp_freq", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer"):
            try:
                amount, unit = parse_length(name, getattr(self, name))
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if name == "warmup_epochs" and unit == "epochs" and amount > self.epochs:
                raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must lie in [0, epochs={self.epochs}]")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 or null, got {self.max_steps}")
        for name in ("global_crop_scale", "local_crop_scale", "blur_sigma"):
            if len(getattr(self, name)) != 2:
                raise ConfigError(f"{name} must hold two numbers, got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> PretrainConfig:
        """Build from a flat mapping; unknown keys and mistyped values raise ConfigError naming them."""
        if not isinstance(mapping, dict):
            raise ConfigError(f"a pretraining config must be a flat mapping, got {type(mapping).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ConfigError(f"unknown pretraining config key(s): {', '.join(unknown)}")
        return cls(**{key: _coerce(key, hints[key], value) for key, value in mapping.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PretrainConfig:
        """Load a flat YAML mapping (an empty file gives the defaults)."""
        if not Path(path).is_file():
            raise ConfigError(f"pretraining config not found: {path}")
        with open(path) as handle:
            mapping = yaml.safe_load(handle) or {}
        if not isinstance(mapping, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(mapping).__name__}")
        try:
            return cls.from_mapping(mapping)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def with_overrides(self, assignments: Sequence[str]) -> PretrainConfig:
        """A copy with `key=value` assignments applied (values parsed as YAML scalars/lists)."""
        mapping = dataclasses.asdict(self)
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            if not sep:
                raise ConfigError(f"--set expects key=value, got {assignment!r}")
            mapping[key.strip()] = yaml.safe_load(text)
        return type(self).from_mapping(mapping)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every setting."""
        return dataclasses.asdict(self)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check a YAML value against a field's annotation (`check_value`: ints accepted where floats are
    expected, numbers written as strings converted)."""
    try:
        return check_value(key, hint, value)
    except ConfigError:
        raise ConfigError(f"{key} must be {describe_type(hint)}, got {value!r}") from None


def pretrain_setting(section: dict[str, Any], key: str) -> Any:
    """A pretraining setting of a profile's `pretrain` mapping: its value there, else `PretrainConfig`'s default
    (the one place pretraining defaults are written)."""
    if key in section:
        return section[key]
    default = _FIELDS[key]
    return default.default_factory() if default.default is dataclasses.MISSING else default.default


_FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def validate_pretrain_section(section: dict[str, Any]) -> None:
    """Check the pretraining keys against `PretrainConfig`: unknown keys, types, and its own range checks."""
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            "unknown config key(s): " + ", ".join(f"pretrain.{k}" for k in unknown)
        )
    hints = typing.get_type_hints(PretrainConfig)
    for key, value in section.items():
        section[key] = check_value(f"pretrain.{key}", hints[key], value)
    if pretrain_setting(section, "num_workers") < 0:
        raise ConfigError(f"config key pretrain.num_workers: must be >= 0, got {section['num_workers']!r}")
    try:
        PretrainConfig.from_mapping(section)  # its own checks: positive sizes, warmup <= epochs, choices
    except ConfigError as err:
        raise ConfigError(f"config section pretrain: {err}") from None
