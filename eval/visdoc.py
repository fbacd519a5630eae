"""Visual-document retrieval (MMEB-V2's visdoc tasks: ViDoRe v1/v2, VisRAG) in the BEIR layout: nDCG@5 and more.

Layout (as the ViDoRe v2 / MMEB-V2 visdoc datasets are published): a folder holding three tables, each a
parquet or JSONL file (`corpus.parquet`) or a folder of them (`corpus/test-00000.parquet`):
- `corpus`: `corpus-id` and `image` (a path relative to the folder, or the Hugging Face image struct
  `{"bytes", "path"}`), optionally `text`;
- `queries`: `query-id` and `query` (or `text`);
- `qrels`: `query-id`, `corpus-id` and `score` (graded relevance; > 0 is relevant).
Queries rank the whole corpus; scores follow MMEB-V2's report: `ndcg_linear@5` (gains = qrels scores), with
hit@1, recall@5/10 and MRR of the best relevant page beside it. Queries without a relevant page are skipped
(counted, as BEIR evaluation drops them).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from unime.eval.encoders import Encoder
from unime.eval.scoring import corpus_ranks, positions_in_list
from unime.inputs import Input
from unime.metrics import hit_at_k, mrr, ndcg_at_k_multi, recall_at_k_multi


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


def run_visdoc(
    encoder: Encoder,
    folder: str | Path,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    on_bad_rows: OnBadRows = "error",
    faiss_min_corpus: int = 100_000,
    progress: bool = True,
) -> tuple[dict[str, Any], EmbedStats]:
    with tempfile.TemporaryDirectory(prefix="unime-visdoc-") as image_dir:
        dataset = load_visdoc(folder, image_dir=image_dir, on_bad_rows=on_bad_rows)
        vectors, stats = embed_sets(
            encoder,
            {"pages": dataset.pages, "queries": dataset.queries},
            dataset=dataset.name,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=progress,
        )
    pages, queries = vectors["pages"], vectors["queries"]
    relevant = [list(judged) for judged in dataset.relevant]
    ranks = [
        positions_in_list(query_ranks)
        for query_ranks in corpus_ranks(queries, pages, relevant, faiss_min_corpus=faiss_min_corpus)
    ]
    gains = [[judged[page] for page in entries] for judged, entries in zip(dataset.relevant, relevant, strict=True)]
    best = [float(np.min(query_ranks)) for query_ranks in ranks]
    scores = {
        "ndcg_linear@5": ndcg_at_k_multi(ranks, 5, gains=gains),
        "hit@1": hit_at_k(best, 1),
        "recall@5": recall_at_k_multi(ranks, 5),
        "recall@10": recall_at_k_multi(ranks, 10),
        "mrr": mrr(best),
    }
    return {
        "task": "visdoc",
        "dataset": dataset.name,
        "queries": len(dataset.queries),
        "pages": len(dataset.pages),
        "scores": scores,
        "skipped": dataset.skipped.to_dict(),
    }, stats
