"""The staged notebook runner behind `./run_all.sh`: papermill per stage, done-markers, skip/force/from/only, sweeps.

Each stage is one notebook in `notebooks/`. The runner resolves the profile's config once, writes it to
`results/<profile>/config.yaml`, and executes each notebook with papermill, passing `config_path`,
`profile`, `force` (and, for stage 03, one `arm` per run so each pretraining arm keeps its own executed copy).
A stage whose done-marker carries the same config hash is skipped; once a stage runs, every later stage runs too.
A failing notebook stops the run with exit code 1, naming the stage, the failing cell and the error; the
executed notebook (with the traceback in it) is kept under `results/<profile>/notebooks/`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from exaonepath_core.config import (
    REPO_ROOT,
    ConfigError,
    ProjectConfig,
    load_config,
    parse_override,
    save_config,
)
from exaonepath_core.paths import STAGES, ResultsPaths, stage_key

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "exaonepath"  # registered into .venv by run_all.sh; falls back to the running interpreter's python3


def kernel_name() -> str:
    """The project's kernel when registered, else `python3` (ipykernel's spec for the running interpreter)."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"

# Config sections each stage reads, cumulatively: a change upstream re-runs everything below it.
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "01": ("profile", "seed", "data", "tiling"),
    "02": ("normalize",),
    "03": ("arms", "pretrain", "nproc_per_node", "device"),
    "04": ("features",),
    "05": ("probes",),
    "06": ("collapse",),
    "07": (),
}


def stage_config_hash(cfg: ProjectConfig, stage: str) -> str:
    """Hash of every config section this stage or an upstream stage reads."""
    sections: list[str] = []
    for key in STAGES:
        sections.extend(_STAGE_SECTIONS[key])
        if key == stage_key(stage):
            break
    return cfg.section_hash(*sections)


class StageFailed(RuntimeError):
    """A stage notebook raised; carries what the user needs to find the error."""

    def __init__(self, stage: str, notebook: Path, cell: int | None, error: str):
        self.stage, self.notebook, self.cell, self.error = stage, notebook, cell, error
        where = f"cell {cell}" if cell is not None else "unknown cell"
        super().__init__(f"stage {stage} failed in {where}: {error}\n  executed notebook kept at {notebook}")


