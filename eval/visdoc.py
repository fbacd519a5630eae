"""Visual-document retrieval (MMEB-V2's visdoc tasks: ViDoRe v1/v2, VisRAG) in the BEIR layout: nDCG@5 and more.

Layout (as the ViDoRe v2 / MMEB-V2 visdoc datasets are published): a folder holding three tables, each a
parquet or JSONL file (`corpus.parquet`) or a folder of them (`corpus/test-00000.parquet`):
- `corpus`: `corpus-id` and `image` (a path relative to the folder, or the Hugging Face image struct
  `{"bytes", "path"}`), optionally `text`;
- `queries`: `query-id` and `query` (or `text`);
- `qrels`: `query-id`, `corpus-id` and `score` (graded relevance; > 0 is relevant).
Queries rank the whole corpus; scores follow ViDoRe's and MMEB-V2's reports: `ndcg_linear@5` (gains = qrels
scores; ViDoRe's main number), recall@1/5/10 (the share of a query's relevant pages in its top k), hit@1 and MRR
of the best relevant page. Queries without a relevant page are skipped (counted, as BEIR evaluation drops them).

Scoring (`scoring`): `single_vector` ranks pages by the cosine of pooled vectors (cached in the embedding store);
`multi_vector` by MaxSim of token matrices from the model's multi-vector head (ColPali-style late interaction;
the matrices are encoded on every run, since the embedding store holds one fixed-size vector per item); `both`
reports the two side by side.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from unime.data.dataset import DataError
from unime.eval.data import (
    BadRow,
    OnBadRows,
    SkipReport,
    check_image,
    handle_bad_row,
    read_numbered_rows,
    resolve_image,
    row_origin,
)
from unime.eval.embed_sets import embed_sets
from unime.eval.embedding import EmbedStats
from unime.eval.encoders import Encoder, require_multi_vector
from unime.eval.scoring import corpus_ranks, positions_in_list
from unime.inputs import Input
from unime.metrics import hit_at_k, mrr, ndcg_at_k_multi, recall_at_k_multi
from unime.multi_vector import maxsim_scores

VisDocScoring = Literal["single_vector", "multi_vector", "both"]
"""How pages are scored: pooled vectors, MaxSim of token matrices, or both side by side."""

SCORINGS: dict[str, tuple[str, ...]] = {
    "single_vector": ("single_vector",),
    "multi_vector": ("multi_vector",),
    "both": ("single_vector", "multi_vector"),
}
"""The scorings each setting runs, in the order they are reported."""


@dataclass
class VisDocDataset:
    name: str
    pages: list[Input]
    """Corpus entries (document role), in corpus order."""
    queries: list[Input]
    relevant: list[dict[int, float]]
    """For each query, its relevant pages (index into `pages`) and their graded relevance."""
    skipped: SkipReport = field(default_factory=SkipReport)


def _table(folder: Path, name: str, dataset: VisDocDataset, on_bad_rows: OnBadRows) -> list[tuple[str, dict[str, Any]]]:
    """The rows of one table, each with where it is (`dataset 'X', file:line`)."""
    candidates = [folder / f"{name}.{suffix}" for suffix in ("parquet", "jsonl")]
    files = [path for path in candidates if path.is_file()]
    if not files and (folder / name).is_dir():
        files = sorted(p for p in (folder / name).iterdir() if p.suffix in (".parquet", ".jsonl"))
    if not files:
        raise DataError(f"{folder}: no '{name}' table; expected {name}.parquet, {name}.jsonl or {name}/*.parquet")
    return [
        (row_origin(path, number, dataset.name), row)
        for path in files
        for number, row in read_numbered_rows(
            path, dataset=dataset.name, on_bad_rows=on_bad_rows, skipped=dataset.skipped
        )
    ]


def _field(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def load_visdoc(
    folder: str | Path, *, image_dir: str | Path, on_bad_rows: OnBadRows = "error", name: str | None = None
) -> VisDocDataset:
    """Read a BEIR-layout visual-document set; images stored as bytes are written to `image_dir` (by content)."""
    folder, image_dir = Path(folder), Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    dataset = VisDocDataset(name or folder.name, [], [], [])
    page_index: dict[str, int] = {}
    for where, row in _table(folder, "corpus", dataset, on_bad_rows):
        try:
            corpus_id = _field(row, "corpus-id", "corpus_id", "_id", "id")
            if corpus_id is None:
                raise BadRow("page without an id", "expected a 'corpus-id' column")
            image = _page_image(row.get("image"), folder, image_dir)
            text = row.get("text") if isinstance(row.get("text"), str) and row["text"].strip() else None
        except BadRow as err:
            handle_bad_row(err, where, on_bad_rows, dataset.skipped)
            continue
        page_index[str(corpus_id)] = len(dataset.pages)
        dataset.pages.append(Input(text=text, image=image, role="document"))
    qrels: dict[str, dict[int, float]] = defaultdict(dict)
    for where, row in _table(folder, "qrels", dataset, on_bad_rows):
        query_id, corpus_id = _field(row, "query-id", "query_id"), _field(row, "corpus-id", "corpus_id")
        score = float(row.get("score", 1))
        if str(corpus_id) not in page_index:
            handle_bad_row(
                BadRow("judgement of an unknown page", f"corpus-id {corpus_id!r} is not in the corpus"),
                where,
                on_bad_rows,
                dataset.skipped,
            )
            continue
        if score > 0:
            qrels[str(query_id)][page_index[str(corpus_id)]] = score
    for where, row in _table(folder, "queries", dataset, on_bad_rows):
        query_id = _field(row, "query-id", "query_id", "_id", "id")
        text = _field(row, "query", "text")
        try:
            if not isinstance(text, str) or not text.strip():
                raise BadRow("query without text", "expected a non-empty 'query' column")
            if not qrels.get(str(query_id)):
                raise BadRow("query without a relevant page", f"query-id {query_id!r} has no positive qrels")
        except BadRow as err:
            # BEIR drops unjudged queries: skip them always, and count them.
            dataset.skipped.add(f"{where}: {err}", err.reason)
            if err.reason != "query without a relevant page":
                handle_bad_row(err, where, on_bad_rows, SkipReport())
            continue
        dataset.queries.append(Input(text=text.strip(), role="query"))
        dataset.relevant.append(qrels[str(query_id)])
    if not dataset.queries or not dataset.pages:
        raise DataError(f"{folder}: no usable queries or pages ({dataset.skipped.count} rows skipped)")
    return dataset


def _page_image(image: Any, folder: Path, image_dir: Path) -> Path:
    if isinstance(image, str) and image.strip():
        return resolve_image(folder, image.strip(), "page")
    if isinstance(image, dict):
        if image.get("bytes"):
            data = bytes(image["bytes"])
            path = image_dir / (hashlib.sha256(data).hexdigest()[:24] + Path(image.get("path") or "x.png").suffix)
            if not path.is_file():
                path.write_bytes(data)
            check_image(path, "page image (stored in the table)")
            return path
        if image.get("path"):
            return resolve_image(folder, image["path"], "page")
    raise BadRow("page without an image", "expected 'image' as a path or a {'bytes', 'path'} struct")


def visdoc_scores(positions: list[np.ndarray], gains: list[list[float]]) -> dict[str, float]:
    """The reported numbers from each query's relevant pages: their 1-based positions in its ranked list and their
    graded relevance (in the same order)."""
    best = [float(np.min(query_positions)) for query_positions in positions]
    return {
        "ndcg_linear@5": ndcg_at_k_multi(positions, 5, gains=gains),
        "recall@1": recall_at_k_multi(positions, 1),
        "recall@5": recall_at_k_multi(positions, 5),
        "recall@10": recall_at_k_multi(positions, 10),
        "hit@1": hit_at_k(best, 1),
        "mrr": mrr(best),
    }


def ranks_from_scores(scores: torch.Tensor, relevant: list[list[int]]) -> list[np.ndarray]:
    """For each query, the 1-based ranks of its relevant pages among the irrelevant ones, from a `[Q, N]` score
    matrix; the tie rule of `corpus_ranks` (an irrelevant page with an equal score ranks above), so a model that
    scores every page alike ranks nothing first."""
    if scores.shape[0] != len(relevant):
        raise ValueError(f"{len(relevant)} relevance lists for {scores.shape[0]} queries")
    out = []
    for row, entries in zip(scores, relevant, strict=True):
        irrelevant = torch.ones(scores.shape[1], dtype=torch.bool)  # [N]
        irrelevant[entries] = False
        own = row[entries]  # [r]
        out.append(1 + (row[irrelevant].unsqueeze(0) >= own.unsqueeze(1)).sum(dim=1).double().numpy())  # [r]
    return out


def multi_vector_scores(
    encoder: Encoder, dataset: VisDocDataset, *, batch_size: int = 32, setting: str = "visdoc_scoring"
) -> torch.Tensor:
    """`[queries, pages]` MaxSim scores of the dataset's token matrices (encoded here, never cached)."""
    model = require_multi_vector(encoder, setting)
    pages = model.encode_multi_vector(dataset.pages, batch_size=batch_size)  # N x [n_tokens, dim]
    queries = model.encode_multi_vector(dataset.queries, batch_size=batch_size)  # Q x [n_tokens, dim]
    return maxsim_scores(queries, pages)  # [Q, N]


