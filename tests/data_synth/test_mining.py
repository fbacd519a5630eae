"""Hard-negative mining: faiss top-K against brute force, false-negative filters, judge scores, sampling, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from unime import save_tiny
from unime.cli import main
from unime.data.dataset import load_examples
from unime.data_synth.mining.miner import (
    MiningConfig,
    MiningReport,
    mine_hard_negatives,
    read_corpus,
    row_key,
)
from unime.data_synth.mining.search import (
    EXACT_BELOW,
    brute_force_top_k,
    exact_search,
    ivf_search,
    recall_at_k,
    search,
)
from unime.data_synth.sharding import parse_shard
from unime.data_synth.tasks import TaskSynthConfig, write_task_examples
from unime.embedding_store import EmbeddingStore

ROWS = 14


def numpy_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :k]


def test_exact_search_equals_brute_force():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    expected = numpy_top_k(queries, corpus, 25)
    found = exact_search(queries, corpus, 25)
    assert np.array_equal(found.indices, expected)
    assert np.allclose(found.scores, np.take_along_axis(queries @ corpus.T, expected, axis=1), atol=1e-4)
    assert np.array_equal(brute_force_top_k(queries, corpus, 25, chunk=700), expected)  # merged across chunks
    assert search(queries, corpus, 25).method == "exact" and len(corpus) < EXACT_BELOW


def test_ivf_reaches_the_recall_it_is_calibrated_for():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    corpus = centres[rng.integers(0, 40, 8000)] + 0.5 * rng.standard_normal((8000, 32)).astype(np.float32)
    queries = corpus[rng.integers(0, 8000, 300)] + 0.05 * rng.standard_normal((300, 32)).astype(np.float32)
    found = ivf_search(queries, corpus, 20, target_recall=0.95)
    assert found.method == "ivf" and found.nprobe < found.nlist  # approximate: not a full scan
    assert recall_at_k(found.indices, numpy_top_k(queries, corpus, 20)) >= 0.95
    # The scores it returns are the true inner products of what it found.
    rows = np.arange(len(queries))[:, None]
    assert np.allclose(found.scores, (queries @ corpus.T)[rows, found.indices], atol=1e-4)


@pytest.fixture(scope="module")
def cache():
    """One in-memory embedding cache for the module: each side is embedded once across the tests."""
    return EmbeddingStore(None, "tiny-qwen2-vl-seed-0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """T->I rows (caption query, image positive) and a corpus holding every positive plus, for three positives,
    a re-encoded copy of the image (same pixels, other bytes: a planted false negative that ties with the
    positive) and a byte-identical copy under another name (the positive itself)."""
    root = tmp_path_factory.mktemp("mine")
    config = TaskSynthConfig(train=ROWS, held_out=0, negatives=1, seed=2, image_size=48, recipes=("retrieval_t2i",))
    result = write_task_examples(root, config)
    train = result.shard_paths("train")[0]
    examples, _ = load_examples([train])
    copies = root / "copies"
    copies.mkdir()
    lines = []
    for example in examples:
        lines.append({"image": str(example.positive.image.relative_to(root))})
    planted, identical = {}, {}
    for number, example in enumerate(examples[:3]):
        target = copies / f"copy-{number}.png"
        with Image.open(example.positive.image) as image:
            image.save(target, compress_level=0)
        assert target.read_bytes() != example.positive.image.read_bytes()
        planted[row_key(example)] = str(target)
        twin = copies / f"twin-{number}.png"
        shutil.copyfile(example.positive.image, twin)
        identical[row_key(example)] = str(twin)
        lines += [{"image": f"copies/{target.name}"}, {"image": f"copies/{twin.name}"}]
    corpus_file = root / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {
        "root": root,
        "train": train,
        "examples": examples,
        "corpus": corpus_file,
        "planted": planted,
        "identical": identical,
    }


def _vectors(embedder, examples, corpus):
    """Independent of the miner: the embedder's own vectors for queries, positives and the corpus."""
    queries = embedder.encode([{"text": e.query.text} for e in examples], prompt=examples[0].query.instruction)
    positives = embedder.encode([{"image": e.positive.image} for e in examples], prompt_name="document")
    documents = embedder.encode([{"image": side.image} for side in corpus], prompt_name="document")
    normalise = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    return normalise(queries), normalise(positives), normalise(documents)


