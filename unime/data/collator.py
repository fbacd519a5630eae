"""Turn training examples into backbone inputs, through the embedder (so through the registry)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from unime.data.dataset import DataError
from unime.data.schema import Side, TrainExample
from unime.errors import InvalidInputError

Features = dict[str, torch.Tensor]


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
        rng = random.Random(f"{self.seed}-{examples[0].origin if examples else ''}")
        negatives: list[tuple[TrainExample, Side]] = []
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
        k = self.num_negatives
        if k == 0:
            return []
        available = len(example.negatives)
        if available == 0:
            raise DataError(f"{example.origin}: field 'negatives': empty, but the recipe uses {k} per query")
        if available >= k:
            return list(range(k)) if self.sample_negatives == "first" else sorted(rng.sample(range(available), k))
        return [i % available for i in range(k)]  # too few: reuse them in turn

    def _encode_group(self, sides: list[tuple[TrainExample, Side]], group: str) -> list[Features]:
        size = self.chunk_size or max(len(sides), 1)
        chunks = []
        for start in range(0, len(sides), size):
            part = sides[start : start + size]
            try:
                features = self.embedder.tokenize(
                    [side.as_input() for _, side in part], [side.instruction for _, side in part]
                )
            except InvalidInputError as err:
                example = part[err.index][0] if err.index is not None else part[0][0]
                raise DataError(f"{example.origin}: field '{group}': {err}") from err
            chunks.append(features)
        return chunks


def distill_text(example: TrainExample, side: Side) -> str:
    """The text a teacher embeds for a side; stage-1 distillation is text-only."""
    if side.text is None or side.image is not None:
        raise DataError(f"{example.origin}: text distillation needs text-only sides, got an image")
    return side.text
