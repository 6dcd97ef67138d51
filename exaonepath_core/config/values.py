"""The one value checker of every config section: a YAML value against its field's annotation."""
from __future__ import annotations

import contextlib
import re
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration file is malformed, names an unknown key or a missing path, or a setting is inconsistent."""


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def describe_type(hint: Any) -> str:
    """An annotation in words: `list[str]` -> 'a list of strings'."""
    origin = typing.get_origin(hint)
    if origin is list:
        item = typing.get_args(hint)[0]
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural or describe_type(item)}"
    if origin is dict:
        return f"a mapping of name: {describe_type(typing.get_args(hint)[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(hint))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_value(dotted: str, hint: Any, value: Any) -> Any:
    """`value` checked against the annotation `hint` (numbers written as strings, e.g. 1e-4 or from ${VAR}, are
    converted; ints are accepted where floats are expected); raise ConfigError naming key, value and type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) > 1:  # e.g. `float | str` (schedule lengths): the first member that takes the value
            for member in members:
                with contextlib.suppress(ConfigError):
                    return check_value(dotted, member, value)
            got = "null" if value is None else f"{type(value).__name__} {value!r}"
            raise ConfigError(f"config key {dotted}: expected {describe_type(hint)}, got {got}")
        (hint,) = members
        origin, args = typing.get_origin(hint), typing.get_args(hint)

    def wrong(extra: str = "") -> ConfigError:
        got = "null" if value is None else f"{type(value).__name__} {value!r}"
        return ConfigError(f"config key {dotted}: expected {describe_type(hint)}, got {got}{extra}")

    if hint is Any:
        return value
    if value is None:
        raise wrong(' (write "" for an empty string)' if hint is str else "")
    if origin is list:
        if not isinstance(value, list):
            raise wrong(f" (a list is written [a, b], e.g. --set {dotted}=[{value}])")
        return [check_value(f"{dotted}[{i}]", args[0], item) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        return {key: check_value(f"{dotted}.{key}", args[1], item) for key, item in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if isinstance(value, str) and hint in (int, float) and (_INTEGER if hint is int else _NUMBER).fullmatch(
            value.strip()):
        value = (int if hint is int else float)(value.strip())
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise TypeError(f"config key {dotted}: annotation {hint!r} has no checker")  # a new field type: add one