def run_notebook(
    notebook: Path,
    output: Path,
    parameters: dict[str, Any],
    stage: str,
    cwd: Path = REPO_ROOT,
    progress: bool = True,
    log_output: bool = False,
) -> None:
    """Execute one notebook with papermill; raise StageFailed naming the cell and error on failure."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name=kernel_name(),
            cwd=str(cwd),
            progress_bar=progress,
            log_output=log_output,
            stdout_file=sys.stdout if log_output else None,
            stderr_file=sys.stderr if log_output else None,
        )
    except PapermillExecutionError as exc:
        cell = getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)
        raise StageFailed(stage, output, cell, f"{exc.ename}: {exc.evalue}") from None


def run_pipeline(
    profile: str = "smoke",
    only: list[str] | None = None,
    start_from: str | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    results_name: str | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    progress: bool = True,
    log_output: bool = False,
) -> dict[str, str]:
    """Run the stages of a profile in order; returns {stage: 'ran'|'skipped'}; raises StageFailed."""
    cfg = load_config(profile, overrides)
    if results_name:
        cfg.profile = results_name
    check_paper_inputs(cfg)
    paths = ResultsPaths.for_profile(cfg.profile, cfg.results_root)
    save_config(cfg, paths.config_path)

    selected = list(STAGES)
    if start_from:
        selected = selected[selected.index(stage_key(start_from)):]
    if only:
        wanted = {stage_key(s) for s in only}
        selected = [s for s in selected if s in wanted]
    status: dict[str, str] = {}
    upstream_ran = False
    for key in selected:
        nb_name, _ = STAGES[key]
        notebook = notebook_dir / f"{nb_name}.ipynb"
        if not notebook.is_file():
            raise FileNotFoundError(f"stage {nb_name}: notebook {notebook} not found")
        chash = stage_config_hash(cfg, key)
        if not force and not upstream_ran and paths.is_done(key, chash):
            print(f"[run_all] {nb_name}: done (same config {chash}), skipped", flush=True)
            status[key] = "skipped"
            continue
        paths.clear_done(key)
        t0 = time.time()
        runs = [None]
        if key == "03":
            runs = list(cfg.arms)
        for arm in runs:
            suffix = f"_{arm}" if arm else ""
            params = {"config_path": str(paths.config_path), "profile": cfg.profile, "force": bool(force)}
            if arm:
                params["arm"] = arm
            label = nb_name + (f" [{arm}]" if arm else "")
            print(f"[run_all] {label}: running", flush=True)
            run_notebook(
                notebook,
                paths.notebooks_dir / f"{nb_name}{suffix}.ipynb",
                params,
                label,
                progress=progress,
                log_output=log_output,
            )
        seconds = time.time() - t0
        paths.mark_done(key, chash, seconds=round(seconds, 2))
        print(f"[run_all] {nb_name}: finished in {seconds:.1f} s", flush=True)
        status[key] = "ran"
        upstream_ran = True
    return status


def check_paper_inputs(cfg: ProjectConfig) -> None:
    """The paper profile needs real slide and dataset folders: stop at once naming each missing path."""
    if cfg.profile != "paper":
        return
    from exaonepath_core.config import resolve_path

    missing = [f"data.slide_dirs: {p}" for p in cfg.data.slide_dirs if not resolve_path(p).is_dir()]
    if not cfg.data.slide_dirs and not cfg.data.slide_list:
        missing.append("data.slide_dirs: (none configured)")
    if cfg.data.slide_list and not resolve_path(cfg.data.slide_list).is_file():
        missing.append(f"data.slide_list: {cfg.data.slide_list}")
    missing += [
        f"data.downstream_roots.{name}: {root}"
        for name, root in cfg.data.downstream_roots.items()
        if not resolve_path(root).exists()
    ]
    if missing:
        raise ConfigError(
            "the paper profile needs these paths, which do not exist (edit configs/paper.yaml or pass "
            "--set data.slide_dirs=[...]):\n  " + "\n  ".join(missing)
        )


def _parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`key=v1,v2,...` -> (key, [v1, v2, ...]) with each value parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--sweep must look like key=v1,v2, got {text!r}")
    key, raw = text.split("=", 1)
    values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--sweep {key}: no values")
    return key.strip(), values


def main(argv: list[str] | None = None) -> int:
    """CLI of `./run_all.sh`."""
    ap = argparse.ArgumentParser(prog="run_all.sh", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=os.environ.get("EXAONEPATH_PROFILE", "smoke"),
                    help="configs/<profile>.yaml (smoke | ci | paper) or a path to a YAML file")
    ap.add_argument("--only", action="append", help="run only this stage (repeatable), e.g. --only 03")
    ap.add_argument("--from", dest="start_from", help="run this stage and every later one")
    ap.add_argument("--force", action="store_true", help="re-run stages even when their done-marker matches")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set pretrain.epochs=2")
    ap.add_argument("--sweep", metavar="KEY=V1,V2",
                    help="run the selected stages once per value, each into results/<profile>__<key>=<value>/; "
                         "`--sweep arms=raw,macenko` pretrains one arm per run")
    ap.add_argument("--log-output", action="store_true", help="stream notebook output to the terminal")
    ap.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    t0 = time.time()
    try:
        overrides = dict(parse_override(s) for s in args.sets)
        runs: list[tuple[dict[str, Any], str | None]] = [(overrides, None)]
        if args.sweep:
            key, values = _parse_sweep(args.sweep)
            profile_name = load_config(args.profile, overrides).profile
            runs = []
            for v in values:
                value = [v] if key == "arms" and not isinstance(v, list) else v
                runs.append(({**overrides, key: value}, f"{profile_name}__{key}={v}"))
        for run_overrides, name in runs:
            if name:
                print(f"[run_all] sweep run {name}", flush=True)
            run_pipeline(args.profile, args.only, args.start_from, args.force, run_overrides, name,
                         notebook_dir=args.notebook_dir, log_output=args.log_output)
    except StageFailed as exc:
        print(f"\n[run_all] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except (ConfigError, KeyError, FileNotFoundError) as exc:
        print(f"\n[run_all] ERROR: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"[run_all] all selected stages finished; total time {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
