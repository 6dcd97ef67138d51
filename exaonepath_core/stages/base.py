"""What every stage module declares (`StageSpec`) and the config hash that decides whether a stage reruns.

A stage module `sNN_<name>.py` holds `SPEC` (its key, notebook, results folder and the config keys it reads),
its checks and `run(cfg, paths, ...)`; `registry.py` lists the modules in pipeline order. This module imports
no stage, so a stage may hash its upstream stages' keys (stage 03 hashes the patch store's config) without a
cycle through the registry.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exaonepath_core.config import ProjectConfig


@dataclass(frozen=True)
class StageSpec:
    """One stage: `key` ('01'), `notebook` (file stem in notebooks/), `folder` (under results/<run>/),
    `config_keys` (sections or dotted keys it reads: its hash covers these and every upstream stage's),
    `reuses_work` (its notebook declares `force`: it resumes per slide / store / checkpoint / feature folder),
    `per_arm` (run once per pretraining arm, with an `arm` parameter; it decides per arm what to supersede) and
    `needs_arms` (nothing to do, so no done-marker needed downstream, when the run has no pretraining arm)."""

    key: str
    notebook: str
    folder: str
    config_keys: tuple[str, ...]
    reuses_work: bool = False
    per_arm: bool = False
    needs_arms: bool = False

    @property
    def parameters(self) -> frozenset[str]:
        """The names the stage's notebook declares in its `parameters` cell."""
        return frozenset({"config_path", "profile"} | ({"force"} if self.reuses_work else set())
                         | ({"arm"} if self.per_arm else set()))


# Keys left out of every stage hash: they change how fast a stage runs or what its notebook displays, not what
# it writes (or, for downstream_roots, only what stage 04 reads, so they sit in stage 04's keys instead).
HASH_EXCLUDED_KEYS: dict[str, str] = {
    "data.downstream_roots": "read by stage 04 only (listed there)",
    "tiling.workers": "parallel processes; the same tiles",
    "tiling.qc_figures": "how many QC images the notebook displays",
    "pretrain.num_workers": "data-loader processes; samples are seeded per (epoch, index)",
    "pretrain.progress_bar": "terminal display",
    "pretrain.tensorboard": "live curves beside log.jsonl",
    "pretrain.wandb_project": "where live curves are sent",
    "features.num_workers": "data-loader processes; the same features in the same order",
    # every shard of a stage writes into the one stage folder, and the run without a shard that completes it
    # must find their outputs there (a hash per shard would move each shard's work aside as "another config")
    "tiling.shard": "which part of the slide list this process tiles",
    "normalize.shard": "which part of the slide list this process normalizes",
}


def config_hash(cfg: ProjectConfig, specs: Iterable[StageSpec]) -> str:
    """Hash of the config keys of `specs` (a stage and every stage upstream of it, in pipeline order), less
    `HASH_EXCLUDED_KEYS`."""
    keys: list[str] = []
    for spec in specs:
        keys.extend(spec.config_keys)
    return cfg.keys_hash(keys, exclude=HASH_EXCLUDED_KEYS)
