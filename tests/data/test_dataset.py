"""Training files: the schema, validation with file/row/field errors, skip-and-report, parquet, MMEB conversion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unime.data.dataset import DataError, load_examples
from unime.data.mmeb import convert_mmeb_file


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture()
def image_dir(tmp_path: Path, scenes) -> Path:
    images, _ = scenes
    (tmp_path / "img").mkdir()
    images[0].save(tmp_path / "img" / "a.png")
    images[1].save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    return tmp_path


GOOD = {
    "query": {"image": "img/a.png", "instruction": "Find the caption."},
    "positive": {"text": "a red circle"},
    "negatives": [{"text": "a blue circle"}, {"image": "img/b.png"}],
    "scores": [0.9, 0.2, 0.1],
    "source": "shapes",
}


def test_a_valid_row_becomes_a_named_example(image_dir: Path) -> None:
    path = _write_jsonl(image_dir / "train.jsonl", [GOOD, {"query": {"text": "q"}, "positive": {"text": "p"}}])
    examples, report = load_examples([path])
    assert report.kept == 2 and report.skipped == 0
    first = examples[0]
    assert first.query.image == image_dir / "img" / "a.png"
    assert first.query.instruction == "Find the caption."
    assert first.positive.text == "a red circle"
    assert [n.text for n in first.negatives] == ["a blue circle", None]
    assert first.scores == (0.9, 0.2, 0.1)
    assert first.source == "shapes" and first.origin == f"{path}:1"
    assert examples[1].source == "default" and examples[1].negatives == ()


def test_image_root_overrides_the_file_folder(image_dir: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = _write_jsonl(elsewhere / "train.jsonl", [GOOD])
    with pytest.raises(DataError, match="does not exist"):
        load_examples([path])
    examples, _ = load_examples([path], image_root=image_dir)
    assert examples[0].query.image == image_dir / "img" / "a.png"


BAD_ROWS = [
    ({"positive": {"text": "p"}}, "field 'query' is missing"),
    ({"query": {"text": "q"}}, "field 'positive' is missing"),
    ({"query": {"text": "q"}, "positive": {"text": "p"}, "negatives": "n"}, "field 'negatives': expected a list"),
    (
        {"query": {"text": "q"}, "positive": {"text": "p"}, "negatives": [3]},
        r"field 'negatives\[0\]': expected an object",
    ),
    ({"query": {"text": " "}, "positive": {"text": "p"}}, "field 'query': has neither a text nor an image"),
    ({"query": {"text": "q", "img": "x"}, "positive": {"text": "p"}}, r"unknown field\(s\) \['img'\]"),
    ({"query": {"text": 5}, "positive": {"text": "p"}}, "field 'query'.text: expected a string, got int"),
    ({"query": {"text": "q"}, "positive": {"text": "p"}, "scores": [1.0, 2.0]}, "has 2 values, expected 1"),
    ({"query": {"text": "q"}, "positive": {"text": "p"}, "scores": ["x"]}, "expected a list of finite numbers"),
    ({"query": {"text": "q"}, "positive": {"text": "p"}, "extra": 1}, r"unknown field\(s\) \['extra'\]"),
    ({"query": {"image": "img/missing.png"}, "positive": {"text": "p"}}, "'query.image': image file .* does not exist"),
    ({"query": {"image": "img/broken.png"}, "positive": {"text": "p"}}, "'query.image': .* not a readable image"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"query": ', "not valid JSON"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_rows_name_the_file_row_and_field(image_dir: Path, row, message: str) -> None:
    path = _write_jsonl(image_dir / "train.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=rf"train.jsonl:2: .*{message}"):
        load_examples([path])


def test_skip_mode_keeps_good_rows_and_counts_bad_ones(image_dir: Path) -> None:
    rows = [GOOD] + [row for row, _ in BAD_ROWS] + [GOOD]
    path = _write_jsonl(image_dir / "train.jsonl", rows)
    examples, report = load_examples([path], on_error="skip")
    assert report.kept == len(examples) == 2
    assert report.skipped == len(BAD_ROWS)
    assert sum(report.reasons.values()) == len(BAD_ROWS)
    assert "skipped" in report.summary() and "field 'query' is missing" in report.summary()
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:{len(rows)}"]
    # Every skipped row by file and 1-based line, with its reason.
    assert [(row["file"], row["line"]) for row in report.skipped_rows] == [
        (str(path), line) for line in range(2, len(rows))
    ]
    for row, (_, message) in zip(report.skipped_rows, BAD_ROWS, strict=True):
        assert re.search(message, row["reason"]) and not row["reason"].startswith(str(path))


@pytest.mark.parametrize(
    ("layout", "name"), [("mmeb", "empty.jsonl"), ("mmeb", "empty.parquet"), ("sentences", "empty.txt")]
)
def test_converting_an_empty_file_is_an_error_naming_it(tmp_path: Path, capsys, layout: str, name: str) -> None:
    from unime.cli import main

    empty = tmp_path / name
    if name.endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list([{"qry": "x", "qry_image_path": "", "pos_text": "y", "pos_image_path": ""}]).select(
            []
        ).to_parquet(str(empty))
    else:
        empty.write_text("\n" if name.endswith(".txt") else "")
    out = tmp_path / "out.jsonl"
    assert main(["convert", layout, str(empty), str(out)]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not out.exists()


def test_rows_without_enough_negatives_are_bad_for_hard_negative_recipes(image_dir: Path) -> None:
    path = _write_jsonl(image_dir / "train.jsonl", [GOOD, {"query": {"text": "q"}, "positive": {"text": "p"}}])
    with pytest.raises(DataError, match="train.jsonl:2: field 'negatives': has 0, the recipe needs at least 1"):
        load_examples([path], min_negatives=1)


def test_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.jsonl: training file does not exist"):
        load_examples([tmp_path / "nothing.jsonl"])
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown training file type '.csv'"):
        load_examples([tmp_path / "rows.csv"])
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        load_examples([tmp_path / "bad.parquet"])
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"query": {"text": "q"}}])
    with pytest.raises(DataError, match="no valid training rows"):
        load_examples([only_bad], on_error="skip")


def test_parquet_files_read_like_jsonl(image_dir: Path) -> None:
    import datasets

    rows = [GOOD, {**GOOD, "source": "other"}]
    datasets.Dataset.from_list(rows).to_parquet(str(image_dir / "train.parquet"))
    from_parquet, _ = load_examples([image_dir / "train.parquet"])
    from_jsonl, _ = load_examples([_write_jsonl(image_dir / "train.jsonl", rows)])
    assert [(e.query, e.positive, e.negatives, e.scores, e.source) for e in from_parquet] == [
        (e.query, e.positive, e.negatives, e.scores, e.source) for e in from_jsonl
    ]
    assert from_parquet[1].origin.endswith("train.parquet:2")


def test_mmeb_train_rows_convert_into_the_schema(image_dir: Path) -> None:
    import datasets

    mmeb = [
        {
            "qry": "<|image_1|>\nRepresent the given image for classification",
            "qry_image_path": "img/a.png",
            "pos_text": "circle",
            "pos_image_path": "",
            "neg_text": "",
            "neg_image_path": "",
        },
        {
            "qry": "Find an image that matches: a red circle",
            "qry_image_path": "",
            "pos_text": "<|image_1|>\nRepresent the given image.",
            "pos_image_path": "img/a.png",
            "neg_text": "<|image_1|>\nRepresent the given image.",
            "neg_image_path": "img/b.png",
        },
    ]
    datasets.Dataset.from_list(mmeb).to_parquet(str(image_dir / "ImageNet_1K.parquet"))
    count = convert_mmeb_file(image_dir / "ImageNet_1K.parquet", image_dir / "converted.jsonl")
    assert count == 2
    examples, _ = load_examples([image_dir / "converted.jsonl"])
    first, second = examples
    assert first.query.text == "Represent the given image for classification"
    assert first.query.image == image_dir / "img" / "a.png"
    assert first.positive.text == "circle" and first.positive.image is None and first.negatives == ()
    assert second.query.image is None and second.positive.text == "Represent the given image."
    assert second.negatives[0].image == image_dir / "img" / "b.png"
    assert {e.source for e in examples} == {"ImageNet_1K"}

    datasets.Dataset.from_list([{"query": "x"}]).to_parquet(str(image_dir / "other.parquet"))
    with pytest.raises(DataError, match=r"other.parquet:1: not an MMEB-train row: missing column\(s\)"):
        convert_mmeb_file(image_dir / "other.parquet", image_dir / "x.jsonl")
    assert not (image_dir / "x.jsonl").exists()
