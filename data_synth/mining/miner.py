"""Mine hard negatives for training rows: embed, search, drop false negatives, sample, score, write.

For each row (query, positive): the corpus (all rows' positives, or a given corpus) is searched for the query's
top-K by the embedder's cosine similarity. A candidate showing the same as the positive or the query (same text,
same image bytes) is skipped. A candidate is a false negative, and dropped, when its similarity exceeds the
positive's by more than `margin`: s > s_pos + margin, the comparison of the training loss
(`unime.losses.select_hard_negatives`), so `margin` means the same in `unime mine` and in a recipe's
`loss.margin`. UniME uses 0.1; 0 drops whatever scores above the positive; a negative margin is NV-Retriever-style
caution that also drops candidates just below the positive (and ties with it, such as a re-encoded copy of its
image). With a judge (our reranker, or an MLLM's p(yes) as UniME-V2 does), a candidate is also dropped when the
judge's score exceeds the positive's by more than `judge_margin`. Of the rest, in rank order, the `negatives`
hardest are kept, or, with a rank `window` (a, b), a seeded sample of ranks a..b-1 as mmE5 does. Rows get the
negatives and `scores` = [positive, *negatives]: the judge's scores when there is a judge (soft labels for the
KL loss), else the embedding similarities.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import unime
from unime.atomic import write_jsonl_atomic
from unime.data.dataset import DataError, image_problem, load_examples, parse_side
from unime.data.schema import TrainExample
from unime.data_synth.manifest import Manifest, make_output_directory
from unime.data_synth.mining.search import SearchMethod, search
from unime.data_synth.sharding import ALL, Shard
from unime.embedder import Embedder
from unime.embedding_store import EmbeddingStore, content_key, file_digest
from unime.errors import ConfigError
from unime.inputs import Input
from unime.ray_engine import RayEncoding
from unime.retrieve_rerank import PairScorer

Judge = PairScorer
"""A judge scores (query, document) pairs, higher = more relevant: `predict(pairs, batch_size=...,
show_progress_bar=...)`, as `unime.Reranker` and sentence-transformers' CrossEncoder do. A query or document is
a str, a PIL image, or a {"text", "image"} dict."""

JUDGE_CHUNK = 512
"""Pairs per judge call: images are decoded for one chunk at a time, not for the whole job."""


@dataclass
class MiningConfig:
    """Settings of hard-negative mining (`unime mine`)."""

    top_k: int = 50
    """Candidates retrieved per query (UniME-V2 retrieves the top 50)."""
    negatives: int = 8
    """Negatives kept per row (UniME trains on the 8 hardest)."""
    margin: float = 0.0
    """Drop a candidate as a false negative when its similarity is > the positive's plus this, as the training
    loss's `margin` does (UniME: 0.1; 0: anything above the positive; negative: also some just below it)."""
    judge_margin: float = 0.0
    """With a judge: drop a candidate whose judge score is > the positive's plus this (same meaning as `margin`)."""
    max_bad_share: float = 0.0
    """Fail when more than this share of the input rows, or of the corpus lines, is invalid (0: any bad row
    fails, as in training; 1: accept every drop). Dropped rows are listed with file, line and reason."""
    window: tuple[int, int] | None = None
    """Sample from ranks a..b-1 of the filtered candidates (0-based) instead of taking the hardest."""
    method: SearchMethod = "auto"
    """faiss search: exact below `search.EXACT_BELOW` candidates, IVF above, unless forced."""
    keep_existing: bool = False
    """Keep a row's own negatives (first) and add mined ones after them; scores cover all."""
    batch_size: int = 32
    """Inputs per embedder / judge forward pass."""
    seed: int = 0
    """Seed of window sampling and IVF training."""


@dataclass
class MiningReport:
    """What mining read, dropped and wrote."""

    rows_read: int = 0
    rows_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    """Input rows (and corpus lines) not used, by reason."""
    dropped_rows: list[dict[str, Any]] = field(default_factory=list)
    """Every input row and corpus line not used: {"file", "line" (1-based), "reason"}."""
    corpus_lines_read: int = 0
    candidates_retrieved: int = 0
    dropped_same_content: int = 0
    dropped_by_margin: int = 0
    dropped_by_judge: int = 0
    rows_short_of_negatives: int = 0
    """Rows that kept fewer than `negatives` negatives (too few candidates survived)."""
    search: dict[str, Any] = field(default_factory=dict)
    """Search method, nlist, nprobe, calibrated recall."""
    embeddings_cached: int = 0
    embeddings_computed: int = 0


