"""The staged notebook runner behind `./run_all.sh`: papermill per stage, done-markers, skip/force/from/only, sweeps.

Each stage is one notebook in `notebooks/`. The runner resolves the profile's config once, writes it to
`results/<run>/config.yaml` (`<run>`: the profile name, or `run_name` such as `smoke__arms=raw` in a sweep), and
executes each notebook with papermill, passing the parameters it declares among `config_path`, `profile`, `force`
(and, for stage 03, one `arm` per run so each pretraining arm keeps its own executed copy).
A stage whose done-marker carries the same config hash is skipped; once a stage runs, every later stage runs too.
The hash covers the config keys the stage or an upstream stage reads (each stage module's `SPEC`), less those
that change speed or display only (`stages.base.HASH_EXCLUDED_KEYS`).
A failing notebook stops the run with exit code 1, naming the stage, the failing cell and the error; the
executed notebook (with the traceback in it) is kept under `results/<profile>/notebooks/`.
One runner works on a run folder at a time (`hold_run_folder`: a second exits 4 naming the first), except shards
of stage 01 or 02 (`tiling.shard`, `normalize.shard`), which share it, each with its own config file and executed
notebook, and leave the done-marker to the run without a shard.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exaonepath_core.config import (
    REPO_ROOT,
    ConfigError,
    ProjectConfig,
    load_config,
    parse_override,
    parse_shard,
    resolve_path,
    shard_count,
)
from exaonepath_core.data.downstream.check import available_datasets
from exaonepath_core.io.atomic import LockBusy, file_lock
from exaonepath_core.io.config_file import save_config
from exaonepath_core.stages import config_checks, registry
from exaonepath_core.stages.registry import SPECS, STAGES, stage_config_hash, stage_key
from exaonepath_core.stages.results import ResultsPaths, missing_upstream

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "exaonepath"  # registered into .venv by run_all.sh; falls back to the running interpreter's python3


def kernel_name() -> str:
    """The project's kernel when registered, else `python3` (ipykernel's spec for the running interpreter)."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"

class RunBusy(RuntimeError):
    """Another runner is working on the same run folder."""


# Temp names of `atomic` (mkstemp/mkdtemp: `.<name>.<8 random>.tmp` / `.old`), of the QC figures
# (`.<stem>.tmp.png`) and of the report (`.index.html.tmp`); nothing else, so a user's `.notes.old` stays
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$|^\..+\.tmp\.png$|^\.index\.html\.tmp$")


def is_temp_name(name: str) -> bool:
    """True for a temp file or folder that an atomic write leaves behind only when its process is killed."""
    return bool(_TEMP_NAME.match(name))


STALE_TEMP_AGE_S = 600.0


def remove_stale_temp_files(folder: Path, older_than_s: float = STALE_TEMP_AGE_S) -> tuple[int, int]:
    """Delete the temp files and folders that killed writes left under `folder`; returns (count, bytes).

    Called by a runner that holds its run folder alone, so no other runner is writing. The age limit (newest
    modification inside, 10 minutes by default) spares a write still going on from a notebook opened by hand.
    Superseded folders are left as they were moved aside.
    """
    now, count, size = time.time(), 0, 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if ".superseded-" not in d]
        for name in [d for d in dirnames if is_temp_name(d)] + [f for f in filenames if is_temp_name(f)]:
            path = Path(dirpath) / name
            entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
            try:
                stats = [e.lstat() for e in entries]
            except FileNotFoundError:  # removed meanwhile by whoever wrote it
                continue
            if now - max(st.st_mtime for st in stats) < older_than_s:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                dirnames.remove(name)
            else:
                path.unlink(missing_ok=True)
            count, size = count + 1, size + sum(st.st_size for st in stats)
    return count, size


