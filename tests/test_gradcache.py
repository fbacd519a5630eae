"""GradCache gives the full-batch loss and gradients, with chunked encoding, dropout included.

The model is the tiny Qwen2-VL embedder in train mode, trained on an InfoNCE of captions (queries) against
their drawn scenes (positives), 8 pairs, encoded in chunks of 3 (3 + 3 + 2: the last chunk is uneven).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from unime.data_synth.scenes import describe, draw_scene, random_scene
from unime.inputs import parse_inputs
from unime.train import gradcache
from unime.train.gradcache import RandContext, encode_with_grad_cache, encode_without_cache, split_into_chunks

PAIRS = 8
CHUNK = 3
TEMPERATURE = 0.05
# Gradients agree to float32 rounding; the tolerance is relative to the largest gradient entry.
RELATIVE_ATOL = 1e-5


def info_nce(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """In-batch InfoNCE: query i's positive is candidate i; every other positive is a negative."""
    logits = embeddings["query"] @ embeddings["positive"].T / TEMPERATURE  # [B, B]
    labels = torch.arange(logits.shape[0], device=logits.device)  # [B]
    return F.cross_entropy(logits, labels)


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list]:
    """Eight captions and the scenes they describe."""
    rng = random.Random(11)
    scenes = [random_scene(rng) for _ in range(PAIRS)]
    return [describe(scene) for scene in scenes], [draw_scene(scene) for scene in scenes]


def make_embedder(tiny_embedders, *, lora: bool, dropout: float = 0.0):
    """A private copy of the tiny embedder in train mode: full parameters, or a LoRA adapter on the decoder."""
    embedder = copy.deepcopy(tiny_embedders("qwen2_vl"))
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=embedder.spec.lora_target_modules,
            init_lora_weights=False,
        )
        # init_lora_weights=False: random B as well as A, so the adapter changes the output from the start and
        # every LoRA weight gets a non-zero gradient.
        embedder.model = get_peft_model(embedder.model, config)
    if dropout:
        # Attention dropout in the decoder and the vision tower, read from these attributes at each forward.
        attention = [module for module in embedder.modules() if hasattr(module, "attention_dropout")]
        assert attention, "the tiny model's attention modules no longer expose attention_dropout"
        for module in attention:
            module.attention_dropout = dropout
    return embedder.train()


def chunked_features(embedder, pairs, chunk_size: int | None) -> dict[str, list[dict[str, torch.Tensor]]]:
    captions, images = pairs
    return {
        "query": [embedder.tokenize(parse_inputs(chunk)) for chunk in split_into_chunks(captions, chunk_size)],
        "positive": [embedder.tokenize(parse_inputs(chunk)) for chunk in split_into_chunks(images, chunk_size)],
    }


