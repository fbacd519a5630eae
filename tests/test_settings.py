"""One config style: every field of every command is reachable from flags, from YAML and from dotted overrides,
`--help` lists it, and wrong keys and values are named with the valid choices."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from unime.cli import COMMANDS, Command, main
from unime.errors import ConfigError
from unime.settings import field_paths, parse_settings
from unime.train.config import TrainConfig

TRAIN = Command("train", "the training scripts (recipes/train_*.py)", lambda: (TrainConfig, None))
ALL_COMMANDS = [*COMMANDS, TRAIN]


def _settings_class(command: Command) -> type:
    return command.load()[0]


def _parse(command: Command, argv: list[str]) -> Any:
    cls = _settings_class(command)
    prog = f"unime {command.name}"
    if command.parse is not None:
        return command.parse(cls, argv, prog, command.help)
    return parse_settings(cls, argv, prog=prog, description=command.help)


def _field(cls: type, path: str) -> tuple[dataclasses.Field, Any, Any]:
    """The dataclass field at a dotted path, its type hint (extras kept) and its default."""
    *sections, name = path.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None
    return field, hint, default


def _is_positional(hint: Any) -> bool:
    return "Positional" in repr(hint) or "PositionalRequiredArgs" in repr(hint)


def _strip(hint: Any) -> Any:
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


SPECIAL_VALUES: dict[str, Any] = {"base_url": "http://127.0.0.1:9/v1", "min_score": 5}
"""Fields whose values are checked beyond their type (a URL's scheme, a score from 1 to 5)."""


def _sample(name: str, hint: Any, default: Any, tmp_path: Path) -> Any:
    """A valid value of `hint` that differs from `default`."""
    if name in SPECIAL_VALUES:
        return SPECIAL_VALUES[name]
    if name == "chat_template":  # must name an existing file
        path = tmp_path / "template.jinja"
        path.write_text("{{ messages }}")
        return str(path)
    hint = _strip(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        return _sample(name, options[0], default, tmp_path)
    if origin is Literal:
        return next(choice for choice in typing.get_args(hint) if choice != default)
    if origin is tuple and typing.get_args(hint)[-1] is Ellipsis:
        return tuple(default[:1]) if default else ("value",)  # choices restricted to known values: a subset
    if origin is tuple:
        return tuple(range(3, 3 + len(typing.get_args(hint))))
    if origin is list:
        item = typing.get_args(hint)[0]
        if typing.get_origin(item) is Literal:
            return list(typing.get_args(item)[:2])
        return ["first", "second"] if item is str else [3, 5]
    if origin is dict:
        return {"key": 7}
    if hint is bool:
        return not default
    if hint is int:
        return (default or 0) + 3
    if hint is float:
        return (default or 0.0) + 0.25
    if hint is str:
        return f"{name}-value"
    raise AssertionError(f"no sample for {name}: {hint}")


def _tokens(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    if isinstance(value, dict):
        return [str(item) for pair in value.items() for item in pair]
    return [str(value)]


def _flag(path: str, value: Any) -> list[str]:
    """The flag as `--help` spells it: every part with `-` for `_`."""
    *sections, name = path.replace("_", "-").split(".")
    flag = "--" + ".".join([*sections, name])
    if isinstance(value, bool):
        prefix = "--" + ".".join(sections) + "." if sections else "--"
        return [flag] if value else [f"{prefix}no-{name}"]
    return [flag, *_tokens(value)]


def _positionals(cls: type, tmp_path: Path) -> dict[str, list[str]]:
    """The positional fields of `cls` (in order) and command-line words for each."""
    words = {}
    for path in field_paths(cls):
        field, hint, default = _field(cls, path)
        if _is_positional(hint):
            words[path] = _tokens(_sample(path, hint, None, tmp_path))
    return words


def _nested(path: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = value if not isinstance(value, tuple) else list(value)
    for part in reversed(path.split(".")):
        data = {part: data}
    return data


def _merge_into(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def _yaml_word(value: Any) -> str:
    """`value` as one YAML word of a dotted override."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def _get(settings: Any, path: str) -> Any:
    for part in path.split("."):
        settings = getattr(settings, part)
    return settings


def _cases() -> list[tuple[Command, str]]:
    return [(command, path) for command in ALL_COMMANDS for path in field_paths(_settings_class(command))]


@pytest.mark.parametrize(("command", "path"), _cases(), ids=lambda value: getattr(value, "name", value))
def test_every_field_is_reachable_from_flags_yaml_and_overrides(command, path, tmp_path, capsys) -> None:
    cls = _settings_class(command)
    field, hint, default = _field(cls, path)
    value = _sample(field.name, hint, default, tmp_path)
    expected = tuple(value) if isinstance(default, tuple) or _strip(hint) is tuple else value
    positionals = _positionals(cls, tmp_path)
    positional_names = list(positionals)
    positional_values = [word for words in positionals.values() for word in words]
    # The serve command needs a model; giving the reranker too lets a reranker-only setting be valid.
    required = ["--reranker", "reranker-dir"] if command.name == "serve" and path != "reranker_dir" else []
    required += ["--backend", "openai"] if command.name == "generate" and path != "backend" else []
    if path in positionals:
        argv = [word for name, words in positionals.items() for word in (_tokens(value) if name == path else words)]
    else:
        argv = [*positional_values, *_flag(path, value)]
    assert _get(_parse(command, [*argv, *required]), path) == expected, f"flag {argv}"

    # A positional field given by the file or an override: the other positionals are given there too (a later
    # positional cannot follow one the command line leaves out).
    given = {path: value}
    if path in positional_names:
        given.update({name: _sample(name, _field(cls, name)[1], None, tmp_path) for name in positional_names})
        given[path] = value
    cli_positionals = [] if path in positional_names else positional_values
    data: dict[str, Any] = {}
    for name, item in given.items():
        _merge_into(data, _nested(name, item))
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(data))
    from_yaml = [*cli_positionals, "--config", str(tmp_path / "settings.yaml")]
    assert _get(_parse(command, [*from_yaml, *required]), path) == expected, "YAML"

    overrides = [f"{name}={_yaml_word(item)}" for name, item in given.items()]
    assert _get(_parse(command, [*cli_positionals, *overrides, *required]), path) == expected, overrides

    if not _is_positional(hint):
        with pytest.raises(SystemExit):
            _parse(command, ["--help"])
        assert _flag(path, value)[0] in capsys.readouterr().out.replace("\n", " ")


def test_precedence_is_defaults_then_file_then_overrides_then_flags(tmp_path) -> None:
    (tmp_path / "serve.yaml").write_text("embedder_dir: from-file\nmax_queue: 10\nport: 9000\nhost: 0.0.0.0\n")
    argv = ["--config", str(tmp_path / "serve.yaml"), "max_queue=20", "port=9100", "--port", "9200"]
    settings = _parse(next(c for c in COMMANDS if c.name == "serve"), argv)
    assert (settings.embedder_dir, settings.host) == ("from-file", "0.0.0.0")  # the file over the defaults
    assert settings.max_queue == 20  # an override over the file
    assert settings.port == 9200  # a flag over both
    assert settings.max_items == 256  # untouched: the default


def test_quickstart_size_preset_lies_under_the_users_settings(tmp_path) -> None:
    command = next(c for c in COMMANDS if c.name == "quickstart")
    ci = _parse(command, ["--size", "ci"])
    assert (ci.stage1.max_steps, ci.data.text_train) == (60, 256)
    assert _parse(command, ["size=ci", "stage1.max_steps=7"]).stage1.max_steps == 7
    (tmp_path / "q.yaml").write_text("size: ci\nstage2:\n  max_steps: 9\n")
    from_file = _parse(command, ["--config", str(tmp_path / "q.yaml")])
    assert (from_file.stage1.max_steps, from_file.stage2.max_steps) == (60, 9)


def test_wrong_keys_and_values_are_named_with_the_valid_choices(tmp_path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("embedder_dir: m\nbackend: torch\n")
    assert main(["serve", "--config", str(tmp_path / "bad.yaml")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'bad.yaml'}: backend: expected one of ['auto', 'vllm', 'transformers'], got 'torch'" in error

    (tmp_path / "unknown.yaml").write_text("embedder_dir: m\nmax_queues: 3\n")
    assert main(["serve", "--config", str(tmp_path / "unknown.yaml")]) == 2
    error = capsys.readouterr().err
    assert "unknown key(s) max_queues; known: [" in error and "'max_queue'" in error

    with pytest.raises(ConfigError, match=r"override 'optim\.lrr=1': unknown key; known in optim: \[.*'optim\.lr'"):
        parse_settings(TrainConfig, ["optim.lrr=1"], prog="train")
    with pytest.raises(ConfigError, match=r"loss\.name: expected one of \['info_nce', .*got 'nope'"):
        parse_settings(TrainConfig, ["loss.name=nope"], prog="train")

    assert main(["serve", "m", "--backend", "torch"]) == 2
    error = " ".join(capsys.readouterr().err.replace("│", " ").split())  # the usage error is drawn in a box
    assert "invalid choice 'torch' for argument '--backend'. Expected one of ('auto', 'vllm', 'transformers')" in error
    assert main(["serve", "m", "--max-queue", "0"]) == 2
    assert "unime serve: error: max_queue must be >= 1, got 0" in capsys.readouterr().err


def test_unknown_commands_are_named_with_the_known_ones(capsys) -> None:
    assert main(["serv"]) == 2
    assert "unknown command 'serv'; known: backbones, convert, demo, encode, eval, generate" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "`unime eval` needs one of: run, synthetic, compare" in capsys.readouterr().err
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(command.name in listed for command in COMMANDS)
