"""retrieve_then_rerank: the shortlist is the exact top-K, and the final order follows the rerank (or fused) score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unime.retrieve_rerank import retrieve_then_rerank, top_k


class LengthScorer:
    """Scores a pair by the document's length: a transparent reranker for checking the ordering logic."""

    def __init__(self):
        self.calls: list[list[tuple]] = []

    def predict(self, pairs, *, batch_size=32, show_progress_bar=None):
        self.calls.append(list(pairs))
        return np.array([float(len(document)) for _, document in pairs])


def test_top_k_matches_a_full_sort_and_breaks_ties_by_index():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    values, indices = top_k(scores, 3)
    assert indices.tolist() == [[3, 1, 2], [0, 1, 2]]
    assert values.tolist() == scores.gather(1, indices).tolist()


def test_reranking_reorders_only_the_shortlist():
    generator = torch.Generator().manual_seed(0)
    queries = ["q0", "q1"]
    documents = ["a" * n for n in (3, 1, 7, 2, 9, 5)]
    q = torch.nn.functional.normalize(torch.randn(2, 8, generator=generator), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    scorer = LengthScorer()
    results = retrieve_then_rerank(q, c, queries, documents, scorer, top_k_candidates=3)

    similarity = q @ c.T
    for i, result in enumerate(results):
        shortlist = set(similarity[i].argsort(descending=True)[:3].tolist())
        assert set(result.indices) == shortlist  # nothing outside the top 3 comes in
        assert result.indices == sorted(shortlist, key=lambda j: -len(documents[j]))
        assert result.scores == result.rerank_scores == [float(len(documents[j])) for j in result.indices]
        assert np.allclose(result.retrieval_scores, [float(similarity[i, j]) for j in result.indices])
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 6  # one batched call for every pair


def test_fusion_adds_the_weighted_rerank_score_to_the_retrieval_score():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    documents = ["xx", "xxxxxx", "x"]  # rerank scores 2, 6, 1
    fused = retrieve_then_rerank(q, c, ["q"], documents, LengthScorer(), top_k_candidates=3, fusion_weight=0.1)[0]
    expected = {0: 0.9 + 0.2, 1: 0.2 + 0.6, 2: 0.5 + 0.1}
    assert fused.indices == [0, 1, 2]
    assert np.allclose(fused.scores, [expected[j] for j in fused.indices])
    alone = retrieve_then_rerank(q, c, ["q"], documents, LengthScorer(), top_k_candidates=3)[0]
    assert alone.indices == [1, 0, 2]


class PairwiseScorer:
    """A reranker from a function of (query, document): to check `reranked_recall` against known answers."""

    def __init__(self, score):
        self.score = score

    def predict(self, pairs, *, batch_size=32, show_progress_bar=None):
        return np.array([self.score(query, document) for query, document in pairs], dtype=np.float64)


def test_reranked_recall_is_bounded_by_the_shortlist_and_reproduces_retrieval(tiny_embedders, tmp_path):
    from unime.data.dataset import load_examples
    from unime.data_synth.text_pairs import write_text_pairs
    from unime.train.evaluation import reranked_recall, retrieval_recall

    embedder = tiny_embedders("qwen2_vl")
    examples, _ = load_examples([write_text_pairs(tmp_path, train=1, held_out=24)["held_out"]])
    own_positive = {e.query.text: e.positive.text for e in examples}

    # An oracle that knows each query's positive puts it first whenever the shortlist holds it.
    oracle = PairwiseScorer(lambda query, document: float(own_positive[query["text"]] == document["text"]))
    result = reranked_recall(embedder, oracle, examples, top_k=5)
    assert result["recall@1"] == retrieval_recall(embedder, examples)["recall@1"]
    assert result["reranked_recall@1"] == pytest.approx(result["recall@5"])
    assert result["recall@5"] > result["recall@1"]

    # A reranker that scores with the embedder's own similarity leaves the retrieval order as it was.
    def cosine(query, document):
        vectors = embedder.encode([query, document], convert_to_tensor=True)
        return float(vectors[0] @ vectors[1])

    result = reranked_recall(embedder, PairwiseScorer(cosine), examples, top_k=5)
    assert result["reranked_recall@1"] == pytest.approx(result["recall@1"])