@contextlib.contextmanager
def hold_run_folder(profile_dir: Path, shard_tag: str = "") -> Iterator[bool]:
    """Hold `profile_dir/.run_all.lock` for a run, alone or shared with other shards; yields True if held alone.

    A run that is not sharded holds the folder alone: a second runner on the same folder would supersede,
    resume and mark done the stages under the first one's feet, so it is refused with `RunBusy` naming the
    holder. Shards of one stage (SLURM array tasks) share the folder, each holding its own shard's lock too.
    The kernel releases a dead runner's locks. On a file system without flock the run goes on unguarded.
    """
    holder = (f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
              + " ".join(sys.argv))
    wanted = [(profile_dir / ".run_all.lock", bool(shard_tag))]  # (lock file, shared)
    if shard_tag:
        wanted.append((profile_dir / f".run_all.{shard_tag}.lock", False))
    with contextlib.ExitStack() as stack:
        guarded = True
        for path, shared in wanted:
            try:
                guarded = stack.enter_context(file_lock(path, shared=shared, holder=holder)) and guarded
            except LockBusy:
                others = [p.read_text().strip() for p in sorted(profile_dir.glob(".run_all*.lock"))]
                named = "; ".join(o for o in others if o) or "a sharded run"
                raise RunBusy(
                    f"another ./run_all.sh is working on {profile_dir} ({named}). Wait for it to finish, or give "
                    "this run its own folder with --set run_name=NAME") from None
        if not guarded:
            print(f"[run_all] WARNING: cannot lock {profile_dir}/.run_all.lock (no flock on this file system); "
                  "running without the guard against a second runner on this folder", flush=True)
        yield guarded and not shard_tag


@contextlib.contextmanager
def _stage_setup_lock(profile_dir: Path, stage: str) -> Iterator[None]:
    """A short exclusive lock (waiting) around a stage's supersede / mark-inputs step."""
    with file_lock(profile_dir / f".stage-{stage_key(stage)}.setup.lock", wait=True):
        yield


def prepare_stage_folder(paths: ResultsPaths, stage: str, config_hash: str) -> Path | None:
    """Before a stage runs: move its outputs of another config aside (not a per-arm stage's, 03, which decides
    per arm),
    clear its done-marker and record the config it is now built from; returns where old outputs went.

    Shards starting together share the folder: one at a time does this under a short lock, so a second shard
    finds the first one's marker instead of moving its fresh folder aside as the old config's.
    """
    key = stage_key(stage)
    with _stage_setup_lock(paths.profile_dir, key):
        moved = None if SPECS[key].per_arm else paths.supersede_outputs(key, config_hash)
        paths.clear_done(key)
        paths.mark_inputs(key, config_hash)
    return moved


def _shards(cfg: ProjectConfig) -> list[tuple[str, str, str]]:
    """(config section, stage, "i/N") of each stage this run does only a part of (N > 1)."""
    return [(section, stage, value)
            for section, stage, value in (("tiling", "01", cfg.tiling.shard), ("normalize", "02", cfg.normalize.shard))
            if shard_count(value) > 1]


def shard_tag(cfg: ProjectConfig) -> str:
    """'' for a whole run, else e.g. 'tiling-shard1of4': names this shard's config, notebooks and lock."""
    # parsed: "01/4" and "1/4" are one shard, with one lock
    return ".".join("{}-shard{}of{}".format(section, *parse_shard(value)) for section, _, value in _shards(cfg))


def sharded_stages(cfg: ProjectConfig) -> set[str]:
    """The stages this run does only a part of (a done-marker is written by the run without a shard)."""
    return {stage for _, stage, _ in _shards(cfg)}


