"""MMEB (VLM2Vec's Massive Multimodal Embedding Benchmark): per-query candidate lists, precision@1 and more.

Layout (as `TIGER-Lab/MMEB-eval` downloads it): one folder per dataset under a root, each holding
`test-*.parquet` (or `*.jsonl`) files whose rows have
- `qry_text`: the query text, with its instruction and possibly an image placeholder (`<|image_1|>`, removed);
- `qry_img_path`: the query image, relative to the image root ("" for none);
- `tgt_text`, `tgt_img_path`: equal-length lists of candidate texts and image paths ("" for none); the first
  candidate is the positive.
Images live under an image root (default `<root>/images`, where `images.zip` unpacks).

Scores follow the MMEB leaderboard: precision@1 (hit@1) per dataset, averaged per meta-task (classification,
VQA, retrieval, grounding), over in-distribution (the MMEB-train subsets) and out-of-distribution datasets,
and over all datasets; MMEB-V2's hit@k, nDCG@5 and MRR are reported beside it. A dataset the table below does
not know takes its meta-task and split from `<root>/categories.json` (`{"Name": {"category": ..., "split":
"IND" | "OOD"}}`), else it counts in the overall score only ("other").

Texts are embedded as the dataset gives them (instruction included), with no role: like VLM2Vec, the
benchmark's instructions are the only ones applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unime.data.dataset import DataError
from unime.eval.data import (
    BadRow,
    OnBadRows,
    SkipReport,
    handle_bad_row,
    read_numbered_rows,
    resolve_image,
    row_origin,
)
from unime.eval.embed_sets import embed_sets
from unime.eval.embedding import EmbedStats, ItemTable
from unime.eval.encoders import Encoder
from unime.eval.items import clean_text
from unime.eval.scoring import candidate_list_ranks
from unime.inputs import Input
from unime.metrics import hit_at_k, mrr, ndcg_at_k

COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
CATEGORIES = ("classification", "vqa", "retrieval", "grounding")

# MMEB-V1's 36 datasets: meta-task and whether MMEB-train holds the dataset (IND) or not (OOD).
MMEB_V1: dict[str, tuple[str, str]] = {
    **{name: ("classification", "IND") for name in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{name: ("classification", "OOD") for name in ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{name: ("vqa", "IND") for name in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{name: ("vqa", "OOD") for name in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{
        name: ("retrieval", "IND")
        for name in (
            "VisDial",
            "CIRR",
            "VisualNews_t2i",
            "VisualNews_i2t",
            "MSCOCO_t2i",
            "MSCOCO_i2t",
            "NIGHTS",
            "WebQA",
        )
    },
    **{name: ("retrieval", "OOD") for name in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("grounding", "IND"),
    **{name: ("grounding", "OOD") for name in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}
CATEGORIES_FILE = "categories.json"
HIT_KS = (1, 5, 10)


@dataclass
class MMEBDataset:
    """One dataset, read and validated: distinct queries and candidates, and each query's candidate list."""

    name: str
    category: str
    split: str
    queries: ItemTable
    query_rows: list[int]
    """For each kept row, its query's row in `queries`."""
    candidates: ItemTable
    lists: list[list[int]]
    """For each kept row, its candidates' rows in `candidates`, positive first."""
    skipped: SkipReport = field(default_factory=SkipReport)

    @property
    def listed_candidates(self) -> int:
        return sum(len(candidate_list) for candidate_list in self.lists)