@dataclass
class MinedRow:
    """One row's mining result."""

    example: TrainExample
    negatives: list[Input]
    scores: list[float]
    """[positive, *negatives]: judge scores with a judge, else cosine similarities."""
    mined: list[int]
    """Corpus indices of the mined negatives (after the existing ones, if kept)."""


def side_content(side: Input) -> tuple:
    """What an embedder reads of a side; equal content = the same candidate."""
    return (side.text, str(side.image) if side.image is not None else None, side.instruction)


def row_key(example: TrainExample) -> str:
    """The idempotent key of a row (for `--shard`): its query and positive."""
    # Not an embedding key: it only spreads rows over shards, and must stay stable for jobs that are under way.
    parts = ("row", side_content(example.query), side_content(example.positive))
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class SideEmbedder:
    """Embeds `Input`s through an `EmbeddingStore`, in batches grouped by instruction.

    The embedder is an `unime.Embedder`, or any sentence-transformers-style model whose `encode(inputs,
    prompt=..., prompt_name=..., batch_size=..., normalize_embeddings=...)` takes the inputs and an instruction.
    With `ray`, the vectors the store lacks are computed on a Ray cluster (each actor loads its own copy of the
    model, see `MiningEncoder`); the embedder here then only names the instructions.
    """

    def __init__(self, embedder: Any, cache: EmbeddingStore, batch_size: int = 32, ray: RayEncoding | None = None):
        self.embedder = embedder
        self.cache = cache
        self.batch_size = batch_size
        self.ray = ray
        self.hits = 0
        """Vectors read from the store (repeats counted)."""
        self.computed = 0
        """Vectors computed (distinct inputs that were not stored)."""

    def look(self, side: Input) -> tuple:
        """What a side shows: its text and its image's bytes. A copy of the positive's image under another name is
        the positive, never a negative, whatever the margin (at margin 0 it would tie with the positive, and a tie
        is not above it)."""
        return (side.text, file_digest(side.image) if side.image is not None else None)

    def _instruction(self, side: Input, role: str) -> str | None:
        """The instruction the embedder will apply (the side's own, else the model's default for the role)."""
        if side.instruction:
            return side.instruction
        instruction_for = getattr(self.embedder, "instruction_for", None)
        if instruction_for is not None:
            return instruction_for(role, None)
        return getattr(self.embedder, "prompts", {}).get(role)

    def fill(self, sides: Sequence[Input], role: str) -> list[str]:
        """Compute and store the vectors of `sides` the store lacks; returns their keys. `role` is "query" or
        "document" (its default instruction)."""
        resolved = [replace(side, instruction=self._instruction(side, role)) for side in sides]
        keys = [
            content_key(text=side.text, image=side.image, instruction=side.instruction, role=role) for side in resolved
        ]
        self.hits += len(keys) - len(self.cache.missing(keys))
        if self.ray is not None:
            self.computed += self.ray.fill(self.cache, keys, resolved, source="the embedder")
            return keys

        def compute(positions: list[int]) -> np.ndarray:
            return encode_sides(self.embedder, [resolved[p] for p in positions], self.batch_size)

        # A shard's worth per call: `compute` batches by instruction itself, and a kill loses at most one shard.
        self.computed += self.cache.fill(keys, compute, batch_size=self.cache.shard_size, source="the embedder")
        return keys

    def embed(self, sides: Sequence[Input], role: str) -> np.ndarray:
        """`[len(sides), dim]` L2-normalised vectors; `role` is "query" or "document" (its default instruction)."""
        vectors = self.cache.get(self.fill(sides, role))
        norms = np.linalg.norm(vectors, axis=1, keepdims=True) if len(vectors) else 1.0
        return vectors / np.maximum(norms, 1e-12)


