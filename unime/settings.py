"""One config style for every command: a documented dataclass is the command's settings.

The flags, their help (each field's docstring) and their types come from the dataclass through `tyro`; every
command also reads a YAML file and dotted `key=value` overrides into the same dataclass:

    unime serve --config serve.yaml max_queue=64 --port 8001
    python recipes/train_embedder.py --config recipes/configs/stage2_hardneg_instruct.yaml optim.lr=1e-4

Precedence, lowest first: the dataclass defaults, the `--config` file, the dotted overrides (in the order
given), the flags. A nested field is `section.field` in an override and `--section.field` as a flag; YAML nests
it under `section:`. A wrong key or value fails with an error naming it (and the file) and the valid choices.

`tyro` was chosen over transformers' `HfArgumentParser` (already a dependency) because the training settings
nest dataclasses (`model.lora.r`), which `HfArgumentParser` does not support, and because tyro reads the help of
a flag from the field's docstring, which is how every settings class here documents its fields; it is
maintained and depends only on small pure-Python packages.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import tyro
import yaml

from unime.errors import ConfigError

T = TypeVar("T")

_OVERRIDE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)$", re.DOTALL)
"""A dotted `key.sub=value` command-line override."""


def parse_settings(
    cls: type[T],
    argv: Sequence[str],
    *,
    prog: str,
    description: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> T:
    """The settings of one command from its command line: `--config FILE`, dotted overrides and flags.

    Args:
        cls: the command's settings dataclass.
        argv: the command's arguments (without the program and command names).
        prog: the command as users type it, for usage and error lines (`unime serve`).
        description: the text at the head of `--help` (default: the class docstring).
        base: values under the config file (a preset, e.g. the quickstart's sizes), as a nested mapping.

    Raises:
        ConfigError: an unreadable config file, an unknown key or a value of the wrong type, in the file or in
            an override (named with the file and the dotted key).
        SystemExit: what argparse does for a bad flag (status 2, the message on stderr) and for `--help` (0).
    """
    config_files, overrides, rest = split_command_line(cls, argv)
    data: dict[str, Any] = _merge({}, base or {})
    for path in config_files:
        _merge(data, read_yaml_mapping(path))
    apply_overrides(data, overrides)
    where = ", ".join(map(str, config_files)) or "command line"
    # tyro builds an unchecked twin of `cls` and the class's own checks (`__post_init__`) run after, so that
    # their error reaches the caller as a ConfigError rather than being printed by tyro as a usage error.
    unchecked = _without_checks(cls)
    default = partial_instance(unchecked, data, where, "")
    if description is None:  # the class docstring, unless it is the signature dataclasses writes without one
        doc = cls.__doc__ or ""
        description = "" if doc.startswith(f"{cls.__name__}(") else doc
    parsed = tyro.cli(
        unchecked, args=list(rest), default=default, prog=prog, description=_with_config_usage(description)
    )
    values = {field.name: getattr(parsed, field.name) for field in dataclasses.fields(cls) if field.init}
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _without_checks(cls: type[T]) -> type[T]:
    """A dataclass subclass of `cls` whose `__post_init__` does nothing (same fields, defaults and docs)."""
    if not hasattr(cls, "__post_init__"):
        return cls
    twin = type(cls.__name__, (cls,), {"__post_init__": lambda self: None, "__doc__": cls.__doc__})
    twin.__module__ = cls.__module__
    return dataclasses.dataclass(frozen=cls.__dataclass_params__.frozen)(twin)


def split_command_line(cls: type, argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """`--config` files, dotted overrides (tokens `key.sub=value` whose key is a field of `cls`) and the rest."""
    keys = set(field_paths(cls))
    config_files: list[str] = []
    overrides: list[str] = []
    rest: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token == "--config":
            path = next(tokens, None)
            if path is None:
                raise ConfigError("--config needs a YAML file")
            config_files.append(path)
        elif token.startswith("--config="):
            config_files.append(token.partition("=")[2])
        elif (match := _OVERRIDE.match(token)) and (match.group(1) in keys or "." in match.group(1)):
            if match.group(1) not in keys:
                raise ConfigError(f"override {token!r}: unknown key; {_nearby_keys(match.group(1), keys)}")
            overrides.append(token)
        else:
            rest.append(token)
    return config_files, overrides, rest


def _nearby_keys(key: str, keys: set[str]) -> str:
    """The known keys of the deepest section of `key` that exists (all top-level keys when none does)."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        section = ".".join(parts[:depth]) + "."
        siblings = sorted(known for known in keys if known.startswith(section))
        if siblings:
            return f"known in {section[:-1]}: {siblings}"
    return f"known: {sorted({known.split('.')[0] for known in keys})}"


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a settings dataclass: its leaf fields, nested sections spelled out."""
    hints = typing.get_type_hints(cls)
    paths = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            paths.extend(field_paths(hint, f"{prefix}{field.name}."))
        else:
            paths.append(prefix + field.name)
    return paths


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted `key.sub=value` override (value parsed as YAML) in the nested dict `data`, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({err})") from err
    return data


def build_dataclass(cls: type[T], data: Mapping[str, Any], where: str, prefix: str = "") -> T:
    """Build `cls` from nested mappings, checking keys and value types against the type hints."""
    _check_keys(cls, data, where, prefix)
    hints = typing.get_type_hints(cls)
    values = {name: _check_value(hints[name], value, where, prefix + name) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field left out
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {err}") from err


def partial_instance(cls: type[T], data: Mapping[str, Any], where: str, prefix: str = "") -> T:
    """`cls` with the checked values of `data`, the class defaults elsewhere, and `tyro.MISSING` for required
    fields that `data` leaves out (the command line must then give them).

    `__post_init__` does not run here: the instance only carries defaults into `tyro.cli`, which builds the
    real one (and so runs the class's own checks) from the final values.
    """
    _check_keys(cls, data, where, prefix)
    hints = typing.get_type_hints(cls)
    instance = object.__new__(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        key = prefix + field.name
        if dataclasses.is_dataclass(hint):
            value = partial_instance(hint, data.get(field.name) or {}, where, key + ".")
        elif field.name in data:
            value = _check_value(hint, data[field.name], where, key)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = tyro.MISSING
        object.__setattr__(instance, field.name, value)
    return instance


def _check_keys(cls: type, data: Mapping[str, Any], where: str, prefix: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    known = sorted(field.name for field in dataclasses.fields(cls) if field.init)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; known: {known}")


def _check_value(hint: Any, value: Any, where: str, key: str) -> Any:
    """`value` as `hint` wants it, or a ConfigError naming `key`, the value and what was expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(option, value, where, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {key}: {value!r} matches none of {hint}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {type(value).__name__} {value!r}")
        items = typing.get_args(hint)
        if origin is list or (len(items) == 2 and items[1] is Ellipsis):
            return origin(_check_value(items[0], item, where, f"{key}[{i}]") for i, item in enumerate(value))
        if len(items) != len(value):
            raise ConfigError(f"{where}: {key}: expected {len(items)} values, got {len(value)}")
        return tuple(
            _check_value(item_hint, item, where, f"{key}[{i}]")
            for i, (item_hint, item) in enumerate(zip(items, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {
            _check_value(key_hint, name, where, key): _check_value(value_hint, item, where, f"{key}.{name}")
            for name, item in value.items()
        }
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: {key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {hint}")


def _merge(target: dict[str, Any], source: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `source` into `target` (sections merged key by key, other values replaced)."""
    for key, value in source.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = dict(value) if isinstance(value, Mapping) else value
    return target


def _with_config_usage(description: str) -> str:
    return (
        f"{description.strip()}\n\nAlso takes `--config FILE.yaml` (keys as the flags, nested under sections, "
        "with `_` for `-`) and dotted `key=value` overrides (values are YAML). Precedence, lowest first: defaults, "
        "--config, overrides, flags."
    )
