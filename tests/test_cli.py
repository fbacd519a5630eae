from __future__ import annotations

import numpy as np

import unime
from unime.cli import main


def test_tiny_writes_a_loadable_model_directory(tmp_path, capsys) -> None:
    assert main(["tiny", "qwen2_5_vl", str(tmp_path / "m"), "--seed", "1"]) == 0
    assert "wrote a tiny qwen2_5_vl embedder" in capsys.readouterr().out
    loaded = unime.load(tmp_path / "m")
    built = unime.build_tiny("qwen2_5_vl", seed=1)
    np.testing.assert_allclose(loaded.encode(["a red circle"]), built.encode(["a red circle"]), atol=1e-6)


def test_tiny_size_small_writes_the_wider_model_and_refuses_backbones_without_one(tmp_path, capsys) -> None:
    assert main(["tiny", "qwen2_vl", str(tmp_path / "small"), "--size", "small"]) == 0
    assert "wrote a small qwen2_vl embedder" in capsys.readouterr().out
    loaded = unime.load(tmp_path / "small")
    assert loaded.embedding_dim == 384 > unime.build_tiny("qwen2_vl").embedding_dim
    built = unime.build_tiny("qwen2_vl", size="small")
    np.testing.assert_allclose(loaded.encode(["a red circle"]), built.encode(["a red circle"]), atol=1e-5)

    assert main(["tiny", "llava", str(tmp_path / "none"), "--size", "small"]) == 2
    assert "unime tiny: error: backbone 'llava' has no small builder; backbones with one: qwen2_vl" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "none").exists()


def test_backbones_lists_every_registered_family(capsys) -> None:
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in unime.list_backbones():
        assert name in out


def test_demo_prints_a_similarity_table(capsys) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "4 captions x 4 drawn images, 64-d embeddings" in out
    rows = [line for line in out.splitlines() if line[:2] in {"0:", "1:", "2:", "3:"}]
    assert len(rows) == 4
    for row in rows:
        values = [float(v) for v in row[60:].split()]
        assert len(values) == 4 and all(-1.0 <= v <= 1.0 for v in values)


def test_errors_are_reported_without_a_traceback(tmp_path, capsys) -> None:
    assert main(["tiny", "nope", str(tmp_path / "x")]) == 2
    assert "unime tiny: error: unknown backbone 'nope'" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "has no unime_config.json" in capsys.readouterr().err


def test_synth_and_convert_write_training_files(tmp_path, capsys) -> None:
    import datasets

    from unime.data.dataset import load_examples

    assert main(["synth", "shapes", str(tmp_path / "shapes"), "--train", "8", "--held-out", "4"]) == 0
    train_examples, _ = load_examples([tmp_path / "shapes" / "train.jsonl"], min_negatives=3)
    held_out, _ = load_examples([tmp_path / "shapes" / "held_out.jsonl"])
    assert len(train_examples) == 8 and len(held_out) == 4
    assert not {e.positive.text for e in train_examples} & {e.positive.text for e in held_out}

    row = {
        "qry": "<|image_1|> What is it?",
        "qry_image_path": "a.png",
        "pos_text": "a circle",
        "pos_image_path": "",
        "neg_text": "a square",
        "neg_image_path": "",
    }
    datasets.Dataset.from_list([row]).to_parquet(str(tmp_path / "VQA.parquet"))
    assert main(["convert", "mmeb", str(tmp_path / "VQA.parquet"), str(tmp_path / "vqa.jsonl")]) == 0
    assert "wrote 1 rows" in capsys.readouterr().out
    assert main(["synth", "shapes", str(tmp_path / "x"), "--train", "80", "--held-out", "40"]) == 2
    assert "found only 90 distinct scenes" in capsys.readouterr().err


def test_sentences_convert_into_self_paired_rows(tmp_path, capsys) -> None:
    from unime.data.dataset import load_examples

    (tmp_path / "corpus.txt").write_text("A man is playing a guitar.\n\nA woman slices an onion.\n")
    assert main(["convert", "sentences", str(tmp_path / "corpus.txt"), str(tmp_path / "rows.jsonl")]) == 0
    examples, _ = load_examples([tmp_path / "rows.jsonl"])
    assert [(e.query.text, e.positive.text) for e in examples] == [
        ("A man is playing a guitar.", "A man is playing a guitar."),
        ("A woman slices an onion.", "A woman slices an onion."),
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert main(["convert", "sentences", str(tmp_path / "bad.jsonl"), str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl:2: field 'text': expected a non-empty string" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