def encode_sides(embedder: Any, sides: Sequence[Input], batch_size: int) -> np.ndarray:
    """`[len(sides), D]` unit vectors of sides whose `instruction` is the one to apply (already resolved by
    `SideEmbedder`): one `encode` call per distinct instruction."""
    groups: dict[str | None, list[int]] = {}
    for slot, side in enumerate(sides):
        groups.setdefault(side.instruction, []).append(slot)
    out: np.ndarray | None = None
    for instruction, slots in groups.items():
        inputs = [_embed_input(sides[slot], isinstance(embedder, Embedder)) for slot in slots]
        vectors = np.asarray(
            embedder.encode(inputs, prompt=instruction, batch_size=batch_size, normalize_embeddings=True),
            dtype=np.float32,
        )  # [len(slots), D]
        if out is None:
            out = np.zeros((len(sides), vectors.shape[1]), dtype=np.float32)
        out[slots] = vectors
    assert out is not None, "encode_sides needs at least one side"
    return out


@dataclass
class MiningEncoder:
    """Mining's encoder, built in each Ray actor (`unime.ray_engine.EncoderFactory`): the embedder of `model_dir`
    loaded once, sides encoded as `SideEmbedder` encodes them here."""

    model_dir: str
    """The embedder's model directory (unime.load); every node of the cluster must see it."""
    batch_size: int = 32
    """Inputs per forward pass."""
    device: str | None = None
    """torch device in the actor (default: cuda if the actor has a GPU)."""

    def __call__(self) -> Callable[[list[Input]], np.ndarray]:
        embedder = unime.load(self.model_dir, **({"device": self.device} if self.device else {}))
        return functools.partial(encode_sides, embedder, batch_size=self.batch_size)


def _embed_input(side: Input, text_as_dict: bool) -> Any:
    if side.image is None:
        # unime reads a one-word string ending in ".png" as an image path; a dict's text is always text. Other
        # (text) embedders take plain strings.
        return {"text": side.text} if text_as_dict else side.text
    return {"text": side.text, "image": side.image} if side.text is not None else {"image": side.image}


def _judge_input(side: Input, images: dict[str, Image.Image]):
    image = None
    if side.image is not None:
        key = str(side.image)
        if key not in images:
            with Image.open(side.image) as opened:
                images[key] = opened.convert("RGB")
        image = images[key]
    if image is None:
        return side.text
    if side.text is None:
        return image
    return {"text": side.text, "image": image}


def judge_scores(judge: Judge, pairs: Sequence[tuple[Input, Input]], batch_size: int = 32) -> np.ndarray:
    """The judge's score of each (query side, document side) pair, images decoded a chunk at a time."""
    scores = np.zeros(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), JUDGE_CHUNK):
        images: dict[str, Image.Image] = {}
        chunk = [(_judge_input(q, images), _judge_input(d, images)) for q, d in pairs[start : start + JUDGE_CHUNK]]
        predicted = np.asarray(judge.predict(chunk, batch_size=batch_size, show_progress_bar=False), dtype=np.float64)
        if predicted.shape != (len(chunk),):
            raise ConfigError(f"the judge returned {predicted.shape} scores for {len(chunk)} pairs")
        scores[start : start + len(chunk)] = predicted
    return scores


def is_false_negative(score: float, positive_score: float, margin: float) -> bool:
    """A candidate scoring more than `margin` above the positive is taken for an unlabelled positive: the rule of
    the training loss (`unime.losses.select_hard_negatives`), for similarities and judge scores alike."""
    return bool(score > positive_score + margin)


def _check(config: MiningConfig) -> None:
    if config.top_k < 1 or config.negatives < 1:
        raise ConfigError(f"top_k and negatives must be >= 1, got {config.top_k} and {config.negatives}")
    if not 0.0 <= config.max_bad_share <= 1.0:
        raise ConfigError(f"max_bad_share must be in [0, 1], got {config.max_bad_share}")
    if config.window is not None:
        a, b = config.window
        if not 0 <= a < b <= config.top_k:
            raise ConfigError(f"window {a}:{b}: need 0 <= a < b <= top_k ({config.top_k})")


