"""Reading a profile: YAML with inheritance and environment variables, built into the typed `ProjectConfig`.

A profile file may name a parent with ``inherits: other.yaml`` (a path relative to the file); the child's
mappings are merged key by key into the parent's, except ``data.downstream_roots``, which the child REPLACES
whole (a profile lists exactly the datasets it evaluates; see `DataSection`). A file or ``--set`` value that is
not valid YAML is a ConfigError naming the file (or the override), line, column and the YAML problem. Strings
may use ``${VAR}`` or ``${VAR:-default}`` to read environment variables, and relative paths are resolved against
the repository root by the stage code (`resolve_path`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from exaonepath_core.config.checks import validate_values
from exaonepath_core.config.pretrain import validate_pretrain_section
from exaonepath_core.config.schema import ProjectConfig
from exaonepath_core.config.values import ConfigError, check_value
from exaonepath_core.config.vocabulary import resolve_nproc_per_node

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


# Mappings a child profile replaces whole rather than merging (see DataSection): a profile that names its own
# datasets should not silently also evaluate its parent's, e.g. smoke's small subsets plus paper's full sets.
REPLACED_MAPPINGS = ("downstream_roots",)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED_MAPPINGS:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_with_inheritance(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML mapping, following `inherits:` to parent files (cycles are an error)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"inheritance cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:  # unreadable, or not a text file at all
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err, text)}; check the "
                          "indentation (spaces, a child key indented deeper than its parent) and that brackets "
                          "and quotes are closed") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("inherits", None)
    if parent:
        base = read_yaml_with_inheritance(path.parent / parent, (*_seen, path))
        data = _deep_merge(base, data)
    return data


def _yaml_problem(err: yaml.YAMLError, text: str, column_offset: int = 0) -> str:
    """One line from a PyYAML error: the problem, 1-based line and column, the offending line, the context."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None or mark is None:  # e.g. a ReaderError (a control character): no mark, its own text
        return " ".join(str(err).split())
    lines = text.splitlines()
    where = f"line {mark.line + 1}, column {mark.column + 1 + column_offset}"
    if 0 <= mark.line < len(lines) and lines[mark.line].strip():
        where += f" ({lines[mark.line].rstrip()!r})"
    out = f"{problem} at {where}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        out += (f", {context} that starts at line {context_mark.line + 1}, "
                f"column {context_mark.column + 1 + column_offset}")
    elif context:
        out += f", {context}"
    return out


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config key(s): {names} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {} if value is None else value, dotted)
        else:
            kwargs[name] = check_value(dotted, hints[name], value)
    return cls(**kwargs)



def load_config(path_or_profile: str | Path, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """Load a profile by name (`configs/<name>.yaml`) or path, apply dotted overrides, validate every key."""
    p = Path(path_or_profile)
    if not p.suffix and not p.exists():
        p = CONFIG_DIR / f"{path_or_profile}.yaml"
    data = read_yaml_with_inheritance(p)
    for dotted, value in (overrides or {}).items():
        cursor = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = value
    data = _expand_env(data)
    if "nproc_per_node" in data:  # `auto`: one process per visible GPU, 1 without one (typed as an int below)
        data["nproc_per_node"] = resolve_nproc_per_node(data["nproc_per_node"])
    cfg = _build(ProjectConfig, data, "")
    validate_pretrain_section(cfg.pretrain)
    validate_values(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `a.b=value` (value parsed as YAML, so numbers and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        # the column counts from the start of the whole `key=value` text, as the user typed it
        raise ConfigError(f"override {text!r} is not valid YAML: {_yaml_problem(err, raw, len(key) + 1)}; close "
                          f"the brackets (e.g. --set {key.strip()}=[0, 1]) or quote a plain string") from None


def resolve_path(value: str | Path, base: Path = REPO_ROOT) -> Path:
    """A config path: absolute as given, relative ones against the repository root."""
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p).resolve()


def load_run_config(config_path: str | Path = "", profile: str = "smoke") -> ProjectConfig:
    """The resolved config a stage notebook reads: `config_path` when set, else `<results_root>/<profile>/config.yaml`
    (written by `./run_all.sh`); a missing file says which command writes it."""
    if str(config_path).strip():
        path = Path(config_path)
        if not path.is_absolute() and not path.exists():  # JupyterLab runs notebooks from notebooks/
            path = resolve_path(path)
        return load_config(path)
    if not str(profile).strip():
        raise ConfigError("a stage notebook needs `config_path` or `profile` (e.g. profile = \"smoke\")")
    try:  # a profile name or YAML: its results_root and folder name
        profile_cfg = load_config(profile)
        root, name, cli_profile = profile_cfg.results_root, profile_cfg.results_name, profile
    except ConfigError:  # e.g. a sweep folder `smoke__arms=raw`: no configs/<name>.yaml
        root, name, cli_profile = "results", str(profile), str(profile).split("__", 1)[0]
    path = resolve_path(root) / name / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no resolved config for profile {profile!r} at {path}: the runner writes it. Run "
            f"`./run_all.sh --profile {cli_profile} --only 01` first (or the whole pipeline without --only), "
            f"or set the notebook's config_path to a run's config.yaml")
    return load_config(path)
