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
from unime.train.config import LossSettings, load_train_config
from unime.train.evaluation import reranking_metrics
from unime.train.model import load_for_training
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


def test_the_same_data_at_another_path_draws_the_same_negatives(text_pairs, tmp_path):
    copy = tmp_path / "elsewhere" / text_pairs["train"].name
    copy.parent.mkdir()
    copy.write_bytes(text_pairs["train"].read_bytes())
    reranker = unime.build_tiny("qwen2_vl", seed=0, kind="reranker")
    batches = []
    for path in (text_pairs["train"], copy):
        examples, _ = load_examples([path])
        batches.append(RerankCollator(reranker, examples, random_negatives=3, seed=0)(examples[:4]))
    first, second = (batch.chunks["pairs"][0]["input_ids"] for batch in batches)
    assert torch.equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["reranker_sft.yaml", "reranker_contrastive.yaml"])
def test_each_recipe_lifts_held_out_reranking_far_above_random(config, stage1_run, stage1_text_pairs, tmp_path):
    """The shipped SFT and CL recipes, from the stage-1 model as configured, on the paraphrase corpus: held-out
    queries rank their positive among 8 other held-out documents (shuffled). Measured at 300 steps, seed 0:
    MRR 0.31 (random order) -> SFT 0.57, CL 0.76; nDCG@10 0.48 -> 0.67 and 0.82."""
    stage1, _ = stage1_run
    overrides = [
        f"model.name_or_path={stage1}",
        f"data.train_files=[{stage1_text_pairs['train']}]",
        f"data.eval_files=[{stage1_text_pairs['held_out']}]",
    ]
    held_out, _ = load_examples([stage1_text_pairs["held_out"]])
    before = reranking_metrics(
        load_for_training(load_train_config(RECIPES / "configs" / config, overrides).model), held_out
    )
    final = recipe_main("train_reranker")(
        [
            "--config",
            str(RECIPES / "configs" / config),
            *overrides,
            f"output_dir={tmp_path / 'run'}",
            "optim.max_steps=300",
            "eval_every=0",
            "save_every=0",
            "log_with=[]",
        ]
    )
    after = reranking_metrics(unime.load(final), held_out)
    assert after["mrr"] >= after["random_mrr"] + 0.15, (before, after)
    assert after["mrr"] >= before["mrr"] + 0.15, (before, after)
    assert after["ndcg@10"] >= before["ndcg@10"] + 0.1, (before, after)


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
            "model.name_or_path=tiny:qwen2_vl",
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
