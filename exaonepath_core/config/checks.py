"""Range, choice and cross-key checks of a typed `ProjectConfig` that need nothing but the config itself.

Checks that need another layer's machinery (the rendezvous endpoint grammar of `pretrain.launch`, the dataset
registry of `data.downstream`, backbone specs of `models.backbones`) live with that machinery and run from the
runner (`exaonepath_core.stages.config_checks.validate`).
"""
from __future__ import annotations

import os
from typing import Any

from exaonepath_core.config.schema import ProjectConfig, get_dotted
from exaonepath_core.config.values import ConfigError
from exaonepath_core.config.vocabulary import (
    DATA_SOURCES,
    DEFAULT_MACENKO_PARAMS,
    DEVICES,
    ENCODINGS,
    INPUT_ARMS,
    JPEG_SUBSAMPLINGS,
    STORE_FORMATS,
    STORE_MODES,
    parse_shard,
    store_for_arm,
)

# Values a type check cannot catch. Sizes a stage divides by or loops over: > 0; counts where 0 means
# "none"/"all": >= 0. Pretraining sizes are checked by PretrainConfig itself.
POSITIVE_KEYS = ("tiling.tile_size", "tiling.workers", "tiling.target_mpp", "normalize.batch_size", "normalize.Io",
                 "features.batch_size", "nproc_per_node", "nnodes", "probes.knn_k", "collapse.k", "collapse.max_points",
                 "data.mpp_override", "data.synthetic.n_sites", "data.synthetic.slides_per_site",
                 "data.synthetic.slide_size_px", "data.synthetic.mpp")
NON_NEGATIVE_KEYS = ("tiling.overlap", "tiling.qc_figures", "features.num_workers", "features.max_samples_per_split",
                     "features.max_tiles_per_heldout_slide", "data.heldout_slides_per_site",
                     "data.synthetic.heldout_slides_per_site", "probes.n_boot", "collapse.n_boot")
CHOICE_KEYS: dict[str, tuple[str, ...]] = {"device": DEVICES, "collapse.embedding": ("tsne", "pca"),
                                           "data.site_rule": ("folder", "tcga_tss")}
SHARD_KEYS = ("tiling.shard", "normalize.shard")


def shard_count(text: str) -> int:
    """N of a shard string `i/N` (0 <= i < N, parsed by `parse_shard`); ConfigError otherwise."""
    try:
        return parse_shard(text)[1]
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_store_keys(cfg: ProjectConfig) -> None:
    """normalize.store_format / encoding / jpeg_quality / shard_max_mb and pretrain.data_source."""
    section = cfg.normalize
    for key, value, allowed in (("normalize.store_format", section.store_format, STORE_FORMATS),
                                ("normalize.encoding", section.encoding, tuple(ENCODINGS)),
                                ("normalize.jpeg_subsampling", section.jpeg_subsampling, JPEG_SUBSAMPLINGS),
                                ("pretrain.data_source", cfg.pretrain_setting("data_source"), DATA_SOURCES)):
        if value not in allowed:
            raise ConfigError(f"config key {key}: must be one of {', '.join(allowed)}, got {value!r}")
    if not 1 <= section.jpeg_quality <= 100:
        raise ConfigError(f"config key normalize.jpeg_quality: must lie in [1, 100], got {section.jpeg_quality!r}")
    if section.shard_max_mb <= 0:
        raise ConfigError(f"config key normalize.shard_max_mb: must be > 0, got {section.shard_max_mb!r}")


def validate_values(cfg: ProjectConfig) -> None:
    """Range, choice and cross-key checks on a typed config; ConfigError names the dotted key and value."""
    d = cfg.to_dict()
    _check_ranges(d)
    if cfg.nnodes > 1 and not cfg.rdzv_endpoint:
        raise ConfigError(f"config key rdzv_endpoint: nnodes is {cfg.nnodes}, so set it to HOST:PORT of the "
                          "first node (e.g. ${MASTER_ADDR}:29500)")
    fraction = cfg.features.center_crop_fraction
    if not 0.5 <= fraction <= 1.0:
        raise ConfigError(f"config key features.center_crop_fraction: must lie in [0.5, 1], got {fraction!r}")
    for dotted in SHARD_KEYS:
        try:
            shard_count(get_dotted(d, dotted))
        except ConfigError as err:
            raise ConfigError(f"config key {dotted}: {err}") from None
    # arms may be empty: stage 04 then embeds with the untrained initialisation / extra backbones only
    for dotted, allowed in (("arms", INPUT_ARMS), ("normalize.stores", STORE_MODES)):
        values = get_dotted(d, dotted)
        if any(v not in allowed for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"config key {dotted}: expected a list of distinct values from "
                              f"{', '.join(allowed)}, got {values!r}")
    _check_store_keys(cfg)
    _check_arm_inputs(cfg)
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


def _check_ranges(d: dict[str, Any]) -> None:
    for dotted in POSITIVE_KEYS:
        value = get_dotted(d, dotted)
        if value is not None and value <= 0:
            raise ConfigError(f"config key {dotted}: must be > 0, got {value!r}")
    for dotted in NON_NEGATIVE_KEYS:
        if get_dotted(d, dotted) < 0:
            raise ConfigError(f"config key {dotted}: must be >= 0, got {get_dotted(d, dotted)!r}")
    for dotted, allowed in CHOICE_KEYS.items():
        if get_dotted(d, dotted) not in allowed:
            raise ConfigError(f"config key {dotted}: must be one of {', '.join(allowed)}, "
                              f"got {get_dotted(d, dotted)!r}")


def _check_arm_inputs(cfg: ProjectConfig) -> None:
    """On-the-fly normalization only at the paper's Macenko values; every arm's store written by stage 02."""
    on_the_fly = bool(cfg.pretrain_setting("normalize_on_the_fly"))
    if on_the_fly and "macenko" in cfg.arms and cfg.normalize.macenko_params() != DEFAULT_MACENKO_PARAMS:
        asked = "/".join(f"{v:g}" for v in cfg.normalize.macenko_params().values())
        raise ConfigError(f"config key pretrain.normalize_on_the_fly: normalizes with Io/alpha/beta 240/1/0.15, but "
                          f"normalize.Io/alpha/beta are {asked}: store the patches (normalize_on_the_fly: false) to "
                          "train with other values")
    data_source = cfg.pretrain_setting("data_source")
    for arm in cfg.arms if data_source == "store" else []:
        store = store_for_arm(arm, on_the_fly, data_source)
        if store not in cfg.normalize.stores:
            raise ConfigError(f"config key arms: arm {arm!r} pretrains from the {store!r} patch store, which "
                              f"normalize.stores {cfg.normalize.stores!r} does not write (add it there)")
