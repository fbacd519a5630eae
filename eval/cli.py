"""`unime eval`: run benchmarks, write the synthetic benchmark, compare runs.

    unime eval run [--model DIR | --st NAME | --http URL] [--mmeb ROOT] [--retrieval FILE]... [--sugarcrepe DIR]
    unime eval synthetic OUT_DIR
    unime eval compare RUN.json RUN.json ... --out compare.png

`unime eval run` with no data evaluates on the synthetic benchmark (written under `<out>/synthetic-benchmark`),
and with no model on a tiny Qwen2-VL built in memory: the whole harness runs offline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from unime.errors import UnimeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="eval_action", required=True)

    run = actions.add_parser("run", help="evaluate a model on benchmarks", description="evaluate a model on benchmarks")
    model = run.add_argument_group("what to evaluate (default: a tiny Qwen2-VL built in memory)")
    model.add_argument("--model", help="a unime model directory or hub name (loaded with unime.load)")
    model.add_argument("--st", help="a sentence-transformers model name or path")
    model.add_argument("--http", help="base URL of an OpenAI-style embeddings server, e.g. http://127.0.0.1:8000")
    model.add_argument("--http-model", help="the 'model' field of HTTP requests (default: the server's only model)")
    model.add_argument("--server", choices=["unime", "vllm"], default="unime", help="which server --http is")
    model.add_argument("--api-key", help="bearer token for --http (default: $UNIME_EVAL_API_KEY)")
    model.add_argument("--query-instruction", help="with --server vllm: instruction of query items")
    model.add_argument("--document-instruction", help="with --server vllm: instruction of document items")
    model.add_argument("--tiny", default="qwen2_vl", help="backbone of the default tiny model")
    model.add_argument("--truncate-dim", type=int, help="with --model: matryoshka truncation")

    data = run.add_argument_group("benchmarks (default: the synthetic benchmark)")
    data.add_argument("--mmeb", help="MMEB eval root: one folder per dataset with test-*.parquet")
    data.add_argument("--datasets", help="comma-separated MMEB datasets (default: all under --mmeb)")
    data.add_argument("--image-root", help="MMEB image root (default: <mmeb>/images)")
    data.add_argument("--retrieval", action="append", default=[], help="retrieval captions file or Urban1K folder")
    data.add_argument("--retrieval-layout", choices=["auto", "captions", "sharegpt4v", "urban1k"], default="auto")
    data.add_argument("--retrieval-image-root", help="image root of the retrieval files (default: beside each)")
    data.add_argument("--retrieval-limit", type=int, help="keep the first N rows of each retrieval file")
    data.add_argument(
        "--visdoc", action="append", default=[], help="visual-document set in the BEIR layout (corpus, queries, qrels)"
    )
    data.add_argument("--sugarcrepe", help="SugarCrepe folder (one JSON per category)")
    data.add_argument("--sugarcrepe-image-root", help="SugarCrepe image root (COCO val2017)")
    data.add_argument("--seed", type=int, default=0, help="seed of the synthetic benchmark")

    rerank = run.add_argument_group("reranking")
    rerank.add_argument("--reranker", help="a unime reranker directory (unime.load)")
    rerank.add_argument("--reranker-st", help="a sentence-transformers CrossEncoder name or path")
    rerank.add_argument("--rerank", help="comma-separated MMEB datasets to rerank")
    rerank.add_argument("--rerank-top-k", type=int, default=10)
    rerank.add_argument("--fusion-weight", type=float, help="order by first-stage + w * reranker score")

    run.add_argument("--out", default="runs/eval", help="output folder (results.json, results.md, plots/)")
    run.add_argument("--cache-dir", help="embedding cache (default: <out>/cache)")
    run.add_argument("--no-cache", action="store_true", help="keep no embeddings on disk")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows (counted and reported)")
    run.add_argument("--no-plots", action="store_true")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    synthetic = actions.add_parser("synthetic", help="write the synthetic benchmark (MMEB, SugarCrepe, retrieval)")
    synthetic.add_argument("out_dir")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--queries", type=int, default=24, help="queries per dataset")
    synthetic.add_argument("--candidates", type=int, default=8, help="candidates per retrieval/grounding query")
    synthetic.add_argument("--pool", type=int, help="scenes candidates are drawn from (default 2 x queries)")

    compare = actions.add_parser("compare", help="plot several runs' results side by side")
    compare.add_argument("results", nargs="+", help="results.json files (or their folders)")
    compare.add_argument("--labels", nargs="+", help="one label per run (default: the model names)")
    compare.add_argument("--out", default="runs/eval/compare.png")


def run(args: argparse.Namespace) -> int:
    if args.eval_action == "synthetic":
        from unime.eval.synthetic import write_synthetic_benchmark

        root = write_synthetic_benchmark(
            args.out_dir, seed=args.seed, queries=args.queries, candidates=args.candidates, pool=args.pool
        )
        print(f"wrote the synthetic benchmark to {root}")
        return 0
    if args.eval_action == "compare":
        return _compare(args)
    return _run(args)


def _encoder(args: argparse.Namespace):
    from unime.eval.encoders import HTTPEncoder, SentenceTransformersEncoder, UnimeEncoder

    chosen = [flag for flag in ("model", "st", "http") if getattr(args, flag)]
    if len(chosen) > 1:
        raise UnimeError(f"choose one of --model, --st, --http (got {', '.join('--' + c for c in chosen)})")
    if args.model:
        return UnimeEncoder(args.model, truncate_dim=args.truncate_dim)
    if args.st:
        return SentenceTransformersEncoder(args.st)
    if args.http:
        return HTTPEncoder(
            args.http,
            model=args.http_model or _only_model(args.http, args.api_key),
            server=args.server,
            api_key=args.api_key,
            query_instruction=args.query_instruction,
            document_instruction=args.document_instruction,
        )
    import unime

    return UnimeEncoder(unime.build_tiny(args.tiny, seed=0), truncate_dim=args.truncate_dim)


def _only_model(base_url: str, api_key: str | None) -> str:
    import httpx

    base = base_url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    try:
        response = httpx.get(base + "/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        models = [entry["id"] for entry in response.json()["data"]]
    except (httpx.HTTPError, KeyError, ValueError) as err:
        raise UnimeError(f"{base}/models: cannot list the server's models ({err}); pass --http-model") from err
    if len(models) != 1:
        raise UnimeError(f"{base}/models lists {models}; pass --http-model to choose one")
    return models[0]


def _reranker(args: argparse.Namespace) -> Any:
    if args.reranker and args.reranker_st:
        raise UnimeError("choose one of --reranker and --reranker-st")
    if args.reranker:
        import unime

        model = unime.load(args.reranker)
        if not callable(getattr(model, "predict", None)):
            raise UnimeError(f"{args.reranker} is a {type(model).__name__}, not a reranker (it has no predict)")
        return model
    if args.reranker_st:
        from sentence_transformers import CrossEncoder

        return CrossEncoder(args.reranker_st)
    return None


def _run(args: argparse.Namespace) -> int:
    from unime.eval.runner import EvalConfig, run_eval, write_outputs

    out = Path(args.out)
    config = EvalConfig(
        mmeb_root=args.mmeb,
        mmeb_datasets=args.datasets.split(",") if args.datasets else None,
        image_root=args.image_root,
        retrieval=list(args.retrieval),
        retrieval_layout=args.retrieval_layout,
        retrieval_image_root=args.retrieval_image_root,
        retrieval_limit=args.retrieval_limit,
        sugarcrepe=args.sugarcrepe,
        visdoc=list(args.visdoc),
        sugarcrepe_image_root=args.sugarcrepe_image_root,
        rerank_datasets=args.rerank.split(",") if args.rerank else [],
        rerank_top_k=args.rerank_top_k,
        rerank_fusion_weight=args.fusion_weight,
        batch_size=args.batch_size,
        cache_dir=None if args.no_cache else (args.cache_dir or str(out / "cache")),
        on_bad_rows="skip" if args.skip_bad_rows else "error",
        progress=not args.quiet,
    )
    if config.mmeb_root is None and not config.retrieval and not config.visdoc and config.sugarcrepe is None:
        from unime.eval.synthetic import write_synthetic_benchmark

        root = write_synthetic_benchmark(out / "synthetic-benchmark", seed=args.seed)
        config.mmeb_root = str(root)
        config.retrieval = [str(root / "retrieval" / "test.json")]
        config.sugarcrepe = str(root / "sugarcrepe")
        config.visdoc = [str(root / "visdoc")]
        print(f"no benchmark given: evaluating on the synthetic benchmark in {root}")
    reranker = _reranker(args)
    if config.rerank_datasets and reranker is None:
        raise UnimeError("--rerank needs --reranker or --reranker-st")
    results = run_eval(_encoder(args), config, reranker=reranker)
    paths = write_outputs(results, out, plots=not args.no_plots)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}" + ("" if args.no_plots else f" and plots in {out / 'plots'}"))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from unime.eval.report import plot_comparison

    runs = []
    for entry in args.results:
        path = Path(entry) / "results.json" if Path(entry).is_dir() else Path(entry)
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise UnimeError(f"{path}: cannot read a results file ({err})") from err
    labels = args.labels or [run["encoder"].get("model", run["encoder"].get("url", "?")) for run in runs]
    if len(labels) != len(runs):
        raise UnimeError(f"{len(labels)} labels for {len(runs)} runs")
    path = plot_comparison(runs, labels, args.out)
    print(f"wrote {path}")
    return 0