def train_step(embedder, chunks, step: Callable, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + loss + backward from a fixed RNG state; the loss and a copy of every parameter gradient."""
    embedder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = step(embedder.embed, chunks, info_nce)
    grads = {name: param.grad.clone() for name, param in embedder.named_parameters() if param.grad is not None}
    return loss, grads


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(grad.abs().max()) for grad in a.values())
    assert scale > 0
    return max(float((a[name] - b[name]).abs().max()) for name in a) / scale


@pytest.mark.parametrize("lora", [False, True], ids=["full-params", "lora"])
def test_grad_cache_matches_the_full_batch(tiny_embedders, pairs, lora):
    embedder = make_embedder(tiny_embedders, lora=lora)
    full_loss, full_grads = train_step(embedder, chunked_features(embedder, pairs, None), encode_without_cache)
    cached_chunks = chunked_features(embedder, pairs, CHUNK)
    assert [len(chunk["input_ids"]) for chunk in cached_chunks["query"]] == [3, 3, 2]
    cached_loss, cached_grads = train_step(embedder, cached_chunks, encode_with_grad_cache)

    torch.testing.assert_close(cached_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert not cached_loss.requires_grad
    # Every trainable weight but the LM head (an embedder does not use it) is reached: the comparison covers them.
    trainable = {name for name, param in embedder.named_parameters() if param.requires_grad and "lm_head" not in name}
    assert full_grads.keys() == trainable
    if lora:
        assert all("lora_" in name for name in trainable)
    assert max_relative_difference(full_grads, cached_grads) < RELATIVE_ATOL


def test_grad_cache_replays_dropout_and_fails_without_it(tiny_embedders, pairs, monkeypatch):
    embedder = make_embedder(tiny_embedders, lora=True, dropout=0.1)
    chunks = chunked_features(embedder, pairs, CHUNK)

    # Dropout is live: two seeds give two losses.
    other_loss, _ = train_step(embedder, chunks, encode_without_cache, seed=1)
    plain_loss, plain_grads = train_step(embedder, chunks, encode_without_cache, seed=0)
    after_plain = torch.rand(4)
    assert abs(float(other_loss) - float(plain_loss)) > 1e-4

    # Same chunks, same seed: the plain path and GradCache draw the same masks, so the same loss and gradients.
    cached_loss, cached_grads = train_step(embedder, chunks, encode_with_grad_cache, seed=0)
    after_cached = torch.rand(4)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert max_relative_difference(plain_grads, cached_grads) < RELATIVE_ATOL
    # Replays are forked: the caller's random stream ends where the plain path leaves it.
    torch.testing.assert_close(after_cached, after_plain)

    # Without the RNG replay, the second pass draws fresh masks: the gradients belong to another network.
    monkeypatch.setattr(gradcache, "RandContext", contextlib.nullcontext)
    unreplayed_loss, unreplayed_grads = train_step(embedder, chunks, encode_with_grad_cache, seed=0)
    torch.testing.assert_close(unreplayed_loss, plain_loss, rtol=1e-5, atol=1e-6)  # the first pass is the same
    assert max_relative_difference(plain_grads, unreplayed_grads) > 100 * RELATIVE_ATOL


class CallLog:
    """Records backward calls and no_sync entries, and whether each backward ran inside no_sync."""

    def __init__(self) -> None:
        self.no_sync_entries = 0
        self.inside_no_sync = False
        self.backward_inside: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self):
        self.no_sync_entries += 1
        self.inside_no_sync = True
        try:
            yield
        finally:
            self.inside_no_sync = False

    def backward(self, loss: torch.Tensor) -> None:
        self.backward_inside.append(self.inside_no_sync)
        loss.backward()


def linear_setup(chunk_sizes: dict[str, list[int]], seed: int = 0):
    """A linear encoder over random features: enough to count calls, and fast."""
    torch.manual_seed(seed)
    encoder = torch.nn.Linear(6, 4)
    chunks = {
        group: [{"x": torch.randn(size, 6)} for size in sizes]  # [n, 6]
        for group, sizes in chunk_sizes.items()
    }

    def encode(features: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(encoder(features["x"]), dim=-1)  # [n, 4]

    return encoder, chunks, encode


def test_no_sync_wraps_all_backward_passes_but_the_last():
    sizes = {"query": [3, 3, 2], "positive": [3, 3, 2], "negatives": [4, 4]}
    encoder, chunks, encode = linear_setup(sizes)

    def loss_fn(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        candidates = torch.cat([embeddings["positive"], embeddings["negatives"]])  # [B + N, D]
        logits = embeddings["query"] @ candidates.T / TEMPERATURE  # [B, B + N]
        return F.cross_entropy(logits, torch.arange(logits.shape[0]))

    log = CallLog()
    loss = encode_with_grad_cache(encode, chunks, loss_fn, backward=log.backward, no_sync=log.no_sync)
    number_of_chunks = 8
    assert len(log.backward_inside) == number_of_chunks
    assert log.no_sync_entries == number_of_chunks - 1
    assert log.backward_inside == [True] * (number_of_chunks - 1) + [False]
    assert not loss.requires_grad

    cached_grad = encoder.weight.grad.clone()
    encoder.zero_grad()
    encode_without_cache(encode, chunks, loss_fn)
    torch.testing.assert_close(cached_grad, encoder.weight.grad, rtol=1e-5, atol=1e-6)


def test_backward_runs_once_per_chunk_without_no_sync_and_for_groups_the_loss_ignores():
    encoder, chunks, encode = linear_setup({"query": [2, 2], "positive": [2, 2], "unused": [3]})
    log = CallLog()
    encode_with_grad_cache(encode, chunks, info_nce, backward=log.backward)
    assert log.backward_inside == [False] * 5  # no no_sync given: every backward syncs
    assert log.no_sync_entries == 0
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_rand_context_replays_and_leaves_the_outer_stream_alone():
    torch.manual_seed(5)
    context = RandContext()
    first = torch.rand(5)
    following = torch.rand(5)

    torch.manual_seed(5)
    context = RandContext()
    assert torch.equal(torch.rand(5), first)
    with context:
        assert torch.equal(torch.rand(5), first)  # replayed
        torch.rand(100)  # consumed inside the fork: invisible outside
    assert torch.equal(torch.rand(5), following)
    with context:  # a snapshot can be replayed again
        assert torch.equal(torch.rand(5), first)


def test_split_into_chunks():
    assert split_into_chunks(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert split_into_chunks(list(range(8)), 8) == [list(range(8))]
    assert split_into_chunks(list(range(8)), 100) == [list(range(8))]
    assert split_into_chunks("abc", None) == [["a", "b", "c"]]
    assert split_into_chunks([], 3) == []
    assert split_into_chunks([], None) == []
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            split_into_chunks([1, 2], bad)


def test_bad_arguments_are_named():
    _, chunks, encode = linear_setup({"query": [2], "positive": [2]})
    with pytest.raises(ValueError, match="scalar"):
        encode_with_grad_cache(encode, chunks, lambda embeddings: embeddings["query"].sum(dim=1))
    with pytest.raises(ValueError, match="scalar"):
        encode_without_cache(encode, chunks, lambda embeddings: embeddings["query"].sum(dim=1))
    with pytest.raises(ValueError, match="'positive'"):
        encode_with_grad_cache(encode, {"query": chunks["query"], "positive": []}, info_nce)
    with pytest.raises(ValueError, match="non-empty mapping"):
        encode_with_grad_cache(encode, {}, info_nce)
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        encode_with_grad_cache(lambda features: features["x"].sum(), chunks, info_nce)


def test_non_deterministic_shapes_are_reported():
    _, chunks, encode = linear_setup({"query": [2], "positive": [2]})
    calls = []

    def flaky(features: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        embeddings = encode(features)  # [n, D]
        return embeddings if len(calls) <= 2 else embeddings[:1]

    with pytest.raises(RuntimeError, match="deterministic"):
        encode_with_grad_cache(flaky, chunks, info_nce)
