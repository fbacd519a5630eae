"""The batched scorers against brute-force loops over every query and candidate."""

from __future__ import annotations

import numpy as np
import pytest

from unime.eval.scoring import candidate_list_ranks, corpus_ranks


def _brute_force_list_rank(query, candidates, candidate_list):
    positive = candidate_list[0]
    own = float(np.dot(query, candidates[positive]))
    rank = 1
    for other in candidate_list[1:]:
        if other != positive and float(np.dot(query, candidates[other])) >= own:
            rank += 1
    return rank


def test_candidate_list_ranks_match_a_loop_on_ragged_lists_with_repeats():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    candidates = rng.normal(size=(25, 16)).astype(np.float32)
    lists = [list(rng.integers(0, 25, size=rng.integers(1, 30))) for _ in range(40)]
    lists[0] = [3, 3, 3]  # the positive repeated: the same item, never a competitor
    ranks = candidate_list_ranks(queries, candidates, lists)
    expected = [_brute_force_list_rank(q, candidates, lst) for q, lst in zip(queries, lists, strict=True)]
    np.testing.assert_array_equal(ranks, expected)
    assert ranks[0] == 1


def test_a_different_candidate_with_an_equal_score_ranks_above_the_positive():
    queries = np.ones((1, 2), dtype=np.float32)
    candidates = np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32)  # all score 1 for the query
    assert candidate_list_ranks(queries, candidates, [[0, 1, 2]])[0] == 3


def test_corpus_ranks_match_a_loop_and_faiss_agrees_on_the_top():
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    corpus = rng.normal(size=(200, 8)).astype(np.float32)
    relevant = [sorted(rng.choice(200, size=rng.integers(1, 6), replace=False).tolist()) for _ in range(30)]
    ranks = corpus_ranks(queries, corpus, relevant)
    for query, entries, got in zip(queries, relevant, ranks, strict=True):
        scores = corpus @ query
        irrelevant = np.setdiff1d(np.arange(200), entries)
        expected = [1 + int(np.sum(scores[irrelevant] >= scores[entry])) for entry in entries]
        np.testing.assert_array_equal(got, expected)
    # faiss (forced by a threshold of 0) gives the same ranks inside its depth and inf beyond it.
    searched = corpus_ranks(queries, corpus, relevant, faiss_min_corpus=0, faiss_depth=20)
    for exact, approx in zip(ranks, searched, strict=True):
        inside = exact <= 20 - len(exact)  # deep enough that every relevant entry above it was searched too
        np.testing.assert_array_equal(approx[inside], exact[inside])
        assert np.all(np.isinf(approx[exact > 20]))


def test_scorers_reject_queries_without_candidates():
    with pytest.raises(ValueError, match="at least one candidate"):
        candidate_list_ranks(np.ones((1, 2)), np.ones((1, 2)), [[]])
    with pytest.raises(ValueError, match="at least one relevant"):
        corpus_ranks(np.ones((1, 2)), np.ones((3, 2)), [[]])


def test_positions_in_the_full_list_from_ranks_among_irrelevant_entries():
    from unime.eval.scoring import positions_in_list

    rng = np.random.default_rng(2)
    query = rng.normal(size=8).astype(np.float32)
    corpus = rng.normal(size=(50, 8)).astype(np.float32)
    relevant = [4, 17, 30, 41]
    (ranks,) = corpus_ranks(query[None], corpus, [relevant])
    order = list(np.argsort(-(corpus @ query)))
    np.testing.assert_array_equal(positions_in_list(ranks), [1 + order.index(entry) for entry in relevant])
