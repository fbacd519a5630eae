"""Bad benchmark data: a clear error naming the dataset and row, or, when asked, skipped rows counted with why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unime.data.dataset import DataError
from unime.eval.compositional import load_compositional
from unime.eval.image_text_retrieval import load_retrieval
from unime.eval.mmeb import list_datasets, load_dataset, run_mmeb

GOOD = {
    "qry_text": "<|image_1|>\nWhat colour?",
    "qry_img_path": "a.png",
    "tgt_text": ["red", "blue"],
    "tgt_img_path": ["", ""],
}


@pytest.fixture
def root(tmp_path, scenes) -> Path:
    images, _ = scenes
    (tmp_path / "images").mkdir()
    images[0].save(tmp_path / "images" / "a.png")
    return tmp_path


def _write(root: Path, name: str, rows: list[dict]) -> None:
    (root / name).mkdir(exist_ok=True)
    (root / name / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**GOOD, "qry_img_path": "missing.png"}, "missing image: query image 'missing.png'"),
        ({**GOOD, "tgt_text": [], "tgt_img_path": []}, "query without candidates"),
        ({**GOOD, "tgt_text": ["", "blue"]}, "candidate list without its positive"),
        ({**GOOD, "tgt_img_path": [""]}, "candidate lists differ in length"),
        ({**GOOD, "qry_text": "<|image_1|>", "qry_img_path": ""}, "query has neither text nor image"),
        ({**GOOD, "tgt_img_path": ["", "nope.jpg"]}, "missing image: candidate 1 image 'nope.jpg'"),
    ],
)
def test_a_bad_row_is_named_with_its_dataset_and_row(root, row, message):
    _write(root, "Toy", [GOOD, row])
    with pytest.raises(DataError, match=r"dataset 'Toy', \S*/Toy/test.jsonl:2: " + message.replace("(", r"\(")):
        load_dataset(root, "Toy")


def test_skipping_bad_rows_counts_them_with_their_reasons(root, tiny_encoder):
    _write(root, "Toy", [GOOD, {**GOOD, "qry_img_path": "missing.png"}, {**GOOD, "tgt_text": ["", "x"]}, GOOD])
    dataset = load_dataset(root, "Toy", on_bad_rows="skip")
    assert len(dataset.lists) == 2
    assert dataset.skipped.count == 2
    assert dict(dataset.skipped.reasons) == {"missing image": 1, "candidate list without its positive": 1}
    result, _ = run_mmeb(tiny_encoder, root, on_bad_rows="skip", progress=False)
    assert result["datasets"][0]["skipped"]["count"] == 2
    assert result["datasets"][0]["queries"] == 2


def test_a_folder_in_the_wrong_layout_is_named(root):
    _write(root, "Wrong", [{"qry": "a question", "pos_text": "an answer"}])
    with pytest.raises(DataError, match=r"Wrong.*not in the MMEB eval layout: missing column\(s\) \['qry_text'"):
        load_dataset(root, "Wrong")
    with pytest.raises(DataError, match="no dataset folders found"):
        list_datasets(root / "images")
    (root / "Broken").mkdir()
    (root / "Broken" / "test.jsonl").write_text('{"qry_text": "x"\n')
    with pytest.raises(DataError, match=r"Broken/test.jsonl:1: not valid JSON"):
        load_dataset(root, "Broken")


def test_retrieval_and_sugarcrepe_name_their_bad_rows(root):
    captions = root / "captions.json"
    captions.write_text(
        json.dumps([{"image": "images/a.png", "caption": ["x"]}, {"image": "images/b.png", "caption": "y"}])
    )
    with pytest.raises(
        DataError, match=r"dataset 'captions', \S*captions.json:2: missing image: row image 'images/b.png'"
    ):
        load_retrieval(captions)
    assert load_retrieval(captions, on_bad_rows="skip").skipped.count == 1
    folder = root / "sugar"
    folder.mkdir()
    (folder / "swap_att.json").write_text(
        json.dumps(
            {
                "7": {"filename": "a.png", "caption": "a red circle"},
                "8": {"filename": "a.png", "caption": "x", "negative_caption": "y"},
            }
        )
    )
    with pytest.raises(
        DataError, match=r"dataset 'sugar', \S*swap_att.json:1 \(id '7'\): row without a negative caption"
    ):
        load_compositional(folder, image_root=root / "images")
    data = load_compositional(folder, image_root=root / "images", on_bad_rows="skip")
    assert data.skipped.count == 1 and len(data.rows) == 1


def test_visdoc_names_bad_judgements_and_counts_unjudged_queries(tmp_path, scenes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unime.eval.visdoc import load_visdoc

    images, _ = scenes
    images[0].save(tmp_path / "p.png")
    pq.write_table(pa.Table.from_pylist([{"corpus-id": "p1", "image": "p.png"}]), tmp_path / "corpus.parquet")
    queries = [{"query-id": "q1", "query": "a circle"}, {"query-id": "q2", "query": "unjudged"}]
    pq.write_table(pa.Table.from_pylist(queries), tmp_path / "queries.parquet")
    qrels = [{"query-id": "q1", "corpus-id": "p1", "score": 1}, {"query-id": "q1", "corpus-id": "p9", "score": 1}]
    pq.write_table(pa.Table.from_pylist(qrels), tmp_path / "qrels.parquet")
    with pytest.raises(DataError, match=r"qrels.parquet:2: judgement of an unknown page: corpus-id 'p9'"):
        load_visdoc(tmp_path, image_dir=tmp_path / "img")
    data = load_visdoc(tmp_path, image_dir=tmp_path / "img", on_bad_rows="skip")
    assert len(data.queries) == 1
    assert dict(data.skipped.reasons) == {"judgement of an unknown page": 1, "query without a relevant page": 1}
    (tmp_path / "qrels.parquet").unlink()
    with pytest.raises(DataError, match="no 'qrels' table"):
        load_visdoc(tmp_path, image_dir=tmp_path / "img")


def test_retrieval_layouts_of_sharegpt4v_and_urban1k_are_read(root):
    sharegpt = root / "share.json"
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a red circle"}]
    sharegpt.write_text(json.dumps([{"id": "1", "image": "images/a.png", "conversations": turns}]))
    dataset = load_retrieval(sharegpt)
    assert dataset.captions == ["a red circle"] and dataset.images == [(root / "images" / "a.png").resolve()]
    urban = root / "Urban1k"
    (urban / "image").mkdir(parents=True)
    (urban / "caption").mkdir()
    (urban / "image" / "7.png").write_bytes((root / "images" / "a.png").read_bytes())
    (urban / "caption" / "7.txt").write_text("a long caption\n")
    (urban / "image" / "8.png").write_bytes((root / "images" / "a.png").read_bytes())
    with pytest.raises(
        DataError, match=r"dataset 'Urban1k', \S*/image/8.png: image without a caption: 8.txt is missing"
    ):
        load_retrieval(urban)
    assert load_retrieval(urban, on_bad_rows="skip").captions == ["a long caption"]


def test_a_corrupt_image_is_a_bad_row_named_with_its_dataset_and_line(root, tiny_encoder):
    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    _write(root, "Toy", [GOOD, {**GOOD, "qry_img_path": "broken.png"}, GOOD])
    with pytest.raises(
        DataError, match=r"dataset 'Toy', \S*/Toy/test.jsonl:2: unreadable image: query image 'broken.png'"
    ):
        load_dataset(root, "Toy")
    dataset = load_dataset(root, "Toy", on_bad_rows="skip")
    assert len(dataset.lists) == 2 and dict(dataset.skipped.reasons) == {"unreadable image": 1}
    assert dataset.skipped.examples[0].startswith(f"dataset 'Toy', {root / 'Toy' / 'test.jsonl'}:2: ")


def test_a_line_that_is_not_json_is_named_by_its_line_and_can_be_skipped(root):
    (root / "Toy").mkdir()
    (root / "Toy" / "test.jsonl").write_text(json.dumps(GOOD) + "\n\n" + '{"qry_text": \n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"dataset 'Toy', \S*/Toy/test.jsonl:3: not valid JSON"):
        load_dataset(root, "Toy")
    dataset = load_dataset(root, "Toy", on_bad_rows="skip")
    assert len(dataset.lists) == 2 and dict(dataset.skipped.reasons) == {"not valid JSON": 1}


def test_eval_command_exits_0_when_asked_to_skip_and_reports_the_rows(root, tmp_path, capsys):
    from unime.cli import main

    (root / "images" / "broken.png").write_bytes(b"not a png at all")
    _write(root, "Toy", [GOOD, {**GOOD, "qry_img_path": "broken.png"}, GOOD, {**GOOD, "tgt_text": ["", "x"]}])
    args = ["eval", "run", "--mmeb-root", str(root), "--out", str(tmp_path / "out"), "--no-plots", "--no-cache"]
    args.append("--no-progress")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"dataset 'Toy', {root / 'Toy' / 'test.jsonl'}:2: unreadable image: query image 'broken.png'" in error
    assert main([*args, "--on-bad-rows", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "MMEB Toy: 2 (unreadable image: 1, candidate list without its positive: 1)" in printed
    assert f"{root / 'Toy' / 'test.jsonl'}:2: unreadable image" in printed
    assert f"{root / 'Toy' / 'test.jsonl'}:4: candidate list without its positive" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"]["mmeb"]["datasets"][0]["skipped"]["count"] == 2