def mine_hard_negatives(
    examples: Sequence[TrainExample],
    embedder: Any,
    config: MiningConfig | None = None,
    *,
    corpus: Sequence[Input] | None = None,
    judge: Judge | None = None,
    cache: EmbeddingStore | None = None,
    report: MiningReport | None = None,
    ray: RayEncoding | None = None,
) -> tuple[list[MinedRow], MiningReport]:
    """Mine negatives for `examples` from `corpus` (default: the examples' distinct positives).

    Args:
        examples: validated training rows (`unime.data.load_examples`).
        embedder: an `unime.Embedder` (anything with `encode`, `instruction_for` and `embedding_dim`).
        config: see `MiningConfig`.
        corpus: candidate documents; default: every distinct positive of `examples`.
        judge: optional scorer of (query, document) pairs (see `Judge`).
        cache: where embeddings are kept (default: in memory only).
        ray: compute the embeddings on a Ray cluster (inside `unime.ray_engine.ray_cluster`); default here.
    """
    config = config or MiningConfig()
    _check(config)
    report = report or MiningReport()
    cache = cache if cache is not None else EmbeddingStore(None, "memory")
    sides = SideEmbedder(embedder, cache, config.batch_size, ray)
    if corpus is None:
        unique: dict[tuple, Input] = {}
        for example in examples:
            unique.setdefault(side_content(example.positive), example.positive)
        corpus = list(unique.values())
    corpus = list(corpus)
    if not corpus:
        raise ConfigError("the mining corpus is empty")
    if not examples:
        return [], report

    query_vectors = sides.embed([e.query for e in examples], "query")  # [Q, D]
    positive_vectors = sides.embed([e.positive for e in examples], "document")  # [Q, D]
    corpus_vectors = sides.embed(corpus, "document")  # [C, D]
    positive_sims = np.einsum("qd,qd->q", query_vectors, positive_vectors)  # [Q]
    # One extra: the positive itself (or the query) is usually in the corpus and is skipped.
    found = search(query_vectors, corpus_vectors, config.top_k + 1, config.method, seed=config.seed)
    report.search = {
        key: value for key, value in asdict(found).items() if key not in ("scores", "indices") and value is not None
    }

    existing_vectors = None
    if config.keep_existing:
        flat = [n for e in examples for n in e.negatives]
        existing_vectors = sides.embed(flat, "document") if flat else None

    # Stage 1: retrieval and the margin filter.
    survivors: list[list[tuple[int, float]]] = []
    existing_offset = 0
    existing_sims: list[list[float]] = []
    for row, example in enumerate(examples):
        skip = {sides.look(example.positive), sides.look(example.query)}
        own = list(example.negatives) if config.keep_existing else []
        skip |= {sides.look(n) for n in own}
        sims_own = []
        if own and existing_vectors is not None:
            block = existing_vectors[existing_offset : existing_offset + len(own)]  # [n, D]
            sims_own = [float(s) for s in block @ query_vectors[row]]
        existing_offset += len(own) if config.keep_existing else 0
        existing_sims.append(sims_own)
        kept: list[tuple[int, float]] = []
        for index, sim in zip(found.indices[row], found.scores[row], strict=True):
            if index < 0:
                continue
            report.candidates_retrieved += 1
            if sides.look(corpus[index]) in skip:
                report.dropped_same_content += 1
                continue
            if is_false_negative(sim, positive_sims[row], config.margin):
                report.dropped_by_margin += 1
                continue
            kept.append((int(index), float(sim)))
        survivors.append(kept[: config.top_k])

    # Stage 2: the judge scores the positive, the row's own negatives and every surviving candidate.
    judged: list[tuple[float, list[float], list[float]]] | None = None
    if judge is not None:
        pairs: list[tuple[Input, Input]] = []
        for example, kept in zip(examples, survivors, strict=True):
            own = list(example.negatives) if config.keep_existing else []
            pairs.append((example.query, example.positive))
            pairs += [(example.query, n) for n in own]
            pairs += [(example.query, corpus[index]) for index, _ in kept]
        flat_scores = judge_scores(judge, pairs, config.batch_size)
        judged = []
        at = 0
        for example, kept in zip(examples, survivors, strict=True):
            n_own = len(example.negatives) if config.keep_existing else 0
            positive_score = float(flat_scores[at])
            own_scores = [float(s) for s in flat_scores[at + 1 : at + 1 + n_own]]
            candidate_scores = [float(s) for s in flat_scores[at + 1 + n_own : at + 1 + n_own + len(kept)]]
            at += 1 + n_own + len(kept)
            judged.append((positive_score, own_scores, candidate_scores))

    # Stage 3: sample and score.
    mined_rows: list[MinedRow] = []
    for row, (example, kept) in enumerate(zip(examples, survivors, strict=True)):
        own = list(example.negatives) if config.keep_existing else []
        candidates = [(index, sim, sim) for index, sim in kept]  # (corpus index, similarity, score to write)
        positive_score = float(positive_sims[row])
        own_scores = existing_sims[row]
        if judged is not None:
            positive_score, own_scores, candidate_scores = judged[row]
            filtered = []
            for (index, sim, _), score in zip(candidates, candidate_scores, strict=True):
                if is_false_negative(score, positive_score, config.judge_margin):
                    report.dropped_by_judge += 1
                    continue
                filtered.append((index, sim, score))
            candidates = filtered
        wanted = max(config.negatives - len(own), 0)
        if config.window is not None:
            a, b = config.window
            pool = candidates[a:b]
            rng = random.Random(f"{config.seed}:{row_key(example)}")
            picked = sorted(rng.sample(range(len(pool)), min(wanted, len(pool))))
            chosen = [pool[i] for i in picked]
        else:
            chosen = candidates[:wanted]
        if len(own) + len(chosen) < config.negatives:
            report.rows_short_of_negatives += 1
        mined_rows.append(
            MinedRow(
                example,
                own + [corpus[index] for index, _, _ in chosen],
                [positive_score, *own_scores, *(score for _, _, score in chosen)],
                [index for index, _, _ in chosen],
            )
        )
    report.embeddings_cached = sides.hits
    report.embeddings_computed = sides.computed
    return mined_rows, report


