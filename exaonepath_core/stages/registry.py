"""The stages in pipeline order: the one list the runner, the results map, the notebook builder and the tests
read. Adding a stage: write `sNN_<name>.py` (its `SPEC`, checks and `run`), its notebook source
`notebooks/src/<notebook>.py`, and list the module here."""
from __future__ import annotations

from types import ModuleType

from exaonepath_core.config import ProjectConfig
from exaonepath_core.stages import (
    s01_tile,
    s02_normalize,
    s03_pretrain,
    s04_features,
    s05_probes,
    s06_collapse,
    s07_report,
)
from exaonepath_core.stages.base import StageSpec, config_hash

MODULES: tuple[ModuleType, ...] = (s01_tile, s02_normalize, s03_pretrain, s04_features, s05_probes, s06_collapse,
                                   s07_report)
SPECS: dict[str, StageSpec] = {m.SPEC.key: m.SPEC for m in MODULES}
# Stage key -> (notebook file stem, results sub-folder), in pipeline order (derived from the modules' SPECs)
STAGES: dict[str, tuple[str, str]] = {key: (spec.notebook, spec.folder) for key, spec in SPECS.items()}
_MODULE_OF = {m.SPEC.key: m for m in MODULES}


def stage_key(name: str) -> str:
    """Accept '03', '3', '03_pretrain', '03_pretrain_dino' or 'pretrain' and return the stage key '03'."""
    name = name.strip()
    if name.isdigit():
        key = f"{int(name):02d}"
        if key in STAGES:
            return key
    for key, (nb, folder) in STAGES.items():
        if name in (nb, folder) or name == nb.split("_", 1)[1] or name == folder.split("_", 1)[1]:
            return key
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(nb for nb, _ in STAGES.values())}")


def module(stage: str) -> ModuleType:
    """The module of a stage (its `SPEC`, `run`, and `warnings` / `preflight` where it has them)."""
    return _MODULE_OF[stage_key(stage)]


def upstream(stage: str) -> list[StageSpec]:
    """The stage's spec and every spec before it, in pipeline order."""
    keys = list(SPECS)
    return [SPECS[k] for k in keys[: keys.index(stage_key(stage)) + 1]]


def stage_config_hash(cfg: ProjectConfig, stage: str) -> str:
    """Hash of every config key this stage or an upstream stage reads (less `base.HASH_EXCLUDED_KEYS`)."""
    return config_hash(cfg, upstream(stage))
