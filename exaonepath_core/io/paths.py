"""The one map of `results/<profile>/<stage>/...` and the stage done-markers."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Stage key -> (notebook file stem, results sub-folder). Order is the pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "01": ("01_tile_slides", "01_tiles"),
    "02": ("02_normalize_stains", "02_normalize"),
    "03": ("03_pretrain_dino", "03_pretrain"),
    "04": ("04_extract_features", "04_features"),
    "05": ("05_linear_probes", "05_probes"),
    "06": ("06_feature_collapse", "06_collapse"),
    "07": ("07_figures_and_tables", "07_report"),
}


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


UNREADABLE_MARKER = "unreadable-marker"


@dataclass(frozen=True)
class ResultsPaths:
    """Folders of one profile's run: results/<profile>/<stage>/, notebooks/, done-markers."""

    root: Path
    profile: str

    @classmethod
    def for_profile(cls, profile: str, results_root: str | Path = "results") -> ResultsPaths:
        """Paths of `profile` under `results_root` (relative roots are taken from the repository root)."""
        from exaonepath_core.config import resolve_path

        return cls(resolve_path(results_root), profile)

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
        write_json_atomic(marker, payload)
        return marker

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
        from exaonepath_core.io.atomic import move_aside

        return move_aside(folder, "unreadable" if old == UNREADABLE_MARKER else old[:8])

    def mark_inputs(self, stage: str, config_hash: str) -> Path:
        """Record, before the stage runs, which config its outputs are built from (see `supersede_outputs`)."""
        marker = self.inputs_marker(stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(marker, {"stage": STAGES[stage_key(stage)][0], "config_hash": config_hash})


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """JSON to a temp file in the same folder, then rename (never a half-written file)."""
    from exaonepath_core.io import atomic

    return atomic.write_json(path, payload)
