"""One evaluation run: the tasks a config names, on one encoder (and reranker), into one results record.

The record (`results.json`) holds every number with what produced it: the encoder (backend, model,
fingerprint), the reranker, the data (paths), the configuration, how many items were listed, distinct and
encoded, and the wall time. `write_outputs` adds the markdown table and the plots beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unime.eval.compositional import load_compositional, run_compositional
from unime.eval.data import OnBadRows
from unime.eval.embedding import EmbedStats
from unime.eval.encoders import Encoder, require_multi_vector
from unime.eval.image_text_retrieval import Layout, load_retrieval, run_retrieval
from unime.eval.mmeb import load_dataset, run_mmeb
from unime.eval.rerank import run_rerank
from unime.eval.visdoc import SCORINGS, VisDocScoring, run_visdoc
from unime.retrieve_rerank import PairScorer


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    mmeb_root: str | None = None
    """An MMEB eval root (one folder per dataset); None: no MMEB task."""
    mmeb_datasets: list[str] | None = None
    """MMEB datasets to run (default: every folder under the root)."""
    image_root: str | None = None
    """Image root of the MMEB datasets (default: `<mmeb_root>/images`)."""
    retrieval: list[str] = field(default_factory=list)
    """Image-text retrieval benchmarks: captions files (Flickr30K/COCO/ShareGPT4V) or Urban1K folders."""
    retrieval_layout: Layout = "auto"
    """Layout of the retrieval benchmarks (`auto` detects it)."""
    retrieval_image_root: str | None = None
    """Image root of the retrieval benchmarks (default: next to each captions file)."""
    retrieval_limit: int | None = None
    """Keep only the first rows of each retrieval benchmark (ShareGPT4V is evaluated on its first 1,000)."""
    sugarcrepe: str | None = None
    """A SugarCrepe folder (one JSON file per category); None: no compositional task."""
    sugarcrepe_image_root: str | None = None
    """Its image root (COCO val2017; default `<sugarcrepe>/images`)."""
    visdoc: list[str] = field(default_factory=list)
    """Visual-document retrieval sets in the BEIR layout (corpus, queries, qrels; MMEB-V2 visdoc, ViDoRe)."""
    visdoc_scoring: VisDocScoring = "single_vector"
    """How visdoc pages are scored: `single_vector` (cosine of pooled vectors), `multi_vector` (MaxSim of token
    matrices; needs a model with a multi-vector head; the matrices are not cached), or `both`, reported side by
    side. Other tasks always use single vectors."""
    rerank_datasets: list[str] = field(default_factory=list)
    """MMEB datasets (under `mmeb_root`) whose first-stage top K the reranker reorders."""
    rerank_top_k: int = 10
    """How many first-stage candidates the reranker sees per query."""
    rerank_fusion_weight: float | None = None
    """None: order by reranker score; w: by first-stage score + w * reranker score."""
    batch_size: int = 32
    """Items per encoder call. Results do not depend on it."""
    cache_dir: str | None = None
    """Embedding cache (keyed by model and content; resumable); None: no cache on disk."""
    on_bad_rows: OnBadRows = "error"
    """`error`: a bad row stops the run, naming it; `skip`: drop it and count it in the results."""
    faiss_min_corpus: int = 100_000
    """Retrieval corpora of this size or more are searched with faiss (top 100) instead of scored in full."""
    progress: bool = True
    """Show a progress bar per dataset."""


def run_eval(encoder: Encoder, config: EvalConfig, *, reranker: PairScorer | None = None) -> dict[str, Any]:
    """Run every task `config` names; returns the results record."""
    if config.rerank_datasets and reranker is None:
        raise ValueError("rerank_datasets were given but no reranker")
    if config.rerank_datasets and config.mmeb_root is None:
        raise ValueError("rerank_datasets are MMEB datasets: set mmeb_root too")
    if config.visdoc and "multi_vector" in SCORINGS.get(config.visdoc_scoring, ()):
        require_multi_vector(encoder, "visdoc_scoring")  # before the first task, not after an hour of MMEB
    started = time.perf_counter()
    stats = EmbedStats()
    common = {"batch_size": config.batch_size, "cache_dir": config.cache_dir, "progress": config.progress}
    tasks: dict[str, Any] = {}
    if config.mmeb_root is not None:
        tasks["mmeb"], task_stats = run_mmeb(
            encoder,
            config.mmeb_root,
            datasets=config.mmeb_datasets,
            image_root=config.image_root,
            on_bad_rows=config.on_bad_rows,
            **common,
        )
        stats.add(task_stats)
    for path in config.retrieval:
        dataset = load_retrieval(
            path,
            layout=config.retrieval_layout,
            image_root=config.retrieval_image_root,
            limit=config.retrieval_limit,
            on_bad_rows=config.on_bad_rows,
        )
        result, task_stats = run_retrieval(encoder, dataset, faiss_min_corpus=config.faiss_min_corpus, **common)
        tasks.setdefault("retrieval", []).append({**result, "path": str(path)})
        stats.add(task_stats)
    if config.sugarcrepe is not None:
        data = load_compositional(
            config.sugarcrepe, image_root=config.sugarcrepe_image_root, on_bad_rows=config.on_bad_rows
        )
        tasks["compositional"], task_stats = run_compositional(encoder, data, **common)
        tasks["compositional"]["path"] = str(config.sugarcrepe)
        stats.add(task_stats)
    for path in config.visdoc:
        result, task_stats = run_visdoc(
            encoder,
            path,
            on_bad_rows=config.on_bad_rows,
            faiss_min_corpus=config.faiss_min_corpus,
            scoring=config.visdoc_scoring,
            **common,
        )
        tasks.setdefault("visdoc", []).append({**result, "path": str(path)})
        stats.add(task_stats)
    for name in config.rerank_datasets:
        assert config.mmeb_root is not None and reranker is not None
        dataset = load_dataset(config.mmeb_root, name, image_root=config.image_root, on_bad_rows=config.on_bad_rows)
        result, task_stats = run_rerank(
            encoder,
            reranker,
            dataset,
            top_k=config.rerank_top_k,
            fusion_weight=config.rerank_fusion_weight,
            **common,
        )
        tasks.setdefault("rerank", []).append(result)
        stats.add(task_stats)
    if not tasks:
        raise ValueError(
            "nothing to evaluate: give an MMEB root, retrieval or visdoc benchmarks, or a SugarCrepe folder"
        )
    import unime

    return {
        "unime_version": unime.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "encoder": encoder.describe(),
        "reranker": _describe_reranker(reranker),
        "config": dataclasses.asdict(config),
        "data": data_fingerprints(config),
        "tasks": tasks,
        "embedding": dataclasses.asdict(stats),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }


DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def data_fingerprints(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """The data a run read: every table file under each benchmark path, with its size and sha256.

    Images are not hashed here (the embedding cache keys them by content); the tables say which rows and
    candidates were scored.
    """
    paths = [config.mmeb_root, *config.retrieval, config.sugarcrepe, *config.visdoc]
    out: dict[str, dict[str, Any]] = {}
    for path in (Path(p) for p in paths if p is not None):
        files = (
            [path]
            if path.is_file()
            else sorted(
                f
                for f in path.rglob("*")
                if f.suffix in DATA_SUFFIXES and f.is_file() and "images" not in f.relative_to(path).parts
            )
        )
        out[str(path)] = {
            str(f.relative_to(path) if f != path else f.name): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            for f in files
        }
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe_reranker(reranker: PairScorer | None) -> dict[str, Any] | None:
    if reranker is None:
        return None
    describe = getattr(reranker, "describe", None)
    if callable(describe):
        return describe()
    return {"class": f"{type(reranker).__module__}.{type(reranker).__qualname__}"}


def write_outputs(results: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write `results.json`, `results.md` and (with matplotlib) `plots/*.png` under `out_dir`."""
    from unime.atomic import atomic_write, write_json_atomic
    from unime.eval.report import plot_results, to_markdown

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    write_json_atomic(paths["json"], results)
    with atomic_write(paths["markdown"]) as handle:
        handle.write(to_markdown(results))
    if plots:
        for name, path in plot_results(results, out_dir / "plots").items():
            paths[f"plot:{name}"] = path
    return paths
