"""The config checks that need a layer above `config`: run once by the runner right after `load_config`, so a
bad value stops the run before stage 01 with the same ConfigError (and exit code) as a schema error.

`config` itself checks schema, types, ranges and vocabulary; what needs machinery stays with the machinery:
the rendezvous endpoint grammar (`pretrain.launch`), the dataset registry (`data.downstream`) and backbone
specs with their weights (`models.backbones`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from exaonepath_core.config import ConfigError, ProjectConfig, load_config
from exaonepath_core.data.downstream.datasets import dataset_class
from exaonepath_core.models import backbones
from exaonepath_core.pretrain.launch import LaunchError, check_endpoint


def check_rdzv_endpoint(cfg: ProjectConfig) -> None:
    """A multi-node rendezvous endpoint, when set, is HOST:PORT (its absence with nnodes > 1: `config`)."""
    if not cfg.rdzv_endpoint:
        return
    try:
        check_endpoint(cfg.rdzv_endpoint)
    except LaunchError as err:
        raise ConfigError(f"config key rdzv_endpoint: {err}") from None


def check_downstream_roots(cfg: ProjectConfig) -> None:
    """Every `data.downstream_roots` name is a registered dataset or `folder_<task>` (a misspelt name would
    only show up as "absent: KeyError" at stage 04/05, after pretraining)."""
    for name in cfg.data.downstream_roots:
        try:  # a registered name, or folder_<task>; the error suggests the nearest name
            dataset_class(name)
        except KeyError as err:
            raise ConfigError(f"config key data.downstream_roots.{name}: {err.args[0]}") from None


def validate(cfg: ProjectConfig) -> ProjectConfig:
    """Every check of a loaded config beyond `config`'s own; returns `cfg` (ConfigError names key and value)."""
    check_rdzv_endpoint(cfg)
    check_downstream_roots(cfg)
    backbones.check_config(cfg)
    return cfg


def load_checked_config(path_or_profile: str | Path, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """`config.load_config` followed by `validate`: what the runner loads."""
    return validate(load_config(path_or_profile, overrides))
