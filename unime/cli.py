"""The `unime` command line: one table of commands, each a settings dataclass and the function that runs it.

Every command reads its settings the same way (`unime.settings.parse_settings`): flags generated from the
dataclass, `--config FILE.yaml`, and dotted `key=value` overrides. The apps (`unime.eval`, `unime.serve`,
`unime.data_synth`, `unime.quickstart`) are imported only when their command runs, so `unime --help` and the
library's own commands start without them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tyro.conf import Positional

from unime.errors import UnimeError
from unime.settings import parse_settings

Runner = Callable[[Any], int]
"""Runs a command from its settings; returns the exit status."""


@dataclass(frozen=True)
class Command:
    """One `unime` command: its name (a subcommand is `"eval run"`), its one-line help, and `load`, which imports
    what the command needs and returns its settings class and its runner."""

    name: str
    help: str
    load: Callable[[], tuple[type, Runner]]
    parse: Callable[[type, Sequence[str], str, str], Any] | None = None
    """A command-specific way to read the settings (the quickstart's size presets); default: `parse_settings`."""


@dataclass
class TinySettings:
    """Build a tiny offline model of a backbone and save it."""

    backbone: Positional[str]
    """Registered backbone name (see `unime backbones`)."""
    out_dir: Positional[str]
    """Directory to write the model to."""
    seed: int = 0
    """Initialisation seed."""
    kind: Literal["embedder", "reranker"] = "embedder"
    """What to build."""
    size: Literal["tiny", "small"] = "tiny"
    """tiny (a few hundred thousand parameters) or small (about 16 M, compute-bound like a real model; backbones
    with a small builder only)."""
    max_pixels: int | None = None
    """Image budget saved with the processor: at most this many pixels per image (Qwen-VL families: one token per
    28 x 28 pixels); default 112 * 112 (16 image tokens)."""


def _tiny() -> tuple[type, Runner]:
    from unime.tiny import save_tiny

    def run(settings: TinySettings) -> int:
        path = save_tiny(
            settings.backbone,
            settings.out_dir,
            seed=settings.seed,
            kind=settings.kind,
            size=settings.size,
            max_pixels=settings.max_pixels,
        )
        print(f"wrote a {settings.size} {settings.backbone} {settings.kind} to {path}")
        return 0

    return TinySettings, run


@dataclass
class BackbonesSettings:
    """List the registered backbone families (no settings)."""


def _backbones() -> tuple[type, Runner]:
    from unime.backbones import get_backbone, list_backbones

    def run(settings: BackbonesSettings) -> int:
        del settings  # nothing to set
        for name in list_backbones():
            spec = get_backbone(name)
            print(f"{name:12s} {spec.model_class:40s} e.g. {', '.join(spec.example_checkpoints)}")
        return 0

    return BackbonesSettings, run


@dataclass
class ConvertSettings:
    """Convert a public training-data layout into unime's schema."""

    layout: Positional[Literal["mmeb", "sentences"]]
    """mmeb: an MMEB-train subset (qry, qry_image_path, pos_text, ...); sentences: one sentence per line (or JSONL
    with 'text'), each its own positive, for stage 1."""
    input: Positional[str]
    """The input file (parquet or JSONL for mmeb; .txt or JSONL for sentences)."""
    output: Positional[str]
    """The unime training JSONL to write."""
    source: str | None = None
    """Source name written on every row (default: the input file's name)."""


def _convert() -> tuple[type, Runner]:
    from unime.data.mmeb import convert_mmeb_file
    from unime.data.sentences import convert_sentences_file

    def run(settings: ConvertSettings) -> int:
        convert = convert_mmeb_file if settings.layout == "mmeb" else convert_sentences_file
        count = convert(settings.input, settings.output, source=settings.source)
        print(f"wrote {count} rows to {settings.output}")
        return 0

    return ConvertSettings, run


def _synth() -> tuple[type, Runner]:
    from unime.data_synth.command import SynthSettings, run_synth

    return SynthSettings, run_synth


def _mine() -> tuple[type, Runner]:
    from unime.data_synth.mining.command import MineSettings, run_mine

    return MineSettings, run_mine


def _encode() -> tuple[type, Runner]:
    from unime.data_synth.encode import EncodeSettings, run_encode

    return EncodeSettings, run_encode


def _index_build() -> tuple[type, Runner]:
    from unime.index_command import IndexBuildSettings, run_index_build

    return IndexBuildSettings, run_index_build


def _index_search() -> tuple[type, Runner]:
    from unime.index_command import IndexSearchSettings, run_index_search

    return IndexSearchSettings, run_index_search


def _generate() -> tuple[type, Runner]:
    from unime.data_synth.mllm.command import GenerateSettings, run_generate

    return GenerateSettings, run_generate


def _eval_run() -> tuple[type, Runner]:
    from unime.eval.cli import EvalRunSettings, run_eval_command

    return EvalRunSettings, run_eval_command


def _eval_synthetic() -> tuple[type, Runner]:
    from unime.eval.cli import SyntheticSettings, run_synthetic_command

    return SyntheticSettings, run_synthetic_command


def _eval_compare() -> tuple[type, Runner]:
    from unime.eval.cli import CompareSettings, run_compare_command

    return CompareSettings, run_compare_command


def _serve() -> tuple[type, Runner]:
    from unime.serve.config import ServeConfig
    from unime.serve.server import serve

    def run(config: ServeConfig) -> int:
        return serve(replace(config, api_key=config.api_key or os.environ.get("UNIME_API_KEY") or None))

    return ServeConfig, run


def _quickstart() -> tuple[type, Runner]:
    from unime.quickstart import QuickstartCommand, run_quickstart_command

    return QuickstartCommand, run_quickstart_command


def _parse_quickstart(cls: type, argv: Sequence[str], prog: str, description: str) -> Any:
    from unime.quickstart import parse_quickstart_settings

    return parse_quickstart_settings(argv, prog=prog, description=description)


def _demo() -> tuple[type, Runner]:
    from unime.quickstart.demo import DemoSettings, run_demo_command

    return DemoSettings, run_demo_command


COMMANDS: list[Command] = [
    Command("convert", "convert a public training-data layout into unime's schema", _convert),
    Command("synth", "generate synthetic training data", _synth),
    Command("mine", "mine hard negatives for training rows (faiss, false-negative filters)", _mine),
    Command("encode", "embed a corpus into the embedding store (locally or on a Ray cluster)", _encode),
    Command("index build", "build, resume or extend a multi-vector index of a corpus of pages", _index_build),
    Command("index search", "search a multi-vector index (token candidates, then exact MaxSim)", _index_search),
    Command("eval run", "evaluate a model on MMEB, retrieval, SugarCrepe and reranking benchmarks", _eval_run),
    Command("eval synthetic", "write the synthetic benchmark (MMEB, SugarCrepe, retrieval, visdoc)", _eval_synthetic),
    Command("eval compare", "plot several evaluation runs' results side by side", _eval_compare),
    Command("generate", "generate training data from photos with an MLLM (mmE5 style)", _generate),
    Command("serve", "serve embeddings and reranking over HTTP (vLLM or transformers)", _serve),
    Command(
        "quickstart",
        "the whole pipeline: data, stage 1, mining, stage 2, reranker, eval, serving, multi-vector, report",
        _quickstart,
        _parse_quickstart,
    ),
    Command("demo", "embed drawn images and captions and print their similarity table", _demo),
    Command("tiny", "build a tiny offline model of a backbone and save it", _tiny),
    Command("backbones", "list the registered backbone families", _backbones),
]


def usage() -> str:
    width = max(len(command.name) for command in COMMANDS)
    lines = [f"  {command.name:{width}s}  {command.help}" for command in COMMANDS]
    return (
        f"usage: unime COMMAND [--config FILE.yaml] [key=value ...] [--flags ...]\n\n{__doc__.splitlines()[0]}\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n`unime COMMAND --help` lists a command's settings.\n"
        "Training runs through the recipes: `python recipes/train_embedder.py --config ...` (or `accelerate launch`)."
    )


def find_command(argv: Sequence[str]) -> tuple[Command, list[str]]:
    """The command `argv` starts with (the longest name that matches) and the arguments after its name."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        for command in COMMANDS:
            if command.name == name:
                return command, list(argv[words:])
    group = [command.name for command in COMMANDS if command.name.startswith(f"{argv[0]} ")] if argv else []
    if group:
        raise UnimeError(f"`unime {argv[0]}` needs one of: {', '.join(name.split()[1] for name in group)}")
    known = sorted({command.name.split()[0] for command in COMMANDS})
    raise UnimeError(f"unknown command {' '.join(argv[:1])!r}; known: {', '.join(known)}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    try:
        command, rest = find_command(argv)
    except UnimeError as err:
        print(f"unime: error: {err}\n\n{usage()}", file=sys.stderr)
        return 2
    prog = f"unime {command.name}"
    try:
        settings_class, run = command.load()
        parse = command.parse or (lambda cls, args, prog, text: parse_settings(cls, args, prog=prog, description=text))
        settings = parse(settings_class, rest, prog, command.help)
        return run(settings)
    except UnimeError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # a usage error or --help, already printed by the parser
        return exit_.code if isinstance(exit_.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