def side_to_row(side: Input, out_dir: Path) -> dict:
    """A side as a row field, its image path relative to the output file's folder."""
    row: dict = {}
    if side.text is not None:
        row["text"] = side.text
    if side.image is not None:
        row["image"] = Path(os.path.relpath(Path(side.image).resolve(), out_dir.resolve())).as_posix()
    if side.instruction:
        row["instruction"] = side.instruction
    return row


def mined_row_to_dict(mined: MinedRow, out_dir: Path) -> dict:
    example = mined.example
    return {
        "query": side_to_row(example.query, out_dir),
        "positive": side_to_row(example.positive, out_dir),
        "negatives": [side_to_row(side, out_dir) for side in mined.negatives],
        "scores": [round(score, 6) for score in mined.scores],
        "source": example.source,
    }


def read_corpus(path: str | Path, report: MiningReport) -> list[Input]:
    """Candidate documents from JSONL, one side per line ({"text", "image", "instruction"}; images relative to
    the file). Bad lines (not JSON, no text or image, unreadable image) are skipped: counted by reason in
    `report.rejected` and listed with their line in `report.dropped_rows`."""
    import json

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: corpus file does not exist")
    sides: list[Input] = []
    checked: dict[Path, str | None] = {}

    def drop(number: int, kind: str, reason: str) -> None:
        report.rejected[f"corpus: {kind}"] += 1
        report.dropped_rows.append({"file": str(path), "line": number, "reason": reason})

    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            report.corpus_lines_read += 1
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                drop(number, "not valid JSON", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            try:
                side = parse_side(raw, f"{path}:{number}", path.parent)
            except DataError as err:
                reason = str(err).split(": ", 1)[-1]
                drop(number, reason.split(": ", 1)[-1], reason)
                continue
            if side.image is not None:
                if side.image not in checked:
                    checked[side.image] = image_problem(side.image)
                if checked[side.image] is not None:
                    drop(number, "unreadable or missing image", str(checked[side.image]))
                    continue
            sides.append(side)
    return sides


def check_bad_share(what: str, bad: int, total: int, max_share: float, dropped: list[dict[str, Any]]) -> None:
    """Refuse to go on when more than `max_share` of `total` rows are bad, naming the first few."""
    if bad == 0 or bad <= max_share * total:
        return
    first = "; ".join(f"{row['file']}:{row['line']}: {row['reason']}" for row in dropped[:3])
    raise DataError(
        f"{bad} of {total} {what} are invalid ({bad / max(total, 1):.1%}, more than the accepted "
        f"{max_share:.1%}): {first}{' ...' if bad > 3 else ''}. Fix them, or pass --skip-bad-rows (or "
        "--max-bad-share) to drop them; each dropped row is listed in the manifest"
    )


def training_files(path: str | Path) -> list[Path]:
    """A training file, or a generator's output folder: the shards its manifest lists (else its *.jsonl)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    if (path / "manifest.json").is_file():
        return [path / name for name in Manifest.load(path).shards]
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise ConfigError(f"{path}: a folder without manifest.json or .jsonl files")
    return files


def output_path_for(out_path: str | Path, shard: Shard) -> Path:
    """`out.jsonl`, or `out.part-<i>-of-<N>.jsonl` for one shard of a sharded job."""
    out_path = Path(out_path)
    if shard.count == 1:
        return out_path
    return out_path.with_name(f"{out_path.stem}.part-{shard.index:05d}-of-{shard.count:05d}{out_path.suffix}")


def mine_file(
    embedder: Any,
    train_path: str | Path,
    out_path: str | Path,
    config: MiningConfig | None = None,
    *,
    model_id: str,
    corpus_path: str | Path | None = None,
    judge: Judge | None = None,
    judge_id: str = "",
    cache_dir: str | Path | None = None,
    shard: Shard = ALL,
    ray: RayEncoding | None = None,
) -> tuple[Path, Manifest]:
    """Mine negatives for the rows of `train_path` (a file, or a generated folder) this shard owns and write
    them to `out_path` (atomic), with `<out>.manifest.json` beside it. Rows that fail validation (bad fields,
    unreadable images) are counted by reason in the manifest and not written. With `ray`, the embeddings are
    computed on a Ray cluster (see `mine_hard_negatives`). Returns the written path and its manifest."""
    config = config or MiningConfig()
    _check(config)
    report = MiningReport()
    out = output_path_for(out_path, shard)
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the JSONL file to write")
    make_output_directory(out.parent)
    examples, load_report = load_examples(training_files(train_path), on_error="skip", check_images=True)
    report.rows_read = load_report.kept + load_report.skipped
    for reason, count in load_report.reasons.items():
        # One count per kind of problem, not per file: the paths are in the loader's messages, not the reason.
        report.rejected[re.sub(r"image file '[^']*'", "image file", reason)] += count
    report.dropped_rows += load_report.skipped_rows
    check_bad_share("training rows", load_report.skipped, report.rows_read, config.max_bad_share, report.dropped_rows)
    owned = [example for example in examples if shard.owns(row_key(example))]
    corpus = read_corpus(corpus_path, report) if corpus_path is not None else None
    if corpus is not None:
        corpus_dropped = report.dropped_rows[load_report.skipped :]
        check_bad_share(
            "corpus lines", len(corpus_dropped), report.corpus_lines_read, config.max_bad_share, corpus_dropped
        )
    if corpus is None:
        # The corpus is every row's positive, owned or not: shards mine from the same pool.
        unique: dict[tuple, Input] = {}
        for example in examples:
            unique.setdefault(side_content(example.positive), example.positive)
        corpus = list(unique.values())
    cache = EmbeddingStore(cache_dir, model_id)
    mined, report = mine_hard_negatives(
        owned, embedder, config, corpus=corpus, judge=judge, cache=cache, report=report, ray=ray
    )
    report.rows_written = write_jsonl_atomic(out, (mined_row_to_dict(row, out.parent) for row in mined))
    manifest = Manifest(
        generated=len(owned) + sum(load_report.reasons.values()),
        kept=report.rows_written,
        rejected=dict(sorted(report.rejected.items())),
        prompt_version="",
        model=model_id,
        seed=config.seed,
        shards=[out.name],
        details={
            "kind": "hard_negative_mining",
            "input": str(train_path),
            "shard": str(shard),
            "judge": judge_id,
            "config": {**asdict(config), "window": list(config.window) if config.window else None},
            "corpus_size": len(corpus),
            **{k: v for k, v in asdict(report).items() if k not in ("rejected", "rows_read", "rows_written")},
        },
    )
    manifest.save(out.with_name(out.stem + ".manifest.json"))
    return out, manifest