def test_false_negatives_are_dropped_by_the_margin(tiny_embedders, data, cache):
    embedder = tiny_embedders("qwen2_vl")
    corpus = read_corpus(data["corpus"], MiningReport())
    # A re-encoded copy ties with the positive (s == s_pos up to batching noise): a tie is not above the
    # positive, so only a margin below 0 drops it (s > s_pos + margin).
    margin = -1e-3
    config = MiningConfig(top_k=len(corpus), negatives=4, margin=margin)
    mined, report = mine_hard_negatives(data["examples"], embedder, config, corpus=corpus, cache=cache)

    # Without the filter, each planted copy is mined; the byte-identical twin never is (it is the positive).
    everything = MiningConfig(top_k=len(corpus), negatives=len(corpus), margin=10.0)
    unfiltered, loose = mine_hard_negatives(data["examples"], embedder, everything, corpus=corpus, cache=cache)
    assert loose.dropped_by_margin == 0 and loose.dropped_same_content >= len(data["examples"]) + 3
    for row in unfiltered:
        negatives = {str(side.image) for side in row.negatives}
        assert data["identical"].get(row_key(row.example)) not in negatives
        if row_key(row.example) in data["planted"]:
            assert data["planted"][row_key(row.example)] in negatives

    queries, positives, documents = _vectors(embedder, data["examples"], corpus)
    assert report.dropped_by_margin >= 3
    for number, row in enumerate(mined):
        negatives = {str(side.image) for side in row.negatives}
        assert data["planted"].get(row_key(row.example)) not in negatives
        positive_sim = float(queries[number] @ positives[number])
        sims = documents @ queries[number]
        for index in row.mined:
            assert sims[index] <= positive_sim + margin + 1e-5  # kept negatives are not above s_pos + margin
        # Every candidate above s_pos + margin was dropped; the hardest ones at or below it were kept.
        positive_bytes = row.example.positive.image.read_bytes()
        allowed = [
            i
            for i in np.argsort(-sims)
            if sims[i] < positive_sim + margin - 1e-5 and corpus[i].image.read_bytes() != positive_bytes
        ]
        # (compared by similarity: near-ties may swap places between batchings)
        assert sorted(sims[row.mined]) == pytest.approx(sorted(sims[allowed[:4]]), abs=1e-4)
        assert row.scores[0] == pytest.approx(positive_sim, abs=1e-4)
        assert row.scores[1:] == pytest.approx([float(sims[i]) for i in row.mined], abs=1e-4)


def test_judge_scores_are_written_and_filter_false_negatives(tiny_embedders, data, cache):
    import unime

    judge = unime.build_tiny("qwen2_vl", seed=0, kind="reranker")
    embedder = tiny_embedders("qwen2_vl")
    corpus = read_corpus(data["corpus"], MiningReport())
    examples = data["examples"][:6]
    # Only the judge filters; the planted copies tie with the positive (same pixels), which judge_margin < 0 drops.
    config = MiningConfig(top_k=8, negatives=3, margin=10.0, judge_margin=-1e-4)
    mined, report = mine_hard_negatives(examples, embedder, config, corpus=corpus, judge=judge, cache=cache)
    assert report.dropped_by_judge >= 3  # at least the planted copies
    for row in mined:
        assert data["planted"].get(row_key(row.example)) not in {str(side.image) for side in row.negatives}
        from PIL import Image

        pairs = [(row.example.query.text, Image.open(row.example.positive.image).convert("RGB"))]
        pairs += [(row.example.query.text, Image.open(side.image).convert("RGB")) for side in row.negatives]
        expected = judge.predict(pairs)
        assert row.scores == pytest.approx([float(s) for s in expected], abs=1e-5)
        assert all(score < row.scores[0] for score in row.scores[1:])


