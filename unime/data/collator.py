"""Turn training examples into backbone inputs, through the embedder (so through the registry)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unime.data.dataset import DataError
from unime.data.schema import TrainExample
from unime.errors import InvalidInputError
from unime.inputs import Input

Features = dict[str, torch.Tensor]


def batch_key(examples: Sequence[TrainExample]) -> str:
    """What a batch's random draws are seeded with: its first row's file name and row number.

    The file's folder is left out, so the same data copied elsewhere (another run directory, a test's temporary
    folder) draws the same negatives.
    """
    return Path(examples[0].origin).name if examples else ""


@dataclass
class TrainBatch:
    """A batch of examples as named groups of feature chunks (DESIGN.md, contract 4).

    `chunks["negatives"]` holds B * K inputs, example-major: example i's negatives are rows i*K .. i*K+K-1.
    Each group is cut into chunks of at most `chunk_size` inputs (GradCache encodes chunk by chunk; without
    it there is one chunk per group).
    """

    chunks: dict[str, list[Features]]
    size: int
    num_negatives: int
    scores: torch.Tensor | None = None
    """`[B, 1 + K]` teacher/judge scores of [positive, *negatives], when every example carries them."""
    sources: list[str] = field(default_factory=list)
    teacher: dict[str, torch.Tensor] | None = None
    """Teacher embeddings `[B, Dt]` of the query and positive texts (stage-1 distillation), from the cache."""


class EmbeddingCollator:
    """Builds `TrainBatch`es: renders every side with its instruction and tokenizes it with the embedder.

    Args:
        embedder: supplies `tokenize` (the model's processor and prompt template).
        num_negatives: mined negatives per query (K). Examples with more are sampled down (the first K, the
            hardest, when `sample_negatives="first"`; a seeded random K otherwise); with fewer, their negatives
            are reused in turn.
        chunk_size: inputs per chunk for GradCache; None for one chunk per group.
        seed: for random negative sampling (the collator's RNG is reseeded per batch from it and the batch's
            origins, so a resumed run draws the same negatives).
        teacher_cache: a filled `TeacherCache`: batches then carry the teacher embeddings of their query and
            positive texts (text-only rows).
    """

    def __init__(
        self,
        embedder,
        *,
        num_negatives: int = 0,
        chunk_size: int | None = None,
        sample_negatives: str = "first",
        seed: int = 0,
        teacher_cache=None,
    ):
        if sample_negatives not in ("first", "random"):
            raise ValueError(f"sample_negatives must be 'first' or 'random', got {sample_negatives!r}")
        self.embedder = embedder
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size
        self.sample_negatives = sample_negatives
        self.seed = seed
        self.teacher_cache = teacher_cache

    def __call__(self, examples: Sequence[TrainExample]) -> TrainBatch:
        rng = random.Random(f"{self.seed}-{batch_key(examples)}")
        negatives: list[tuple[TrainExample, Input]] = []
        picked_scores: list[list[float]] = []
        for example in examples:
            chosen = self._pick_negatives(example, rng)
            negatives.extend((example, example.negatives[i]) for i in chosen)
            if example.scores is not None:
                picked_scores.append([example.scores[0]] + [example.scores[1 + i] for i in chosen])
        chunks = {
            "query": self._encode_group([(e, e.query) for e in examples], "query"),
            "positive": self._encode_group([(e, e.positive) for e in examples], "positive"),
        }
        if self.num_negatives:
            chunks["negatives"] = self._encode_group(negatives, "negatives")
        all_scored = len(picked_scores) == len(examples)
        teacher = None
        if self.teacher_cache is not None:
            teacher = {
                "query": self.teacher_cache.lookup([distill_text(e, e.query) for e in examples]),
                "positive": self.teacher_cache.lookup([distill_text(e, e.positive) for e in examples]),
            }
        return TrainBatch(
            chunks=chunks,
            size=len(examples),
            num_negatives=self.num_negatives,
            scores=torch.tensor(picked_scores, dtype=torch.float32) if all_scored and picked_scores else None,
            sources=[e.source for e in examples],
            teacher=teacher,
        )

    def _pick_negatives(self, example: TrainExample, rng: random.Random) -> list[int]:
        return pick_negatives(example, self.num_negatives, self.sample_negatives, rng)

    def _encode_group(self, sides: list[tuple[TrainExample, Input]], group: str) -> list[Features]:
        size = self.chunk_size or max(len(sides), 1)
        chunks = []
        for start in range(0, len(sides), size):
            part = sides[start : start + size]
            try:
                features = self.embedder.tokenize([side for _, side in part], [side.instruction for _, side in part])
            except InvalidInputError as err:
                example = part[err.index][0] if err.index is not None else part[0][0]
                raise DataError(f"{example.origin}: field '{group}': {err}") from err
            chunks.append(features)
        return chunks


def pick_negatives(example: TrainExample, k: int, sample_negatives: str, rng: random.Random) -> list[int]:
    """Which of a row's mined negatives a batch uses: the first k (the hardest, as mined) or a seeded random k;
    a row with fewer than k reuses its negatives in turn."""
    if k == 0:
        return []
    available = len(example.negatives)
    if available == 0:
        raise DataError(f"{example.origin}: field 'negatives': empty, but the recipe uses {k} per query")
    if available >= k:
        return list(range(k)) if sample_negatives == "first" else sorted(rng.sample(range(available), k))
    return [i % available for i in range(k)]  # too few: reuse them in turn


def distill_text(example: TrainExample, side: Input) -> str:
    """The text a teacher embeds for a side; stage-1 distillation is text-only."""
    if side.text is None or side.image is not None:
        raise DataError(f"{example.origin}: text distillation needs text-only sides, got an image")
    return side.text


class RerankCollator:
    """Builds reranker `TrainBatch`es: each query paired with its positive, mined negatives and random documents.

    `chunks["pairs"]` holds B * G pairs, example-major: example i's pairs are rows i*G .. i*G+G-1, its positive
    first, then `num_negatives` mined negatives (as `EmbeddingCollator` picks them), then `random_negatives`
    documents drawn from other examples' positives (the reranking paper trains on 16 negatives, half mined and
    half random). A pair's instruction is its query's.

    Args:
        reranker: supplies `tokenize` for (query, document) pairs.
        examples: the training set, whose positives are the pool of random negatives.
        num_negatives, sample_negatives, seed, chunk_size: as in `EmbeddingCollator`.
        random_negatives: random documents per query.
    """

    def __init__(
        self,
        reranker,
        examples: Sequence[TrainExample],
        *,
        num_negatives: int = 0,
        random_negatives: int = 0,
        chunk_size: int | None = None,
        sample_negatives: str = "first",
        seed: int = 0,
    ):
        if num_negatives + random_negatives < 1:
            raise DataError(
                "a reranker trains on at least one negative per query (data.num_negatives or data.random_negatives)"
            )
        self.reranker = reranker
        self.pool = [example.positive for example in examples]
        if random_negatives and len(set(self.pool)) < 2:
            raise DataError("random negatives need at least two distinct positives in the training data")
        if sample_negatives not in ("first", "random"):
            raise ValueError(f"sample_negatives must be 'first' or 'random', got {sample_negatives!r}")
        self.num_negatives = num_negatives
        self.sample_negatives = sample_negatives
        self.random_negatives = random_negatives
        self.chunk_size = chunk_size
        self.seed = seed

    @property
    def group_size(self) -> int:
        return 1 + self.num_negatives + self.random_negatives

    def __call__(self, examples: Sequence[TrainExample]) -> TrainBatch:
        rng = random.Random(f"{self.seed}-rerank-{batch_key(examples)}")
        pairs: list[tuple[TrainExample, Input]] = []
        for example in examples:
            documents = [example.positive]
            mined = pick_negatives(example, self.num_negatives, self.sample_negatives, rng)
            documents += [example.negatives[i] for i in mined]
            documents += self._random_documents(example, rng)
            pairs.extend((example, document) for document in documents)
        return TrainBatch(
            chunks={"pairs": self._encode_pairs(pairs)},
            size=len(examples),
            num_negatives=self.group_size - 1,
            sources=[e.source for e in examples],
        )

    def _random_documents(self, example: TrainExample, rng: random.Random) -> list[Input]:
        chosen: list[Input] = []
        while len(chosen) < self.random_negatives:
            document = self.pool[rng.randrange(len(self.pool))]
            if document != example.positive:  # a random draw of the query's own positive is no negative
                chosen.append(document)
        return chosen

    def _encode_pairs(self, pairs: list[tuple[TrainExample, Input]]) -> list[Features]:
        size = self.chunk_size or max(len(pairs), 1)
        chunks = []
        for start in range(0, len(pairs), size):
            part = pairs[start : start + size]
            try:
                features = self.reranker.tokenize(
                    [(example.query, document) for example, document in part],
                    [example.query.instruction for example, _ in part],
                )
            except InvalidInputError as err:
                example = part[err.index][0] if err.index is not None else part[0][0]
                raise DataError(f"{example.origin}: a (query, document) pair: {err}") from err
            chunks.append(features)
        return chunks