def list_datasets(root: str | Path) -> list[str]:
    """Dataset folders under an MMEB root (those holding a test parquet or JSONL file), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: the MMEB root is not a directory")
    names = sorted(path.parent.name for path in root.glob("*/*") if _is_data_file(path))
    if not names:
        raise DataError(
            f"{root}: no dataset folders found; expected <root>/<dataset>/test-*.parquet (or *.jsonl), as "
            "TIGER-Lab/MMEB-eval downloads them"
        )
    return sorted(set(names))


def _is_data_file(path: Path) -> bool:
    return path.is_file() and ((path.suffix == ".parquet" and path.name.startswith("test")) or path.suffix == ".jsonl")


def _categories(root: Path) -> dict[str, tuple[str, str]]:
    table = dict(MMEB_V1)
    path = root / CATEGORIES_FILE
    if path.is_file():
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        for name, entry in extra.items():
            category, split = entry.get("category"), entry.get("split")
            if category not in CATEGORIES or split not in ("IND", "OOD"):
                raise DataError(
                    f"{path}: dataset {name!r}: expected category in {CATEGORIES} and split 'IND' or 'OOD', got "
                    f"{entry!r}"
                )
            table[name] = (category, split)
    return table


def load_dataset(
    root: str | Path, name: str, *, image_root: str | Path | None = None, on_bad_rows: OnBadRows = "error"
) -> MMEBDataset:
    """Read and check one dataset folder; bad rows raise `DataError` (or are skipped and counted)."""
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root / "images"
    folder = root / name
    files = sorted(path for path in folder.glob("*") if _is_data_file(path)) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: dataset {name!r} has no test-*.parquet or *.jsonl file")
    category, split = _categories(root).get(name, ("other", "other"))
    dataset = MMEBDataset(name, category, split, ItemTable(), [], ItemTable(), [])
    for path in files:
        rows = read_numbered_rows(path, dataset=name, on_bad_rows=on_bad_rows, skipped=dataset.skipped)
        if rows:
            missing = [column for column in COLUMNS if column not in rows[0][1]]
            if missing:
                raise DataError(
                    f"{path}: dataset {name!r} is not in the MMEB eval layout: missing column(s) {missing}; "
                    f"expected {list(COLUMNS)}"
                )
        for number, row in rows:
            try:
                query, candidates = _parse_row(row, image_root)
            except BadRow as err:
                handle_bad_row(err, row_origin(path, number, name), on_bad_rows, dataset.skipped)
                continue
            dataset.query_rows.append(dataset.queries.add(query))
            dataset.lists.append([dataset.candidates.add(candidate) for candidate in candidates])
    if not dataset.lists:
        raise DataError(f"{folder}: dataset {name!r} has no usable rows ({dataset.skipped.count} skipped)")
    return dataset


def _parse_row(row: dict[str, Any], image_root: Path) -> tuple[Input, list[Input]]:
    query = _item(row.get("qry_text"), row.get("qry_img_path"), image_root, "query")
    if query is None:
        raise BadRow("query has neither text nor image")
    texts, images = row.get("tgt_text"), row.get("tgt_img_path")
    texts = list(texts) if isinstance(texts, (list, tuple, np.ndarray)) else texts
    images = list(images) if isinstance(images, (list, tuple, np.ndarray)) else images
    if not isinstance(texts, list) or not isinstance(images, list):
        raise BadRow("candidates are not lists", "tgt_text and tgt_img_path must be lists")
    if not texts and not images:
        raise BadRow("query without candidates")
    if len(texts) != len(images):
        raise BadRow("candidate lists differ in length", f"{len(texts)} tgt_text vs {len(images)} tgt_img_path")
    candidates: list[Input] = []
    for position, (text, image) in enumerate(zip(texts, images, strict=True)):
        candidate = _item(text, image, image_root, f"candidate {position}")
        if candidate is None:
            if position == 0:
                raise BadRow("candidate list without its positive", "the first target (the positive) is empty")
            raise BadRow("empty candidate", f"candidate {position} has neither text nor image")
        candidates.append(candidate)
    return query, candidates


def _item(text: Any, image: Any, image_root: Path, what: str) -> Input | None:
    if text is not None and not isinstance(text, str):
        raise BadRow("text is not a string", f"{what} text is a {type(text).__name__}")
    if image is not None and not isinstance(image, str):
        raise BadRow("image path is not a string", f"{what} image path is a {type(image).__name__}")
    text = clean_text(text)
    image_path = resolve_image(image_root, image.strip(), what) if image and image.strip() else None
    if text is None and image_path is None:
        return None
    return Input(text=text, image=image_path)


def evaluate_dataset(
    encoder: Encoder,
    dataset: MMEBDataset,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], EmbedStats]:
    """Embed a dataset's distinct queries and candidates once each and score every candidate list."""
    vectors, stats = embed_sets(
        encoder,
        {"queries": dataset.queries.items, "candidates": dataset.candidates.items},
        dataset=dataset.name,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    stats.listed = len(dataset.lists) + dataset.listed_candidates
    ranks = candidate_list_ranks(vectors["queries"][dataset.query_rows], vectors["candidates"], dataset.lists)
    return ranks_to_scores(ranks, dataset), stats


def ranks_to_scores(ranks: np.ndarray, dataset: MMEBDataset) -> dict[str, Any]:
    scores: dict[str, Any] = {f"hit@{k}": hit_at_k(ranks, k) for k in HIT_KS}
    scores.update({"ndcg@5": ndcg_at_k(ranks, 5), "mrr": mrr(ranks)})
    return {
        "dataset": dataset.name,
        "category": dataset.category,
        "split": dataset.split,
        "queries": len(ranks),
        "candidates_per_query": dataset.listed_candidates / max(1, len(dataset.lists)),
        "scores": scores,
        "skipped": dataset.skipped.to_dict(),
    }


def leaderboard(per_dataset: list[dict[str, Any]], metric: str = "hit@1") -> dict[str, float | None]:
    """The MMEB leaderboard's averages of one metric: per meta-task, IND, OOD and overall (None when empty)."""

    def mean(rows: list[dict[str, Any]]) -> float | None:
        return float(np.mean([row["scores"][metric] for row in rows])) if rows else None

    summary = {category: mean([r for r in per_dataset if r["category"] == category]) for category in CATEGORIES}
    summary["IND"] = mean([r for r in per_dataset if r["split"] == "IND"])
    summary["OOD"] = mean([r for r in per_dataset if r["split"] == "OOD"])
    summary["overall"] = mean(per_dataset)
    return summary


def run_mmeb(
    encoder: Encoder,
    root: str | Path,
    *,
    datasets: list[str] | None = None,
    image_root: str | Path | None = None,
    on_bad_rows: OnBadRows = "error",
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], EmbedStats]:
    """Evaluate an encoder on MMEB datasets under `root` (all of them by default)."""
    names = datasets or list_datasets(root)
    per_dataset, stats = [], EmbedStats()
    for name in names:
        dataset = load_dataset(root, name, image_root=image_root, on_bad_rows=on_bad_rows)
        result, dataset_stats = evaluate_dataset(
            encoder, dataset, batch_size=batch_size, cache_dir=cache_dir, progress=progress
        )
        per_dataset.append(result)
        stats.add(dataset_stats)
    return {
        "task": "mmeb",
        "root": str(root),
        "datasets": per_dataset,
        "leaderboard": leaderboard(per_dataset),
        "leaderboard_v2": {
            metric: leaderboard(per_dataset, metric)["overall"] for metric in ("hit@5", "ndcg@5", "mrr")
        },
    }, stats
