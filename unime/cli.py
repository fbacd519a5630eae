"""The `unime` command line. Each subcommand is one function that registers its arguments and its action.

Later parts of the toolkit (training, evaluation, serving, data generation) add their subcommands to
`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from unime.errors import UnimeError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _add_tiny_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backbone", help="registered backbone name (see `unime backbones`)")
    parser.add_argument("out_dir", help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--kind", choices=["embedder", "reranker"], default="embedder", help="what to build")
    parser.add_argument(
        "--size",
        choices=["tiny", "small"],
        default="tiny",
        help="tiny (a few hundred thousand parameters) or small (about 16 M, compute-bound like a real model; "
        "backbones with a small builder only)",
    )


def _run_tiny(args: argparse.Namespace) -> int:
    from unime.tiny import save_tiny

    path = save_tiny(args.backbone, args.out_dir, seed=args.seed, kind=args.kind, size=args.size)
    print(f"wrote a {args.size} {args.backbone} {args.kind} to {path}")
    return 0


def _add_backbones_args(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _run_backbones(args: argparse.Namespace) -> int:
    from unime.backbones import get_backbone, list_backbones

    for name in list_backbones():
        spec = get_backbone(name)
        print(f"{name:12s} {spec.model_class:40s} e.g. {', '.join(spec.example_checkpoints)}")
    return 0


def _add_demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model directory or hub name; default: build a tiny model in memory")
    parser.add_argument("--backbone", default="qwen2_vl", help="backbone of the tiny model (without --model)")


def _run_demo(args: argparse.Namespace) -> int:
    from unime.quickstart.demo import run_demo

    run_demo(model=args.model, backbone=args.backbone)
    return 0


def _add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind",
        choices=["shapes", "text", "tasks"],
        help="shapes: drawn scenes, captions, one-attribute hard negatives; text: paraphrase pairs (stage 1); "
        "tasks: classification/VQA/retrieval/grounding over seven modality pairs, sharded JSONL + manifest",
    )
    parser.add_argument("out_dir", help="directory to write train.jsonl, held_out.jsonl and images/ to")
    parser.add_argument("--train", type=int, help="training rows (default: shapes 60, text 400)")
    parser.add_argument("--held-out", type=int, help="held-out rows, no scene shared (default: shapes 30, text 100)")
    parser.add_argument(
        "--max-shapes", type=int, help="shapes per scene (default: shapes 1, where 90 scenes exist, 2: 3330; tasks 3)"
    )
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", help="tasks only: i/N, write only the examples this shard owns (0-based i)")


def _run_synth(args: argparse.Namespace) -> int:
    from unime.data_synth.pairs import write_image_caption_pairs
    from unime.data_synth.text_pairs import write_text_pairs

    sizes = {key: value for key, value in (("train", args.train), ("held_out", args.held_out)) if value is not None}
    if args.kind == "tasks":
        from unime.data_synth.tasks import run_synth_tasks

        return run_synth_tasks(
            args.out_dir, args.shard, negatives=args.negatives, seed=args.seed, max_shapes=args.max_shapes, **sizes
        )
    if args.shard:
        raise UnimeError("--shard applies to `unime synth tasks` only")
    if args.kind == "text":
        paths = write_text_pairs(args.out_dir, seed=args.seed, **sizes)
    else:
        paths = write_image_caption_pairs(
            args.out_dir, negatives=args.negatives, seed=args.seed, max_shapes=args.max_shapes or 1, **sizes
        )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _add_convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "layout",
        choices=["mmeb", "sentences"],
        help="mmeb: an MMEB-train subset (qry, qry_image_path, pos_text, ...); sentences: one sentence per line "
        "(or JSONL with 'text'), each its own positive, for stage 1",
    )
    parser.add_argument("input", help="the input file (parquet or JSONL for mmeb; .txt or JSONL for sentences)")
    parser.add_argument("output", help="the unime training JSONL to write")
    parser.add_argument("--source", help="source name written on every row (default: the input file's name)")


def _run_convert(args: argparse.Namespace) -> int:
    from unime.data.mmeb import convert_mmeb_file
    from unime.data.sentences import convert_sentences_file

    convert = convert_mmeb_file if args.layout == "mmeb" else convert_sentences_file
    count = convert(args.input, args.output, source=args.source)
    print(f"wrote {count} rows to {args.output}")
    return 0


def _add_mine_args(parser: argparse.ArgumentParser) -> None:
    from unime.data_synth.mining.command import add_arguments

    add_arguments(parser)


def _run_mine(args: argparse.Namespace) -> int:
    from unime.data_synth.mining.command import run

    return run(args)


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    from unime.eval.cli import add_arguments

    add_arguments(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from unime.eval.cli import run

    return run(args)


def _add_generate_args(parser: argparse.ArgumentParser) -> None:
    from unime.data_synth.mllm.command import add_arguments

    add_arguments(parser)


def _run_generate(args: argparse.Namespace) -> int:
    from unime.data_synth.mllm.command import run

    return run(args)


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    from unime.serve.config import ServeConfig

    defaults = ServeConfig(embedder_dir="-")
    parser.add_argument("model_dir", nargs="?", help="embedder model directory (served at /v1/embeddings)")
    parser.add_argument("--reranker", help="reranker model directory (served at /v1/rerank)")
    parser.add_argument(
        "--backend", choices=["auto", "vllm", "transformers"], default="auto", help="auto: vLLM where installed"
    )
    parser.add_argument(
        "--reranker-backend", choices=["auto", "vllm", "transformers"], help="the reranker's, if not --backend's"
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on every route (default: $UNIME_API_KEY, else none)"
    )
    parser.add_argument(
        "--served-model-name", help="the embedder's name in /v1/models and /v1/embeddings (default: its directory's)"
    )
    parser.add_argument(
        "--reranker-served-model-name",
        help="the reranker's name in /v1/models and /v1/rerank (default: its directory's)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max-items", type=int, default=defaults.max_items, help="inputs or documents per request")
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        default=defaults.max_input_tokens,
        help="tokens of one input's (or query + document's) prompt after templating, instruction included",
    )
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument(
        "--max-request-pixels", type=int, default=defaults.max_request_pixels, help="image pixels of one request"
    )
    parser.add_argument("--max-image-aspect-ratio", type=float, default=defaults.max_image_aspect_ratio)
    parser.add_argument(
        "--allow-remote-images", action="store_true", help="accept public http(s) image URLs (never private ones)"
    )
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 503")
    parser.add_argument(
        "--max-queue-wait-s",
        type=float,
        default=defaults.max_queue_wait_s,
        help="/ready answers 503 while a queued request has waited longer than this",
    )
    parser.add_argument("--no-batching", action="store_true", help="run each request alone (no micro-batching)")
    parser.add_argument("--max-batch-items", type=int, default=defaults.max_batch_items)
    parser.add_argument("--max-batch-tokens", type=int, default=defaults.max_batch_tokens)
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms)
    parser.add_argument(
        "--batch-wait-arriving-ms",
        type=float,
        default=defaults.batch_wait_arriving_ms,
        help="how long a batch may wait for requests already received and being decoded",
    )
    parser.add_argument("--shutdown-grace-s", type=float, default=defaults.shutdown_grace_s)
    parser.add_argument(
        "--http-workers",
        type=int,
        default=defaults.http_workers,
        help="HTTP processes that parse and decode requests in parallel for this one's batchers (0: one process)",
    )
    parser.add_argument("--dtype", help="default: what unime.load picks (bfloat16 on a capable GPU, else float32)")
    parser.add_argument("--device", help="transformers backend: cuda, cpu, ... (default: CUDA when available)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM backend: GPUs per model")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM backend: no CUDA graphs / compilation")
    parser.add_argument("--gpu-memory-utilization", type=float, help="vLLM backend: GPU memory fraction per model")
    parser.add_argument(
        "--kv-cache-gib", type=float, help="vLLM backend: KV cache GiB per model (CPU default: 1/4 of free memory)"
    )


def _run_serve(args: argparse.Namespace) -> int:
    import os

    from unime.serve.config import ServeConfig
    from unime.serve.server import serve

    try:
        config = ServeConfig(
            embedder_dir=args.model_dir,
            reranker_dir=args.reranker,
            backend=args.backend,
            reranker_backend=args.reranker_backend,
            host=args.host,
            port=args.port,
            api_key=args.api_key or os.environ.get("UNIME_API_KEY") or None,
            served_model_name=args.served_model_name,
            reranker_served_model_name=args.reranker_served_model_name,
            max_body_bytes=args.max_body_bytes,
            max_items=args.max_items,
            max_text_chars=args.max_text_chars,
            max_input_tokens=args.max_input_tokens,
            max_image_pixels=args.max_image_pixels,
            max_request_pixels=args.max_request_pixels,
            max_image_aspect_ratio=args.max_image_aspect_ratio,
            allow_remote_images=args.allow_remote_images,
            max_queue=args.max_queue,
            max_queue_wait_s=args.max_queue_wait_s,
            batching=not args.no_batching,
            max_batch_items=args.max_batch_items,
            max_batch_tokens=args.max_batch_tokens,
            batch_wait_ms=args.batch_wait_ms,
            batch_wait_arriving_ms=args.batch_wait_arriving_ms,
            shutdown_grace_s=args.shutdown_grace_s,
            http_workers=args.http_workers,
            dtype=args.dtype,
            device=args.device,
            tensor_parallel_size=args.tensor_parallel_size,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_gib=args.kv_cache_gib,
        )
    except ValueError as err:
        print(f"unime serve: error: {err}", file=sys.stderr)
        return 2
    return serve(config)


def _add_quickstart_args(parser: argparse.ArgumentParser) -> None:
    from unime.quickstart import STAGES

    parser.add_argument("--out", default="runs/quickstart", help="output folder; the same folder resumes a run")
    parser.add_argument("--size", choices=["default", "ci"], default="default", help="ci: a reduced run for tests")
    parser.add_argument(
        "--backend",
        choices=["transformers", "auto", "vllm"],
        help="server backend of the serve check (default: transformers)",
    )
    parser.add_argument("--stop-after", choices=STAGES, help="stop after this stage (run again to go on)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted settings of unime.quickstart.config, e.g. reranker.max_steps=300"
    )


def _run_quickstart(args: argparse.Namespace) -> int:
    from unime.quickstart import load_quickstart_config, run_quickstart

    overrides = [f"out={json.dumps(args.out)}", *args.overrides]
    if args.backend:
        overrides.append(f"serve.backend={args.backend}")
    run_quickstart(load_quickstart_config(args.size, overrides), stop_after=args.stop_after)
    return 0


COMMANDS: list[Command] = [
    ("convert", "convert a public training-data layout into unime's schema", _add_convert_args, _run_convert),
    ("synth", "generate synthetic training data", _add_synth_args, _run_synth),
    ("mine", "mine hard negatives for training rows (faiss, false-negative filters)", _add_mine_args, _run_mine),
    ("eval", "evaluate a model on MMEB, retrieval, SugarCrepe and reranking benchmarks", _add_eval_args, _run_eval),
    ("generate", "generate training data from photos with an MLLM (mmE5 style)", _add_generate_args, _run_generate),
    ("serve", "serve embeddings and reranking over HTTP (vLLM or transformers)", _add_serve_args, _run_serve),
    (
        "quickstart",
        "the whole pipeline: data, stage 1, mining, stage 2, reranker, eval, serving, report",
        _add_quickstart_args,
        _run_quickstart,
    ),
    ("demo", "embed drawn images and captions and print their similarity table", _add_demo_args, _run_demo),
    ("tiny", "build a tiny offline model of a backbone and save it", _add_tiny_args, _run_tiny),
    ("backbones", "list the registered backbone families", _add_backbones_args, _run_backbones),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unime", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UnimeError as err:
        print(f"unime {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
