"""`unime mine <model_dir> <train.jsonl> <out.jsonl> ...`: the command-line front of `miner.mine_file`."""

from __future__ import annotations

import argparse
from pathlib import Path

from unime.errors import ConfigError


def parse_window(spec: str | None) -> tuple[int, int] | None:
    """`"a:b"` -> (a, b): sample negatives from ranks a..b-1 of the filtered candidates."""
    if not spec:
        return None
    first, sep, second = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(first), int(second)
    except ValueError:
        raise ConfigError(f"--window {spec!r}: expected 'a:b' with integers, e.g. '10:50'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from unime.data_synth.mining.miner import MiningConfig

    defaults = MiningConfig()
    parser.add_argument("model_dir", help="embedder model directory (unime.load)")
    parser.add_argument("train", help="training JSONL/parquet, or a `synth tasks` folder, whose rows get negatives")
    parser.add_argument("out", help="JSONL to write (with --shard i/N: out.part-i-of-N.jsonl), manifest beside it")
    parser.add_argument("--corpus", help="JSONL of candidate sides ({text, image}); default: all rows' positives")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="candidates retrieved per query")
    parser.add_argument("--negatives", type=int, default=defaults.negatives, help="negatives kept per row")
    parser.add_argument(
        "--margin",
        type=float,
        default=defaults.margin,
        help="drop a candidate as a false negative when sim > sim(positive) + margin, as the loss's margin does "
        "(UniME: 0.1)",
    )
    parser.add_argument("--judge", help="reranker model directory: judge scores filter candidates and are written")
    parser.add_argument(
        "--judge-margin",
        type=float,
        default=defaults.judge_margin,
        help="with --judge: drop a candidate when its judge score > the positive's + this",
    )
    parser.add_argument("--window", help="a:b: sample from filtered ranks a..b-1 (mmE5) instead of the hardest")
    parser.add_argument("--method", choices=["auto", "exact", "ivf"], default=defaults.method, help="faiss search")
    parser.add_argument("--keep-existing", action="store_true", help="keep rows' own negatives, add mined ones")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--cache-dir", help="embedding cache folder (default: <out folder>/.embedding-cache)")
    parser.add_argument("--shard", help="i/N: mine only the rows this shard owns (0-based i)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--max-bad-share",
        type=float,
        default=defaults.max_bad_share,
        help="fail when more than this share of input rows (or corpus lines) is invalid (default 0: any)",
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="drop every invalid row (listed with file:line in the manifest)"
    )
    parser.add_argument("--device", help="torch device for the models (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    import unime
    from unime.data_synth.mining.cache import model_fingerprint
    from unime.data_synth.mining.miner import MiningConfig, mine_file
    from unime.data_synth.sharding import parse_shard

    config = MiningConfig(
        top_k=args.top_k,
        negatives=args.negatives,
        margin=args.margin,
        judge_margin=args.judge_margin,
        window=parse_window(args.window),
        method=args.method,
        keep_existing=args.keep_existing,
        batch_size=args.batch_size,
        seed=args.seed,
        max_bad_share=1.0 if args.skip_bad_rows else args.max_bad_share,
    )
    shard = parse_shard(args.shard)
    load_kwargs = {"device": args.device} if args.device else {}
    embedder = unime.load(args.model_dir, **load_kwargs)
    if not isinstance(embedder, unime.Embedder):
        raise ConfigError(f"{args.model_dir}: is a {type(embedder).__name__}; mining needs an embedder directory")
    judge = unime.load(args.judge, **load_kwargs) if args.judge else None
    if judge is not None and not callable(getattr(judge, "predict", None)):
        raise ConfigError(f"{args.judge}: is a {type(judge).__name__}; --judge needs a reranker directory")
    cache_dir = args.cache_dir or Path(args.out).resolve().parent / ".embedding-cache"
    out, manifest = mine_file(
        embedder,
        args.train,
        args.out,
        config,
        model_id=model_fingerprint(args.model_dir),
        corpus_path=args.corpus,
        judge=judge,
        judge_id=str(args.judge or ""),
        cache_dir=cache_dir,
        shard=shard,
    )
    details = manifest.details
    print(
        f"wrote {manifest.kept} rows to {out} ({manifest.generated} read; rejected {manifest.rejected or 'none'}); "
        f"search {details['search'].get('method')}, dropped {details['dropped_by_margin']} by margin and "
        f"{details['dropped_by_judge']} by judge; {details['rows_short_of_negatives']} rows short of negatives"
    )
    print_dropped_rows(details["dropped_rows"], out.with_name(out.stem + ".manifest.json"))
    return 0


SHOWN_DROPPED_ROWS = 20
"""Dropped rows printed in the summary; the manifest lists them all."""


def print_dropped_rows(dropped: list[dict], manifest_path: Path) -> None:
    if not dropped:
        return
    print(f"dropped {len(dropped)} invalid row(s):")
    for row in dropped[:SHOWN_DROPPED_ROWS]:
        print(f"  {row['file']}:{row['line']}: {row['reason']}")
    if len(dropped) > SHOWN_DROPPED_ROWS:
        print(f"  ... and {len(dropped) - SHOWN_DROPPED_ROWS} more, all listed in {manifest_path}")