def stage_warnings(stage: str, stage_dir: Path, cfg: ProjectConfig) -> list[str]:
    """What a finished stage's own tables say went wrong (failed slides, datasets not loaded), one line each
    (the stage module's `warnings`; none for a stage without one).

    The notebooks count every failure in their tables; this puts the counts on the console, where a run that
    exits 0 would otherwise leave them unseen.
    """
    check = getattr(registry.module(stage), "warnings", None)
    return check(Path(stage_dir), cfg) if check is not None else []


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
    from traitlets.config import Config

    output.parent.mkdir(parents=True, exist_ok=True)
    # The kernel talks to papermill over Unix sockets in a private temp folder, not over TCP on localhost:
    # nothing listens on a port, and ipykernel has no reason to warn about unencrypted TCP at every stage.
    with tempfile.TemporaryDirectory(prefix="exaonepath-kernel-") as sockets:
        ipc = {"transport": "ipc", "ip": os.path.join(sockets, "kernel")} if os.name == "posix" else {}
        kernel_config = Config({"KernelManager": ipc})
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
                config=kernel_config,
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
    cfg = config_checks.load_checked_config(profile, overrides)
    if results_name:
        cfg.run_name = results_name  # the folder only: cfg.profile and cfg.strict_inputs keep the profile's values
    selected = list(STAGES)
    if start_from:
        selected = selected[selected.index(stage_key(start_from)):]
    if only:
        wanted = {stage_key(s) for s in only}
        selected = [s for s in selected if s in wanted]
    check_shards(cfg, selected)
    check_paper_inputs(cfg)
    for key in selected:  # each stage's own checks before any stage runs (e.g. 03: ranks the device can hold)
        preflight = getattr(registry.module(key), "preflight", None)
        if preflight is not None:
            preflight(cfg)
    paths = ResultsPaths.for_profile(cfg.results_name, cfg.results_root)
    if selected:  # the stages this run does not run must have finished before: say so before any work
        missing = [k for k in missing_upstream(cfg, paths, selected[0]) if k not in selected]
        if missing:
            again = "the same command" + (" (with the same --sweep)" if results_name else "")
            raise ConfigError(
                f"stage {STAGES[selected[0]][0]} needs stage(s) {', '.join(STAGES[k][0] for k in missing)} of run "
                f"{cfg.results_name!r} first (no done-marker under {paths.profile_dir}): run {again} with "
                f"--from {missing[0]} instead of --only/--from {selected[0]}")
    tag = shard_tag(cfg)
    with hold_run_folder(paths.profile_dir, tag) as alone:
        if alone:
            count, size = remove_stale_temp_files(paths.profile_dir)
            if count:
                print(f"[run_all] removed {count} temp file(s)/folder(s), {size / 2**20:.1f} MiB, that an "
                      f"interrupted run left under {paths.profile_dir}", flush=True)
        return _run_stages(cfg, paths, selected, tag, force, notebook_dir, progress, log_output)


def _run_stages(cfg: ProjectConfig, paths: ResultsPaths, selected: list[str], tag: str, force: bool,
                notebook_dir: Path, progress: bool, log_output: bool) -> dict[str, str]:
    """The stage loop of `run_pipeline`, with the run folder held."""
    # Shards running at once must not read each other's config (the shard value differs) or write one notebook
    config_path = paths.profile_dir / f"config.{tag}.yaml" if tag else paths.config_path
    save_config(cfg, config_path)
    partial = sharded_stages(cfg)

    status: dict[str, str] = {}
    upstream_ran = False
    all_warnings: list[str] = []
    for key in selected:
        nb_name, _ = STAGES[key]
        notebook = notebook_dir / f"{nb_name}.ipynb"
        if not notebook.is_file():
            raise FileNotFoundError(f"stage {nb_name}: notebook {notebook} not found")
        chash = stage_config_hash(cfg, key)
        if not force and not upstream_ran and paths.is_done(key, chash):
            earlier = paths.done_info(key).get("warnings") or []
            print(f"[run_all] {nb_name}: done (same config {chash}), skipped"
                  + (f"; its run had {len(earlier)} warning(s): " + " | ".join(earlier) if earlier else ""),
                  flush=True)
            status[key] = "skipped"
            continue
        moved = prepare_stage_folder(paths, key, chash)
        if moved is not None:
            print(f"[run_all] {nb_name}: its outputs were built from another config; moved aside to "
                  f"{moved} (delete it when no longer needed) and rebuilt", flush=True)
        t0 = time.time()
        runs = list(cfg.arms) if SPECS[key].per_arm else [None]
        declared = notebook_parameters(notebook)
        for arm in runs:
            suffix = (f"_{arm}" if arm else "") + (f".{tag}" if tag else "")
            offered = {"config_path": str(config_path), "profile": cfg.results_name, "force": bool(force)}
            if arm:
                offered["arm"] = arm
            params = {k: v for k, v in offered.items() if k in declared}
            label = nb_name + (f" [{arm}]" if arm else "") + (f" [{tag}]" if tag else "")
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
        if key in partial:
            print(f"[run_all] {nb_name}: this shard finished in {seconds:.1f} s; the stage is marked done by a "
                  "run without the shard setting once every shard has finished (it skips their slides)",
                  flush=True)
            status[key] = "ran (shard)"
            continue
        warnings = stage_warnings(key, paths.stage_dir(key, create=False), cfg)
        for text in warnings:
            print(f"[run_all] WARNING {nb_name}: {text}", flush=True)
        all_warnings += [f"{nb_name}: {text}" for text in warnings]
        paths.mark_done(key, chash, seconds=round(seconds, 2), warnings=warnings)
        print(f"[run_all] {nb_name}: finished in {seconds:.1f} s"
              + (f" with {len(warnings)} warning(s) (above)" if warnings else ""), flush=True)
        status[key] = "ran"
        upstream_ran = True
    if all_warnings:  # once more at the end, where a long run's last lines are read
        print(f"[run_all] {len(all_warnings)} warning(s) in this run:\n  " + "\n  ".join(all_warnings), flush=True)
    return status


