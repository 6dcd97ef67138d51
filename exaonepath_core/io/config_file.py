"""Writing the resolved configuration beside a run's outputs (atomically, as every file the package writes)."""
from __future__ import annotations

from pathlib import Path

import yaml

from exaonepath_core.config import ProjectConfig
from exaonepath_core.io import atomic


def save_config(cfg: ProjectConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically (next to a stage's outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