def run_visdoc(
    encoder: Encoder,
    folder: str | Path,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    on_bad_rows: OnBadRows = "error",
    faiss_min_corpus: int = 100_000,
    progress: bool = True,
    scoring: VisDocScoring = "single_vector",
) -> tuple[dict[str, Any], EmbedStats]:
    """Evaluate `encoder` on one BEIR-layout folder, scored as `scoring` says.

    The result's `scores` are those of the first scoring run (single-vector unless only `multi_vector` is
    asked); `scores_by_scoring` holds every scoring's numbers, keyed `single_vector` / `multi_vector`.

    Raises:
        ConfigError: a multi-vector scoring with an encoder whose model has no multi-vector head (naming it).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"visdoc scoring must be one of {sorted(SCORINGS)}, got {scoring!r}")
    scorings = SCORINGS[scoring]
    if "multi_vector" in scorings:
        require_multi_vector(encoder, "visdoc_scoring")  # before any encoding: a wrong model fails at once
    by_scoring: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="unime-visdoc-") as image_dir:
        dataset = load_visdoc(folder, image_dir=image_dir, on_bad_rows=on_bad_rows)
        relevant = [list(judged) for judged in dataset.relevant]
        gains = [[judged[page] for page in entries] for judged, entries in zip(dataset.relevant, relevant, strict=True)]
        stats = EmbedStats(listed=len(dataset.pages) + len(dataset.queries))
        stats.distinct = stats.listed
        if "single_vector" in scorings:
            vectors, stats = embed_sets(
                encoder,
                {"pages": dataset.pages, "queries": dataset.queries},
                dataset=dataset.name,
                batch_size=batch_size,
                cache_dir=cache_dir,
                progress=progress,
            )
            ranks = corpus_ranks(vectors["queries"], vectors["pages"], relevant, faiss_min_corpus=faiss_min_corpus)
            by_scoring["single_vector"] = visdoc_scores([positions_in_list(r) for r in ranks], gains)
        if "multi_vector" in scorings:
            scores = multi_vector_scores(encoder, dataset, batch_size=batch_size)  # [Q, N]
            stats.encoded += len(dataset.pages) + len(dataset.queries)  # token matrices are encoded every run
            ranks = ranks_from_scores(scores, relevant)
            by_scoring["multi_vector"] = visdoc_scores([positions_in_list(r) for r in ranks], gains)
    return {
        "task": "visdoc",
        "dataset": dataset.name,
        "queries": len(dataset.queries),
        "pages": len(dataset.pages),
        "scoring": list(scorings),
        "scores": by_scoring[scorings[0]],
        "scores_by_scoring": by_scoring,
        "skipped": dataset.skipped.to_dict(),
    }, stats
