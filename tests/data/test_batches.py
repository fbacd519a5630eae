"""Batch sampling (order, same-source, resumption) and the collator (named groups, chunks, negatives, scores)."""

from __future__ import annotations

import pytest
import torch

from unime.data.collator import EmbeddingCollator
from unime.data.dataset import DataError
from unime.data.sampler import TrainBatchSampler
from unime.data.schema import TrainExample
from unime.inputs import Input


def test_sampler_is_seeded_full_and_covers_each_example_once_per_epoch() -> None:
    sampler = TrainBatchSampler(["a"] * 10, 3, seed=1)
    first = sampler.batches(0)
    assert first == TrainBatchSampler(["a"] * 10, 3, seed=1).batches(0)
    assert first != sampler.batches(1)
    assert all(len(batch) == 3 for batch in first) and len(first) == 3  # drop_last: 10 -> 3 full batches
    flat = [i for batch in first for i in batch]
    assert len(set(flat)) == 9


def test_same_source_batches_never_mix_sources() -> None:
    sources = ["a"] * 7 + ["b"] * 5 + ["c"] * 2
    sampler = TrainBatchSampler(sources, 2, seed=0, same_source=True)
    for epoch in range(3):
        for batch in sampler.batches(epoch):
            assert len({sources[i] for i in batch}) == 1
    mixed = TrainBatchSampler(sources, 4, seed=0).batches(0)
    assert any(len({sources[i] for i in batch}) > 1 for batch in mixed)


def test_resuming_inside_an_epoch_continues_with_the_next_batch() -> None:
    sampler = TrainBatchSampler(["a"] * 20, 4, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, skip_batches=3)
    assert list(sampler) == whole[3:] and len(sampler) == len(whole) - 3


def _example(i: int, negatives: int, scores: bool = False) -> TrainExample:
    return TrainExample(
        query=Input(text=f"query number {i}", instruction="Find it." if i % 2 else None),
        positive=Input(text=f"positive {i}"),
        negatives=tuple(Input(text=f"negative {i}.{j}") for j in range(negatives)),
        scores=tuple([1.0] + [0.1 * j for j in range(negatives)]) if scores else None,
        source="s",
        origin=f"file.jsonl:{i + 1}",
    )


def test_collator_builds_named_chunked_groups(tiny_embedders) -> None:
    embedder = tiny_embedders("qwen2_vl")
    examples = [_example(i, negatives=3, scores=True) for i in range(5)]
    batch = EmbeddingCollator(embedder, num_negatives=2, chunk_size=2)(examples)
    assert set(batch.chunks) == {"query", "positive", "negatives"}
    assert [c["input_ids"].shape[0] for c in batch.chunks["query"]] == [2, 2, 1]
    assert sum(c["input_ids"].shape[0] for c in batch.chunks["negatives"]) == 10  # B * K, example-major
    assert batch.size == 5 and batch.num_negatives == 2
    torch.testing.assert_close(batch.scores, torch.tensor([[1.0, 0.0, 0.1]] * 5))

    # The same inputs tokenized directly: the instruction of each row reaches its prompt.
    direct = embedder.tokenize([e.query for e in examples[:2]], [e.query.instruction for e in examples[:2]])
    torch.testing.assert_close(batch.chunks["query"][0]["input_ids"], direct["input_ids"])
    tokenizer = embedder.processor.tokenizer
    assert "Find it." not in tokenizer.decode(direct["input_ids"][0]) and "Find it." in tokenizer.decode(
        direct["input_ids"][1]
    )
    first_negatives = tokenizer.batch_decode(batch.chunks["negatives"][0]["input_ids"])
    assert "negative 0.0" in first_negatives[0] and "negative 0.1" in first_negatives[1]


def test_collator_reuses_too_few_negatives_and_samples_from_many(tiny_embedders) -> None:
    embedder = tiny_embedders("qwen2_vl")
    collator = EmbeddingCollator(embedder, num_negatives=3)
    assert collator._pick_negatives(_example(0, negatives=2), None) == [0, 1, 0]
    import random

    picked = EmbeddingCollator(embedder, num_negatives=2, sample_negatives="random")._pick_negatives(
        _example(0, negatives=6), random.Random(0)
    )
    assert len(set(picked)) == 2 and all(0 <= i < 6 for i in picked)
    with pytest.raises(DataError, match="file.jsonl:1: field 'negatives': empty, but the recipe uses 3"):
        collator([_example(0, negatives=0)])


def test_collator_names_the_row_of_an_image_that_fails_to_decode(tiny_embedders, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    example = TrainExample(Input(image=broken), Input(text="p"), origin="train.jsonl:7")
    with pytest.raises(DataError, match="train.jsonl:7: field 'query': input 0: image file .*broken.png"):
        EmbeddingCollator(tiny_embedders("qwen2_vl"))([example])
