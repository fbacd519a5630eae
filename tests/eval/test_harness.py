"""The MMEB harness on the synthetic benchmark: layout, cache reuse and resume, batch-size invariance, and the
same numbers as the naive way (every listed query and candidate encoded on its own)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.eval.conftest import CountingEncoder
from unime.data_synth.scenes import COLORS
from unime.eval.embedding import item_key
from unime.eval.mmeb import COLUMNS, MMEB_V1, leaderboard, list_datasets, load_dataset, run_mmeb
from unime.eval.synthetic import CATEGORIES, write_synthetic_benchmark
from unime.inputs import Input


def _scores(result):
    return {row["dataset"]: row["scores"] for row in result["datasets"]}


def test_synthetic_benchmark_is_written_in_the_mmeb_eval_layout(synthetic_root):
    assert list_datasets(synthetic_root) == sorted(CATEGORIES)
    for name in CATEGORIES:
        table = pq.read_table(synthetic_root / name / "test-00000.parquet")
        assert tuple(table.column_names) == COLUMNS
        rows = table.to_pylist()
        assert len(rows) == 6
        for row in rows:
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 2
            for path in [row["qry_img_path"], *row["tgt_img_path"]]:
                assert path == "" or (synthetic_root / "images" / path).is_file()
    color = pq.read_table(synthetic_root / "Synthetic-Color" / "test-00000.parquet").to_pylist()[0]
    assert sorted(color["tgt_text"]) == sorted(COLORS) and color["qry_text"].startswith("<|image_1|>")
    # Candidates repeat across queries, as MMEB's do.
    t2i = load_dataset(synthetic_root, "Synthetic-T2I")
    assert t2i.listed_candidates > len(t2i.candidates)
    # The same arguments reuse the written benchmark; the SugarCrepe negatives differ in one attribute's words.
    assert write_synthetic_benchmark(synthetic_root, seed=3, queries=6, candidates=5) == synthetic_root
    rows = json.loads((synthetic_root / "sugarcrepe" / "replace_color.json").read_text())
    for row in rows.values():
        changed = set(row["caption"].split()) ^ set(row["negative_caption"].split())
        assert changed and changed <= set(COLORS) | {"a", "an"}


def test_each_distinct_item_is_encoded_once_and_a_second_run_reuses_the_cache(tiny_encoder, synthetic_root, tmp_path):
    counting = CountingEncoder(tiny_encoder)
    first, stats = run_mmeb(counting, synthetic_root, cache_dir=tmp_path, progress=False)
    distinct = set()
    for name in list_datasets(synthetic_root):
        dataset = load_dataset(synthetic_root, name)
        distinct |= {item_key(item) for item in dataset.queries.items + dataset.candidates.items}
    assert sorted(counting.encoded) == sorted(distinct)  # every distinct item, each exactly once
    assert stats.encoded == len(distinct) < stats.listed
    again = CountingEncoder(tiny_encoder)
    second, stats = run_mmeb(again, synthetic_root, cache_dir=tmp_path, progress=False)
    assert again.encoded == [] and stats.encoded == 0
    assert _scores(second) == _scores(first)


def test_an_interrupted_run_resumes_where_it_stopped(tiny_encoder, synthetic_root, tmp_path):
    reference, _ = run_mmeb(tiny_encoder, synthetic_root, progress=False)
    failing = CountingEncoder(tiny_encoder, fail_after=70)
    with pytest.raises(KeyboardInterrupt):
        run_mmeb(failing, synthetic_root, cache_dir=tmp_path, batch_size=8, progress=False)
    assert 0 < len(failing.encoded) <= 70
    resumed = CountingEncoder(tiny_encoder)
    result, _ = run_mmeb(resumed, synthetic_root, cache_dir=tmp_path, batch_size=8, progress=False)
    assert not set(resumed.encoded) & set(failing.encoded)  # nothing embedded twice
    for name, scores in _scores(reference).items():
        assert _scores(result)[name] == pytest.approx(scores, abs=1e-9)


def test_results_do_not_depend_on_batch_size(tiny_encoder, synthetic_root):
    one, _ = run_mmeb(tiny_encoder, synthetic_root, batch_size=1, progress=False)
    many, _ = run_mmeb(tiny_encoder, synthetic_root, batch_size=7, progress=False)
    assert _scores(one) == _scores(many)


def test_scores_equal_the_naive_way(tiny_encoder, synthetic_root):
    """Every row's query and every listed candidate encoded on its own, the argmax taken per row (VLM2Vec)."""
    result, _ = run_mmeb(tiny_encoder, synthetic_root, progress=False)
    for name in ("Synthetic-VQA", "Synthetic-T2I", "Synthetic-Grounding"):
        dataset = load_dataset(synthetic_root, name)
        hits = []
        for query_row, candidate_list in zip(dataset.query_rows, dataset.lists, strict=True):
            query = tiny_encoder.encode([dataset.queries.items[query_row]])[0]
            candidates = tiny_encoder.encode([dataset.candidates.items[c] for c in candidate_list])
            hits.append(int(np.argmax(candidates @ query)) == 0)
        assert _scores(result)[name]["hit@1"] == pytest.approx(np.mean(hits))