def notebook_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's `parameters` cell; it must declare `config_path` (the runner's handle)."""
    import papermill as pm

    declared = set(pm.inspect_notebook(str(notebook)))
    if "config_path" not in declared:
        raise ConfigError(f"{notebook}: its cell tagged 'parameters' must declare config_path")
    return declared


def check_shards(cfg: ProjectConfig, selected: list[str]) -> None:
    """A sharded tiling (normalization) run does part of stage 01 (02): refuse to run any later stage with it."""
    for section, stage, value in _shards(cfg):
        later = [s for s in selected if s > stage]
        if later:
            dotted = f"{section}.shard"
            raise ConfigError(
                f"{dotted}={value} handles one part of stage {stage} only, but stage(s) {', '.join(later)} are "
                f"selected too: run each shard with --only {stage} (e.g. one SLURM array task each), then once "
                f"without {dotted} (default 0/1) for the rest (--from {stage}: finished slides are skipped)")


def check_paper_inputs(cfg: ProjectConfig) -> None:
    """With `strict_inputs` (the paper profile), stop at once naming each missing slide or dataset path."""
    if not cfg.strict_inputs:
        return
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
            f"profile {cfg.profile!r} has strict_inputs: true and needs these paths, which do not exist (edit the "
            "profile's YAML or pass --set data.slide_dirs=[...]; strict_inputs: false for a deliberate subset):\n  "
            + "\n  ".join(missing)
        )
    # the layouts too (class folders, h5 keys; no decoding): a broken dataset found in stage 04 would come after
    # days of pretraining, and would then only be listed as absent
    roots = {name: resolve_path(root) for name, root in cfg.data.downstream_roots.items()}
    status = available_datasets(roots, strict=True, names=list(roots))
    broken = [f"data.downstream_roots.{name}: {text}" for name, text in status.items() if text != "present"]
    if broken:
        raise ConfigError(
            f"profile {cfg.profile!r} has strict_inputs: true and these datasets are not readable as laid out "
            "(`python -m exaonepath_core.data.downstream check --dataset NAME --root DIR [--deep]` for details):\n  "
            + "\n  ".join(broken)
        )


def _parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`key=v1,v2,...` -> (key, [v1, v2, ...]) with each value parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--sweep must look like key=v1,v2, got {text!r}")
    key, raw = text.split("=", 1)
    try:  # one YAML flow sequence, so a value may itself be a list: probes.seeds=[0],[0,1,2]
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError as exc:
        raise ConfigError(f"--sweep {text!r}: the values are not a comma-separated YAML list ({exc.problem}); "
                          "e.g. --sweep probes.n_boot=100,1000 or --sweep 'probes.seeds=[0],[0,1,2]'") from None
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
            base_name = load_config(args.profile, overrides).results_name
            runs = []
            for v in values:
                value = [v] if key == "arms" and not isinstance(v, list) else v
                shown = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else v
                runs.append(({**overrides, key: value}, f"{base_name}__{key}={shown}".replace(os.sep, "_")))
        for run_overrides, name in runs:
            if name:
                print(f"[run_all] sweep run {name}", flush=True)
            run_pipeline(args.profile, args.only, args.start_from, args.force, run_overrides, name,
                         notebook_dir=args.notebook_dir, log_output=args.log_output)
    except StageFailed as exc:
        print(f"\n[run_all] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except RunBusy as exc:
        print(f"\n[run_all] ERROR: {exc}", file=sys.stderr, flush=True)
        return 4
    except (ConfigError, KeyError, FileNotFoundError) as exc:
        print(f"\n[run_all] ERROR: {exc}", file=sys.stderr, flush=True)
        return 2
    except PermissionError as exc:  # e.g. a read-only results_root: say so before any stage, not as a traceback
        print(f"\n[run_all] ERROR: cannot write {exc.filename}: {exc.strerror} (check results_root and its "
              "permissions)", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\n[run_all] interrupted: finished stages keep their done-markers, and a rerun resumes the "
              "interrupted one (tiling and normalization per slide, pretraining from its last checkpoint)",
              file=sys.stderr, flush=True)
        return 130
    print(f"[run_all] all selected stages finished; total time {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
