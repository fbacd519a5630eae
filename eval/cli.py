"""`unime eval`: run benchmarks, write the synthetic benchmark, compare runs.

    unime eval run [--model DIR | --st NAME | --http URL] [--mmeb-root ROOT] [--retrieval FILE ...]
        [--sugarcrepe DIR]
    unime eval synthetic OUT_DIR
    unime eval compare RUN.json RUN.json ... --out compare.png

`unime eval run` with no data evaluates on the synthetic benchmark (written under `<out>/synthetic-benchmark`),
and with no model on a tiny Qwen2-VL built in memory: the whole harness runs offline.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sentence_transformers import CrossEncoder
from tyro.conf import Positional

import unime
from unime.errors import ConfigError, UnimeError
from unime.eval.embedding import RayBackedEncoder, UnimeEncoderFactory
from unime.eval.encoders import HTTPEncoder, SentenceTransformersEncoder, UnimeEncoder
from unime.eval.report import plot_comparison
from unime.eval.runner import EvalConfig, run_eval, write_outputs
from unime.eval.synthetic import write_synthetic_benchmark
from unime.ray_engine import EngineSettings, RayEncoding, ray_cluster


@dataclass(kw_only=True)
class EvalRunSettings(EvalConfig, EngineSettings):
    """Evaluate a model on benchmarks: the harness's settings (`EvalConfig`), plus what to evaluate and where to
    write. With no benchmark given, the synthetic benchmark is written under `<out>/synthetic-benchmark` and
    evaluated; with no model, a tiny Qwen2-VL built in memory. With `--engine ray` (and `--model`), the items
    are embedded on a Ray cluster."""

    model: str | None = None
    """A unime model directory or hub name (loaded with unime.load)."""
    st: str | None = None
    """A sentence-transformers model name or path."""
    http: str | None = None
    """Base URL of an OpenAI-style embeddings server, e.g. http://127.0.0.1:8000."""
    http_model: str | None = None
    """The 'model' field of HTTP requests (default: the server's only model)."""
    server: Literal["unime", "vllm"] = "unime"
    """Which server --http is."""
    api_key: str | None = None
    """Bearer token for --http (default: $UNIME_EVAL_API_KEY)."""
    query_instruction: str | None = None
    """With --server vllm: instruction of query items."""
    document_instruction: str | None = None
    """With --server vllm: instruction of document items."""
    tiny: str = "qwen2_vl"
    """Backbone of the default tiny model."""
    truncate_dim: int | None = None
    """With --model: matryoshka truncation."""
    seed: int = 0
    """Seed of the synthetic benchmark (when no benchmark is given)."""
    reranker: str | None = None
    """A unime reranker directory (unime.load), for `rerank_datasets`."""
    reranker_st: str | None = None
    """A sentence-transformers CrossEncoder name or path, for `rerank_datasets`."""
    out: str = "runs/eval"
    """Output folder (results.json, results.md, plots/)."""
    cache: bool = True
    """Keep embeddings on disk, in `cache_dir` (default: <out>/cache)."""
    plots: bool = True
    """Draw the plots (plots/ in the output folder)."""


@dataclass
class SyntheticSettings:
    """Write the synthetic benchmark (MMEB, SugarCrepe, retrieval, visdoc) from drawn scenes."""

    out_dir: Positional[str]
    """Folder to write the benchmark to."""
    seed: int = 0
    """Seed of the scenes."""
    queries: int = 24
    """Queries per dataset."""
    candidates: int = 8
    """Candidates per retrieval/grounding query."""
    pool: int | None = None
    """Scenes candidates are drawn from (default 2 x queries)."""


@dataclass
class CompareSettings:
    """Plot several runs' results side by side."""

    results: Positional[list[str]]
    """results.json files (or their folders)."""
    labels: list[str] | None = None
    """One label per run (default: the model names)."""
    out: str = "runs/eval/compare.png"
    """The plot to write."""


def run_synthetic_command(settings: SyntheticSettings) -> int:
    root = write_synthetic_benchmark(
        settings.out_dir,
        seed=settings.seed,
        queries=settings.queries,
        candidates=settings.candidates,
        pool=settings.pool,
    )
    print(f"wrote the synthetic benchmark to {root}")
    return 0


def _encoder(args: EvalRunSettings):
    chosen = [flag for flag in ("model", "st", "http") if getattr(args, flag)]
    if len(chosen) > 1:
        raise ConfigError(f"choose one of --model, --st, --http (got {', '.join('--' + c for c in chosen)})")
    if args.on_ray and not args.model:
        raise ConfigError("--engine ray embeds with a model directory the workers load: give --model")
    if args.model and args.on_ray:
        ray = RayEncoding(UnimeEncoderFactory(args.model, args.truncate_dim, args.batch_size), args.ray)
        # The model here gives the fingerprint (the cache's namespace) and token matrices; the actors embed.
        return RayBackedEncoder(UnimeEncoder(args.model, truncate_dim=args.truncate_dim, device="cpu"), ray)
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
    return UnimeEncoder(unime.build_tiny(args.tiny, seed=0), truncate_dim=args.truncate_dim)


def _only_model(base_url: str, api_key: str | None) -> str:
    import httpx  # optional: the `serve` extra

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


def _reranker(args: EvalRunSettings) -> Any:
    if args.reranker and args.reranker_st:
        raise UnimeError("choose one of --reranker and --reranker-st")
    if args.reranker:
        model = unime.load(args.reranker)
        if not callable(getattr(model, "predict", None)):
            raise UnimeError(f"{args.reranker} is a {type(model).__name__}, not a reranker (it has no predict)")
        return model
    if args.reranker_st:
        return CrossEncoder(args.reranker_st)
    return None


def run_eval_command(args: EvalRunSettings) -> int:
    out = Path(args.out)
    config = EvalConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(EvalConfig)})
    config.cache_dir = (config.cache_dir or str(out / "cache")) if args.cache else None
    if config.mmeb_root is None and not config.retrieval and not config.visdoc and config.sugarcrepe is None:
        root = write_synthetic_benchmark(out / "synthetic-benchmark", seed=args.seed)
        config.mmeb_root = str(root)
        config.retrieval = [str(root / "retrieval" / "test.json")]
        config.sugarcrepe = str(root / "sugarcrepe")
        config.visdoc = [str(root / "visdoc")]
        print(f"no benchmark given: evaluating on the synthetic benchmark in {root}")
    reranker = _reranker(args)
    if config.rerank_datasets and reranker is None:
        raise ConfigError("--rerank-datasets needs --reranker or --reranker-st")
    encoder = _encoder(args)
    with ray_cluster(args.ray) if args.on_ray else nullcontext():
        results = run_eval(encoder, config, reranker=reranker)
    paths = write_outputs(results, out, plots=args.plots)
    print(paths["markdown"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}" + (f" and plots in {out / 'plots'}" if args.plots else ""))
    return 0


def run_compare_command(args: CompareSettings) -> int:
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