def test_leaderboard_averages_per_meta_task_split_and_overall():
    rows = [
        {"category": "classification", "split": "IND", "scores": {"hit@1": 0.2}},
        {"category": "classification", "split": "OOD", "scores": {"hit@1": 0.4}},
        {"category": "vqa", "split": "OOD", "scores": {"hit@1": 0.9}},
    ]
    board = leaderboard(rows)
    assert board["classification"] == pytest.approx(0.3) and board["vqa"] == pytest.approx(0.9)
    assert board["retrieval"] is None and board["IND"] == pytest.approx(0.2)
    assert board["OOD"] == pytest.approx(0.65) and board["overall"] == pytest.approx(0.5)
    # MMEB-V1's table: 36 datasets, 20 in-distribution, 10/10/12/4 per meta-task.
    assert len(MMEB_V1) == 36 and sum(split == "IND" for _, split in MMEB_V1.values()) == 20
    assert [sum(c == k for c, _ in MMEB_V1.values()) for k in ("classification", "vqa", "retrieval", "grounding")] == [
        10,
        10,
        12,
        4,
    ]


def test_items_are_keyed_by_content_not_by_path(tmp_path, synthetic_root):
    image = next((synthetic_root / "images").iterdir())
    copy = tmp_path / "copy.png"
    copy.write_bytes(image.read_bytes())
    assert item_key(Input(image=image)) == item_key(Input(image=copy))
    assert item_key(Input(image=image)) != item_key(Input(image=image, role="query"))


def test_visdoc_scores_match_a_full_sort_of_the_corpus(tiny_encoder, synthetic_root, tmp_path):
    import math

    from unime.eval.visdoc import load_visdoc, run_visdoc

    result, _ = run_visdoc(tiny_encoder, synthetic_root / "visdoc", progress=False)
    dataset = load_visdoc(synthetic_root / "visdoc", image_dir=tmp_path)
    pages = tiny_encoder.encode(dataset.pages)
    ndcgs, hits = [], []
    for query, judged in zip(tiny_encoder.encode(dataset.queries), dataset.relevant, strict=True):
        order = list(np.argsort(-(pages @ query), kind="stable"))
        dcg = sum(gain / math.log2(order.index(page) + 2) for page, gain in judged.items() if order.index(page) < 5)
        ideal = sum(gain / math.log2(i + 2) for i, gain in enumerate(sorted(judged.values(), reverse=True)[:5]))
        ndcgs.append(dcg / ideal)
        hits.append(order[0] in judged)
    assert result["scores"]["ndcg_linear@5"] == pytest.approx(np.mean(ndcgs))
    assert result["scores"]["hit@1"] == pytest.approx(np.mean(hits))
    assert result["queries"] == 6 and result["pages"] == 12
