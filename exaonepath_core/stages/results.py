"""The one map of `results/<run>/<stage>/...`, the stage done-markers, and a stage notebook's set-up
(`open_stage`: the run's config and paths, upstream stages finished)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exaonepath_core.config import ProjectConfig, load_run_config, resolve_path
from exaonepath_core.io import atomic
from exaonepath_core.stages import config_checks
from exaonepath_core.stages.registry import SPECS, STAGES, stage_key

UNREADABLE_MARKER = "unreadable-marker"


@dataclass(frozen=True)
class ResultsPaths:
    """Folders of one profile's run: results/<profile>/<stage>/, notebooks/, done-markers."""

    root: Path
    profile: str

    @classmethod
    def for_profile(cls, profile: str, results_root: str | Path = "results") -> ResultsPaths:
        """Paths of `profile` under `results_root` (relative roots are taken from the repository root)."""
        return cls(resolve_path(results_root), profile)

    @property
    def stages(self) -> dict[str, tuple[str, str]]:
        """Stage key -> (notebook, folder), in pipeline order."""
        return STAGES

    @property
    def profile_dir(self) -> Path:
        return self.root / self.profile

    @property
    def notebooks_dir(self) -> Path:
        """Executed notebooks are kept here."""
        return self.profile_dir / "notebooks"

    @property
    def config_path(self) -> Path:
        """The resolved config of the run (what every stage notebook reads)."""
        return self.profile_dir / "config.yaml"

    def stage_dir(self, stage: str, create: bool = True) -> Path:
        """Output folder of a stage, e.g. results/smoke/03_pretrain."""
        d = self.profile_dir / STAGES[stage_key(stage)][1]
        if create:
            d.mkdir(parents=True, exist_ok=True)
        return d

    def done_marker(self, stage: str) -> Path:
        return self.stage_dir(stage, create=False) / ".done.json"

    def is_done(self, stage: str, config_hash: str) -> bool:
        """True when the stage finished with the same resolved-config hash."""
        marker = self.done_marker(stage)
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("config_hash") == config_hash
        except json.JSONDecodeError:
            return False

    def done_info(self, stage: str) -> dict[str, Any]:
        """The done-marker's content ({} when absent or unreadable)."""
        try:
            return json.loads(self.done_marker(stage).read_text())
        except (OSError, ValueError):
            return {}

    def mark_done(self, stage: str, config_hash: str, **info: Any) -> Path:
        """Write the done-marker atomically."""
        marker = self.done_marker(stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        payload = {"stage": STAGES[stage_key(stage)][0], "config_hash": config_hash, "finished": time.time(), **info}
        return atomic.write_json(marker, payload)

    def clear_done(self, stage: str) -> None:
        self.done_marker(stage).unlink(missing_ok=True)

    def inputs_marker(self, stage: str) -> Path:
        """`.inputs.json`: the config hash the stage's outputs on disk are being built from (written at its start)."""
        return self.stage_dir(stage, create=False) / ".inputs.json"

    def built_from(self, stage: str) -> str | None:
        """The config hash the stage's outputs were (or are being) built from; None when no marker exists, and
        UNREADABLE_MARKER when one exists but cannot be read (the outputs are then of an unknown config)."""
        unreadable = False
        for marker in (self.inputs_marker(stage), self.done_marker(stage)):
            try:
                return json.loads(marker.read_text())["config_hash"]
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                unreadable = True
        return UNREADABLE_MARKER if unreadable else None

    def supersede_outputs(self, stage: str, config_hash: str) -> Path | None:
        """Move the stage's folder aside when its outputs were built from another config; returns the new place.

        Per-item resume (slides in a ledger, feature folders, checkpoints) would otherwise take outputs of the
        old config for done and mix them with new ones. Moved, not deleted: nothing is lost, and a large patch
        store is renamed in place rather than copied. Outputs without any marker (made by hand, or before
        markers existed) are kept; outputs whose marker is corrupt are moved aside, as of another config.
        """
        folder = self.stage_dir(stage, create=False)
        old = self.built_from(stage)
        if old is None or old == config_hash or not folder.is_dir():
            return None
        return atomic.move_aside(folder, "unreadable" if old == UNREADABLE_MARKER else old[:8])

    def mark_inputs(self, stage: str, config_hash: str) -> Path:
        """Record, before the stage runs, which config its outputs are built from (see `supersede_outputs`)."""
        marker = self.inputs_marker(stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_json(marker, {"stage": STAGES[stage_key(stage)][0], "config_hash": config_hash})


def missing_upstream(cfg: ProjectConfig, paths: ResultsPaths, stage: str) -> list[str]:
    """Keys of the stages before `stage` that have no done-marker in this run's folder."""
    key = stage_key(stage)
    upstream = [k for k in STAGES if k < key]
    if not cfg.arms:  # no pretraining arm: stages 02-03 have nothing to do (untrained / extra backbones only)
        upstream = [k for k in upstream if not SPECS[k].needs_arms]
    return [k for k in upstream if not paths.done_marker(k).is_file()]


def open_stage(stage: str, config_path: str = "", profile: str = "smoke") -> tuple[ProjectConfig, ResultsPaths]:
    """A stage notebook's set-up: its run's resolved config and paths; upstream stages must have finished."""
    key = stage_key(stage)
    cfg = config_checks.validate(load_run_config(config_path, profile))
    paths = ResultsPaths.for_profile(cfg.results_name, cfg.results_root)
    missing = missing_upstream(cfg, paths, key)
    if missing:
        first = STAGES[missing[0]][0]
        raise RuntimeError(
            f"stage {STAGES[key][0]} needs stage(s) {', '.join(STAGES[k][0] for k in missing)} of run "
            f"{cfg.results_name!r} first (no done-marker under {paths.profile_dir}): run "
            f"`./run_all.sh --profile {cfg.profile} --from {missing[0]}` ({first} onwards)")
    return cfg, paths
