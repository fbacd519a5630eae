"""The reranker's score, its CrossEncoder-shaped API, saving, and the sentence-transformers round trip."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import unime
from unime.errors import InvalidInputError, ModelLoadError
from unime.inputs import parse_input


def test_score_is_the_yes_probability_of_the_full_lm_logits_at_the_last_position(tiny_reranker, mixed_pairs):
    scores = tiny_reranker.predict(mixed_pairs, batch_size=8)
    for index, (query, document) in enumerate(mixed_pairs):
        pair = (parse_input(0, query), parse_input(0, document))
        features = tiny_reranker.tokenize([pair])
        with torch.inference_mode():
            logits = tiny_reranker.hf_model(**features).logits[0, -1]  # [vocab], one unpadded sequence
        z_no, z_yes = float(logits[tiny_reranker.no_token_id]), float(logits[tiny_reranker.yes_token_id])
        expected = np.exp(z_yes) / (np.exp(z_yes) + np.exp(z_no))
        assert scores[index] == pytest.approx(expected, abs=1e-6)
    log_odds = tiny_reranker.predict(mixed_pairs, apply_softmax=False)
    assert np.allclose(1 / (1 + np.exp(-log_odds)), scores, atol=1e-6)


def test_scores_do_not_depend_on_batch_size_or_order(tiny_reranker, mixed_pairs):
    one = tiny_reranker.predict(mixed_pairs, batch_size=1)
    all_at_once = tiny_reranker.predict(mixed_pairs, batch_size=len(mixed_pairs))
    reversed_scores = tiny_reranker.predict(mixed_pairs[::-1], batch_size=4)[::-1]
    assert np.allclose(one, all_at_once, atol=1e-6)
    assert np.allclose(one, reversed_scores, atol=1e-6)


def test_the_instruction_enters_the_prompt(tiny_reranker, mixed_pairs):
    default = tiny_reranker.predict(mixed_pairs[:2])
    instructed = tiny_reranker.predict(mixed_pairs[:2], instruction="Find the caption of the image.")
    assert not np.allclose(default, instructed)
    prompt = tiny_reranker._renderer.render_pair(
        parse_input(0, "q"), parse_input(0, "d"), "Find the caption of the image."
    )
    assert "<Instruct>: Find the caption of the image.\n<Query>:q\n<Document>:d" in prompt


def test_rank_orders_documents_like_cross_encoder_rank(tiny_reranker, scenes):
    images, captions = scenes
    documents = captions[:4] + [images[0]]
    scores = tiny_reranker.predict([(captions[0], d) for d in documents])
    ranked = tiny_reranker.rank(captions[0], documents, top_k=3, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable")[:3])
    assert [r["score"] for r in ranked] == pytest.approx(sorted(scores, reverse=True)[:3])
    assert all(r["text"] is documents[r["corpus_id"]] for r in ranked)
    assert "text" not in tiny_reranker.rank(captions[0], documents)[0]


def test_a_single_pair_gives_a_single_score(tiny_reranker):
    single = tiny_reranker.predict(("a red circle", "a blue square"))
    assert isinstance(single, float)
    assert single == pytest.approx(float(tiny_reranker.predict([("a red circle", "a blue square")])[0]))


def test_saved_reranker_loads_with_the_same_scores(tiny_reranker, tiny_reranker_dir, mixed_pairs):
    loaded = unime.load(tiny_reranker_dir)
    assert isinstance(loaded, unime.Reranker)
    assert np.allclose(loaded.predict(mixed_pairs), tiny_reranker.predict(mixed_pairs), atol=1e-6)


def test_cross_encoder_round_trip_gives_the_same_scores(tiny_reranker, tiny_reranker_dir, mixed_pairs, scenes):
    from sentence_transformers import CrossEncoder

    cross_encoder = CrossEncoder(str(tiny_reranker_dir))
    ours = tiny_reranker.predict(mixed_pairs)
    theirs = cross_encoder.predict(mixed_pairs)
    assert np.abs(ours - theirs).max() < 1e-5
    # sentence-transformers sends a prompt as a system message: the template reads it as the instruction.
    instruction = "Find the caption of the image."
    assert np.allclose(
        cross_encoder.predict(mixed_pairs, prompt=instruction),
        tiny_reranker.predict(mixed_pairs, instruction=instruction),
        atol=1e-5,
    )
    images, captions = scenes
    documents = [captions[0], images[1], captions[2]]
    assert [r["corpus_id"] for r in cross_encoder.rank(captions[0], documents)] == [
        r["corpus_id"] for r in tiny_reranker.rank(captions[0], documents)
    ]


def test_bad_pairs_are_named_by_index_and_side(tiny_reranker):
    with pytest.raises(InvalidInputError, match=r"input 1: expected a \(query, document\) pair"):
        tiny_reranker.predict([("q", "d"), ("only one",)])
    with pytest.raises(InvalidInputError, match="input 0: document: .*missing.png"):
        tiny_reranker.predict([("q", "missing.png")])
    with pytest.raises(InvalidInputError, match="input 1: query: "):
        tiny_reranker.predict([("q", "d"), ({"text": 3}, "d")])
    with pytest.raises(InvalidInputError, match="documents: expected a list"):
        tiny_reranker.rank("q", "not a list")


def test_an_answer_word_that_is_several_tokens_is_refused(tiny_embedders):
    base = tiny_embedders("qwen2_vl")
    # The tiny embedder's BPE vocabulary has no single token for "no" (the tiny reranker adds one).
    config = unime.UnimeConfig(backbone="qwen2_vl", kind="reranker")
    with pytest.raises(ModelLoadError, match="rerank.no_token: 'no' is 2 tokens"):
        unime.Reranker(base.model, copy.deepcopy(base.processor), config)


def test_an_embedder_directory_starts_a_reranker_with_its_weights(tiny_embedders, tmp_path, mixed_pairs):
    embedder = tiny_embedders("qwen2_vl")
    embedder.save(tmp_path / "embedder")
    reranker = unime.load(tmp_path / "embedder", kind="reranker")
    assert isinstance(reranker, unime.Reranker)
    tokenizer = reranker.processor.tokenizer
    assert len(tokenizer.encode("yes", add_special_tokens=False)) == 1
    # The embedder's weights carry over: every row the answer tokens did not add is unchanged.
    before = embedder.hf_model.get_input_embeddings().weight
    after = reranker.hf_model.get_input_embeddings().weight
    assert after.shape[0] == before.shape[0] + 2
    assert torch.equal(after[: before.shape[0]], before)
    # The converted reranker saves and reloads as a reranker with the same scores.
    reranker.save(tmp_path / "reranker")
    again = unime.load(tmp_path / "reranker")
    np.testing.assert_allclose(again.predict(mixed_pairs), reranker.predict(mixed_pairs), atol=1e-6)


def test_a_changed_judge_prompt_is_saved_and_used_by_every_consumer(tiny_reranker, tmp_path, mixed_pairs):
    from sentence_transformers import CrossEncoder

    reranker = unime.Reranker(
        tiny_reranker.model, copy.deepcopy(tiny_reranker.processor), copy.deepcopy(tiny_reranker.config)
    )
    reranker.set_rerank_prompt(system_prompt="Relevant?", default_instruction="match")
    prompt = reranker._renderer.render_pair(parse_input(0, "q"), parse_input(0, "d"), None)
    assert prompt.startswith("<|im_start|>user\nRelevant?\n<Instruct>: match\n<Query>:q\n<Document>:d")
    assert not np.allclose(reranker.predict(mixed_pairs), tiny_reranker.predict(mixed_pairs))
    reranker.save(tmp_path / "short")
    loaded = unime.load(tmp_path / "short")
    assert loaded.config.rerank.system_prompt == "Relevant?"
    assert np.allclose(loaded.predict(mixed_pairs), reranker.predict(mixed_pairs), atol=1e-6)
    assert np.allclose(
        CrossEncoder(str(tmp_path / "short")).predict(mixed_pairs), reranker.predict(mixed_pairs), atol=1e-5
    )
    with pytest.raises(ValueError, match="not \\['yes_token'\\]"):
        reranker.set_rerank_prompt(yes_token="ok")