def test_rank_window_samples_inside_the_window(tiny_embedders, data, cache):
    embedder = tiny_embedders("qwen2_vl")
    examples = data["examples"]
    config = MiningConfig(top_k=12, negatives=2, margin=10.0, window=(3, 8), seed=4)
    mined, _ = mine_hard_negatives(examples, embedder, config, cache=cache)
    again, _ = mine_hard_negatives(examples, embedder, config, cache=cache)
    assert [row.mined for row in mined] == [row.mined for row in again]  # seeded
    everything = MiningConfig(top_k=12, negatives=12, margin=10.0)
    hardest, _ = mine_hard_negatives(examples, embedder, everything, cache=cache)
    for row, ranked in zip(mined, hardest, strict=True):
        window = ranked.mined[3:8]
        assert len(row.mined) == 2 and set(row.mined) <= set(window)
        assert row.mined == [i for i in window if i in row.mined]  # kept in rank order


def test_mine_command_end_to_end(tiny_dir, data, tmp_path, capsys):
    folder = data["train"].parent
    train = folder / "with-bad-row.jsonl"
    lines = data["train"].read_text().splitlines()
    (folder / "broken.png").write_bytes(b"not a png at all")
    bad = json.loads(lines[0])
    bad["positive"] = {"image": "broken.png"}
    train.write_text("\n".join([*lines, json.dumps(bad)]) + "\n")

    out = tmp_path / "mined" / "train.jsonl"
    args = [str(tiny_dir), str(train), str(out), "--top-k", "6", "--negatives", "2", "--margin", "10"]
    # A bad row fails the run by default, naming its file and 1-based line, before anything is embedded.
    capsys.readouterr()
    assert main(["mine", *args]) == 2
    error = capsys.readouterr().err
    assert f"{train}:{ROWS + 1}: field 'positive.image'" in error and "--skip-bad-rows" in error
    assert "1 of 15 training rows" in error and not out.exists()
    # Above the accepted share it still fails; at or below it, or with --skip-bad-rows, the row is dropped.
    assert main(["mine", *args, "--max-bad-share", "0.05"]) == 2
    elsewhere = tmp_path / "share" / "train.jsonl"  # (its own embedding cache: the checks below count embeddings)
    assert main(["mine", *args[:2], str(elsewhere), *args[3:], "--max-bad-share", "0.1"]) == 0
    args.append("--skip-bad-rows")
    assert main(["mine", *args]) == 0
    printed = capsys.readouterr().out
    assert f"dropped 1 invalid row(s):\n  {train}:{ROWS + 1}: field 'positive.image'" in printed
    manifest = json.loads((tmp_path / "mined" / "train.manifest.json").read_text())
    assert manifest["kept"] == ROWS and manifest["generated"] == ROWS + 1
    assert manifest["rejected"] == {"field 'positive.image': image file is not a readable image": 1}
    [dropped] = manifest["details"]["dropped_rows"]
    assert dropped["file"] == str(train) and dropped["line"] == ROWS + 1
    assert (
        dropped["reason"].startswith("field 'positive.image': image file")
        and "not a readable image" in dropped["reason"]
    )
    examples, _ = load_examples([out], min_negatives=2)  # image paths relative to the output's folder
    assert len(examples) == ROWS and all(len(e.scores) == 3 for e in examples)
    first_run = out.read_bytes()
    assert manifest["details"]["embeddings_computed"] > 0

    # A rerun reads every embedding from the cache and writes the same rows.
    assert main(["mine", *args]) == 0
    manifest = json.loads((tmp_path / "mined" / "train.manifest.json").read_text())
    assert manifest["details"]["embeddings_computed"] == 0 and out.read_bytes() == first_run

    # Two shards mine disjoint rows that together are the whole job.
    for index in range(2):
        assert main(["mine", *args, "--shard", f"{index}/2"]) == 0
    parts = [out.with_name(f"train.part-0000{i}-of-00002.jsonl").read_text().splitlines() for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(first_run.decode().splitlines())
    assert parts[0] and parts[1]
    assert parse_shard("0/2").owns("x") != parse_shard("1/2").owns("x")

    # A generated folder is read through its manifest's shards.
    from_folder = tmp_path / "from-folder.jsonl"
    assert main(["mine", str(tiny_dir), str(folder), str(from_folder), *args[3:]]) == 0
    assert json.loads((tmp_path / "from-folder.manifest.json").read_text())["kept"] == ROWS

    # With a judge (a saved tiny reranker): its p(yes) scores are the rows' scores.
    judge_dir = tmp_path / "judge"
    save_tiny("qwen2_vl", judge_dir, kind="reranker")
    judged = tmp_path / "judged.jsonl"
    assert main(["mine", *args[:2], str(judged), *args[3:], "--judge", str(judge_dir)]) == 0
    manifest = json.loads((tmp_path / "judged.manifest.json").read_text())
    assert manifest["details"]["judge"] == str(judge_dir)
    examples, _ = load_examples([judged])
    assert all(0.0 <= score <= 1.0 for example in examples for score in example.scores)
    assert all(max(example.scores[1:], default=0.0) < example.scores[0] for example in examples)

    assert main(["mine", *args, "--window", "5"]) == 2
    assert "window" in capsys.readouterr().err


def test_keep_existing_negatives_come_first_and_are_scored(tiny_embedders, data, cache):
    examples = data["examples"]
    config = MiningConfig(top_k=6, negatives=3, margin=10.0, keep_existing=True)
    mined, _ = mine_hard_negatives(examples, tiny_embedders("qwen2_vl"), config, cache=cache)
    for row in mined:
        own = list(row.example.negatives)  # the generator's one-attribute negative
        assert len(own) == 1 and row.negatives[: len(own)] == own
        assert len(row.negatives) == 3 and len(row.scores) == 4
        assert own[0].image not in {side.image for side in row.negatives[1:]}


class _TableEmbedder:
    """A text embedder whose vectors are given: unit 2-D vectors at a chosen cosine to the query (1, 0)."""

    def __init__(self, cosines: dict[str, float]):
        self.vectors = {text: np.array([c, np.sqrt(1.0 - c * c)], dtype=np.float32) for text, c in cosines.items()}

    def encode(self, inputs, prompt=None, batch_size=32, normalize_embeddings=True):
        return np.stack([self.vectors[text] for text in inputs])


class _TableJudge:
    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def predict(self, pairs, batch_size=32, show_progress_bar=False):
        return np.array([self.scores[document] for _, document in pairs])


@pytest.mark.parametrize(
    ("margin", "kept"),
    [(0.1, ["c", "d", "e"]), (0.0, ["e"]), (-0.25, [])],
)
def test_miner_and_loss_drop_the_same_false_negatives(margin, kept):
    """Hand-computed: s_pos = 0.5; candidates a..e at 0.7, 0.65, 0.59, 0.55, 0.3. A candidate is a false
    negative when s > s_pos + margin, in the miner (similarity and judge score alike) and in the UniME loss."""
    from unime.data.schema import TrainExample
    from unime.inputs import Input
    from unime.losses.contrastive import select_hard_negatives

    sims = {"p": 0.5, "a": 0.7, "b": 0.65, "c": 0.59, "d": 0.55, "e": 0.3}
    embedder = _TableEmbedder({"q": 1.0, **sims})
    example = TrainExample(query=Input(text="q"), positive=Input(text="p"))
    corpus = [Input(text=name) for name in sims]
    names = list(sims)

    # The loss: one query over [positive, a..e]; the columns it may pick, padding left out.
    scores = torch.tensor([[sims[name] for name in names]])
    indices, valid = select_hard_negatives(scores, torch.tensor([0]), margin=margin, k=len(names))
    by_loss = sorted(names[i] for i in indices[0][valid[0]].tolist())
    assert by_loss == kept

    config = MiningConfig(top_k=len(corpus), negatives=len(corpus), margin=margin)
    [row], report = mine_hard_negatives([example], embedder, config, corpus=corpus)
    assert sorted(side.text for side in row.negatives) == kept
    assert report.dropped_by_margin == 5 - len(kept) and report.dropped_same_content == 1

    # The judge margin has the same meaning: judge scores equal to the similarities drop the same candidates.
    judged = MiningConfig(top_k=len(corpus), negatives=len(corpus), margin=10.0, judge_margin=margin)
    [row], report = mine_hard_negatives([example], embedder, judged, corpus=corpus, judge=_TableJudge(sims))
    assert sorted(side.text for side in row.negatives) == kept
    assert report.dropped_by_judge == 5 - len(kept) and report.dropped_by_margin == 0
