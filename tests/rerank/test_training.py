"""Reranker training through the one loop: the recipe end to end, and each loss fitting a batch of pairs."""

from __future__ import annotations

import random

import pytest
import torch

import unime
from tests.train.recipes import RECIPES, recipe_main
from unime.data.collator import RerankCollator
from unime.data.dataset import load_examples
from unime.data_synth.text_pairs import write_text_pairs
from unime.train.config import LossSettings
from unime.train.objective import RerankObjective


@pytest.fixture(scope="module")
def text_pairs(tmp_path_factory):
    return write_text_pairs(tmp_path_factory.mktemp("rerank-data"), train=64, held_out=16)


def test_collator_puts_each_positive_first_then_mined_then_random_documents(tiny_reranker, text_pairs):
    examples, _ = load_examples([text_pairs["train"]])
    collator = RerankCollator(tiny_reranker, examples, random_negatives=3, seed=1)
    batch = collator(examples[:4])
    assert batch.size == 4 and batch.num_negatives == 3
    assert batch.chunks["pairs"][0]["input_ids"].shape[0] == 16  # 4 queries x (1 positive + 3 random)
    again = collator(examples[:4])
    assert torch.equal(again.chunks["pairs"][0]["input_ids"], batch.chunks["pairs"][0]["input_ids"])  # seeded
    # No query is given its own positive as a random negative.
    rng_documents = [collator._random_documents(e, random.Random(0)) for e in examples[:8]]
    assert all(e.positive not in docs for e, docs in zip(examples[:8], rng_documents, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        LossSettings(name="rerank_sft"),
        LossSettings(name="rerank_contrastive", temperature=1.0),
        LossSettings(name="rerank_unified", rerank_weight="cl", rerank_direction="sft", temperature=1.0),
    ],
    ids=["sft", "contrastive", "unified-Wcl-Dsft"],
)
def test_each_loss_teaches_the_reranker_to_tell_positives_from_negatives_on_a_batch(text_pairs, loss):
    """Gradients reach the answer logits through the judge prompt: a fixed batch of pairs is learned, from
    chance to (nearly) every positive above every negative of its query. The random documents are drawn per
    data file and row, so the batch differs between runs; the margins are wide for that."""
    examples, _ = load_examples([text_pairs["train"]])
    reranker = unime.build_tiny("qwen2_vl", seed=0, kind="reranker")
    batch = RerankCollator(reranker, examples, random_negatives=3, seed=0)(examples[:6])
    objective = RerankObjective(loss)
    optimizer = torch.optim.AdamW(reranker.parameters(), lr=1e-3)
    features = batch.chunks["pairs"][0]

    def positive_wins() -> float:
        with torch.no_grad():
            logits = reranker(features).view(batch.size, -1, 2)  # [B, G, 2]
        log_odds = logits[..., 1] - logits[..., 0]
        return float((log_odds[:, :1] > log_odds[:, 1:]).float().mean())

    reranker.train()
    before = positive_wins()
    for _ in range(200):
        loss_value = objective({"pairs": reranker(features)}, batch)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
    assert before < 0.8
    assert positive_wins() >= 0.9


def test_reranker_recipe_trains_and_saves_a_loadable_reranker(text_pairs, tmp_path):
    main = recipe_main("train_reranker")
    final = main(
        [
            "--config",
            str(RECIPES / "configs" / "reranker_contrastive.yaml"),
            f"output_dir={tmp_path / 'run'}",
            f"data.train_files=[{text_pairs['train']}]",
            f"data.eval_files=[{text_pairs['held_out']}]",
            "data.num_negatives=0",
            "data.random_negatives=2",
            "optim.batch_size=4",
            "optim.max_steps=3",
            "eval_every=0",
            "log_with=[]",
        ]
    )
    reranker = unime.load(final)
    assert isinstance(reranker, unime.Reranker)
    assert reranker.predict([("a red circle", "a red circle on the left")]).shape == (1,)
