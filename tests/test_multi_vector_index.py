"""The multi-vector index: exact when its candidates cover the corpus, high recall when approximate, pooling that
keeps the ranking, resume and incremental add, and bad input named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import unime
from unime import cli
from unime.config import MultiVectorConfig
from unime.embedding_store import EmbeddingStoreError, content_key
from unime.index_command import IndexBuildSettings, IndexSearchSettings, build_index, search_index
from unime.multi_vector import maxsim_scores
from unime.multi_vector_index import (
    MultiVectorIndex,
    MultiVectorIndexError,
    SearchParams,
    pool_tokens,
    synthetic_page,
    synthetic_query,
    token_index_factory,
)

DIM = 32
TOPICS = 60
FINGERPRINT = "f" * 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)


def pages(n: int, start: int = 0) -> list[np.ndarray]:
    return [synthetic_page(i, dim=DIM, tokens=(12, 30), topics=TOPICS) for i in range(start, start + n)]


def page_ids(n: int, start: int = 0) -> tuple[list[str], list[str]]:
    ids = [f"page-{i}" for i in range(start, start + n)]
    return ids, [content_key(text=i) for i in ids]


class Matrices:
    """compute for `MultiVectorIndex.add`: the given matrices, counting what is asked and failing on demand."""

    def __init__(self, matrices: list[np.ndarray], fail_after: int | None = None):
        self.matrices, self.fail_after, self.asked = matrices, fail_after, []

    def __call__(self, positions: list[int]) -> list[np.ndarray]:
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise RuntimeError("injected failure")
        self.asked += positions
        return [self.matrices[p] for p in positions]


def build(directory: Path, matrices: list[np.ndarray], start: int = 0, **kwargs) -> MultiVectorIndex:
    index = MultiVectorIndex(directory, model="synthetic", fingerprint=FINGERPRINT, shard_size=100, **kwargs)
    ids, keys = page_ids(len(matrices), start)
    index.add(ids, keys, Matrices(matrices))
    return index


def queries_of(matrices: list[np.ndarray], every: int, tokens: int = 12) -> list[np.ndarray]:
    return [synthetic_query(matrices[i], tokens=tokens, seed=i) for i in range(0, len(matrices), every)]


def covering(index: MultiVectorIndex, pages_count: int) -> SearchParams:
    """Search settings whose candidates are every page (every list probed, every token fetched)."""
    total_tokens = sum(len(t) for _, _, _, t, _ in index.store.matrix_shards())
    return SearchParams(k=10, nprobe=index.nlist, token_k=total_tokens, candidates=pages_count)


@pytest.mark.parametrize(
    ("count", "stored", "searched"),
    [(300, "IndexIVFPQ", "IndexIVFPQFastScan"), (20, "IndexIVFScalarQuantizer", "IndexIVFScalarQuantizer")],
)
def test_search_with_candidates_covering_the_corpus_ranks_like_brute_force_maxsim(
    tmp_path, count, stored, searched
) -> None:
    # 300 pages (about 6,300 tokens) train 4-bit codes, searched by fast scan; 20 pages (about 420) are too few: SQ8.
    matrices = pages(count)
    index = build(tmp_path / "index", matrices)
    assert type(faiss.read_index(str(tmp_path / "index" / "trained.faiss"))).__name__ == stored
    assert type(index._open_searcher().index).__name__ == searched
    queries = queries_of(matrices, 15 if count > 20 else 2)
    ids, keys = page_ids(count)
    stored = index.store.get_matrices(keys)  # float16 round trip, as the index scores them
    brute = maxsim_scores(queries, stored)  # [Q, count]
    found = index.search(queries, covering(index, count))
    for q, hits in enumerate(found):
        expected = torch.argsort(brute[q], descending=True, stable=True)[:10].tolist()
        assert [hit.id for hit in hits] == [ids[i] for i in expected], q
        np.testing.assert_allclose([hit.score for hit in hits], brute[q][expected].numpy(), rtol=1e-5)
    assert [h.id for h in index.exact_search(queries, 10)[0]] == [h.id for h in found[0]]
    # The stored matrices are the given ones, in float16.
    np.testing.assert_allclose(stored[7], matrices[7], atol=1e-3)


@pytest.fixture(scope="module")
def corpus_2000(tmp_path_factory) -> tuple[list[np.ndarray], MultiVectorIndex, MultiVectorIndex]:
    matrices = pages(2000)
    root = tmp_path_factory.mktemp("index")
    return matrices, build(root / "plain", matrices), build(root / "pooled", matrices, pool_factor=2)


def recall_at_10(found, exact) -> float:
    return float(np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(found, exact, strict=True)]))


def test_token_index_codes_are_4_bit_where_dimension_and_sample_allow() -> None:
    assert token_index_factory(128, 2048, 131072) == "IVF2048,PQ128x4"
    assert token_index_factory(8, 64, 4096) == "IVF64,SQ8"  # too few dimensions
    assert token_index_factory(128, 4, 500) == "IVF4,SQ8"  # too few tokens to train 16 levels per dimension


def test_approximate_search_recall_at_10_of_the_exact_ranking(corpus_2000) -> None:
    matrices, index, _ = corpus_2000
    queries = queries_of(matrices, 20)
    exact = index.exact_search(queries, 10)
    found = index.search(queries, SearchParams(k=10, nprobe=16, token_k=128, candidates=200))
    assert recall_at_10(found, exact) >= 0.95
    # Far from the whole corpus was scored: the candidates are a tenth of it.
    assert 200 <= len(matrices) / 10
    # A search that fetches almost nothing recalls much less: the bound above is not met by any search.
    poor = index.search(queries, SearchParams(k=10, nprobe=1, token_k=2, candidates=10))
    assert recall_at_10(poor, exact) < 0.8


def ndcg_at_5(hits, relevant: str) -> float:
    for rank, hit in enumerate(hits[:5]):
        if hit.id == relevant:
            return 1.0 / np.log2(rank + 2)
    return 0.0


def test_token_pooling_halves_the_index_and_keeps_the_ranking(corpus_2000) -> None:
    matrices, plain, pooled = corpus_2000
    every = 10
    queries = queries_of(matrices, every, tokens=6)
    relevant = [f"page-{i}" for i in range(0, len(matrices), every)]
    quality = {}
    for name, index in (("plain", plain), ("pooled", pooled)):
        found = index.search(queries, SearchParams(k=10, nprobe=8, token_k=64, candidates=200))
        quality[name] = np.mean([ndcg_at_5(h, r) for h, r in zip(found, relevant, strict=True)])
    assert quality["plain"] > 0.8  # far above chance (1 relevant page among 2000)
    assert quality["pooled"] >= quality["plain"] - 0.02
    plain_bytes, pooled_bytes = plain.memory_bytes(), pooled.memory_bytes()
    assert pooled_bytes["tokens"] <= 0.55 * plain_bytes["tokens"]
    assert sum(pooled_bytes.values()) <= 0.55 * sum(plain_bytes.values())


def test_pool_tokens_merges_near_duplicates_first() -> None:
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((5, DIM)).astype(np.float32)
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    page = np.repeat(distinct, 2, axis=0) + 1e-4 * rng.standard_normal((10, DIM)).astype(np.float32)  # [10, D]
    pooled = pool_tokens(page, 2)  # [5, D]: each pair back to its token
    assert pooled.shape == (5, DIM)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    assert np.abs(pooled @ distinct.T).max(axis=1).min() > 0.999
    query = rng.standard_normal((4, DIM)).astype(np.float32)
    np.testing.assert_allclose(maxsim_scores([query], [pooled]), maxsim_scores([query], [distinct]), rtol=1e-3)
    assert pool_tokens(page, 1) is not None and pool_tokens(page, 1).shape == page.shape
    assert pool_tokens(page[:1], 4).shape == (1, DIM)


def test_pool_tokens_spends_the_merges_on_the_background_and_keeps_the_rare_tokens() -> None:
    """A page of 12 near-copies of one background patch and 4 distinct tokens, pooled by 2 into 8 vectors: the
    background takes the merges, every distinct token keeps its own vector (clusters capped at two tokens would
    have to pair distinct tokens here), and a query that hangs on a distinct token scores as before."""
    rng = np.random.default_rng(1)
    background = rng.standard_normal(DIM).astype(np.float32)
    rare = rng.standard_normal((4, DIM)).astype(np.float32)  # [4, D]
    page = np.concatenate([background + 0.02 * rng.standard_normal((12, DIM)).astype(np.float32), rare])  # [16, D]
    page /= np.linalg.norm(page, axis=1, keepdims=True)
    pooled = pool_tokens(page, 2)  # [8, D]
    assert pooled.shape == (8, DIM)
    assert (pooled @ page[12:].T).max(axis=0).min() > 0.9999  # each distinct token is a pooled vector
    query = page[[13, 14]] + 0.01 * rng.standard_normal((2, DIM)).astype(np.float32)
    np.testing.assert_allclose(maxsim_scores([query], [pooled]), maxsim_scores([query], [page]), rtol=1e-5)


def test_incremental_add_equals_one_build_and_leaves_earlier_parts_alone(tmp_path) -> None:
    matrices = pages(400)
    whole = build(tmp_path / "whole", matrices, nlist=16)
    grown = build(tmp_path / "grown", matrices[:250], nlist=16)
    first_parts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "grown" / "parts").iterdir()}
    ids, keys = page_ids(150, 250)
    report = grown.add(ids, keys, Matrices(matrices[250:]))
    assert report.computed == 150
    assert {p: (tmp_path / "grown" / "parts" / p).stat().st_mtime_ns for p in first_parts} == first_parts
    assert len(report.parts_written) == 2  # only the new shards
    queries = queries_of(matrices, 20)
    for params in (covering(whole, 400), SearchParams(k=10, nprobe=16, token_k=400, candidates=400)):
        assert [[h.id for h in hits] for hits in grown.search(queries, params)] == [
            [h.id for h in hits] for hits in whole.search(queries, params)
        ]
    assert MultiVectorIndex.open(tmp_path / "grown").pages() == whole.pages()
    # Adding the same pages again computes nothing.
    again = grown.add(ids, keys, Matrices(matrices[250:]))
    assert (again.already_indexed, again.computed, again.parts_written) == (150, 0, [])


def test_a_failed_build_resumes_without_redoing_finished_shards(tmp_path) -> None:
    matrices = pages(350)
    ids, keys = page_ids(350)
    index = MultiVectorIndex(tmp_path / "index", model="synthetic", fingerprint=FINGERPRINT, shard_size=100)
    failing = Matrices(matrices, fail_after=230)
    with pytest.raises(RuntimeError, match="injected failure"):
        index.add(ids, keys, failing, batch_size=10)
    assert index.pages() == {}  # nothing searchable from the unfinished build
    stored = sorted(p.name for p in index.store.root.glob("shard-*.pt"))
    assert len(stored) == 3  # two full shards, and the 30 computed before the failure kept in a third
    resumed = MultiVectorIndex(tmp_path / "index", model="synthetic", fingerprint=FINGERPRINT, shard_size=100)
    counting = Matrices(matrices)
    report = resumed.add(ids, keys, counting, batch_size=10)
    assert sorted(counting.asked) == list(range(230, 350))  # only what was not stored
    assert report.computed == 120
    reference = build(tmp_path / "reference", matrices)
    queries = queries_of(matrices, 25)
    assert [[h.id for h in hits] for hits in resumed.exact_search(queries)] == [
        [h.id for h in hits] for hits in reference.exact_search(queries)
    ]
    assert [[h.id for h in hits] for hits in resumed.search(queries, covering(resumed, 350))] == [
        [h.id for h in hits] for hits in reference.exact_search(queries)
    ]


def test_a_killed_build_keeps_its_parts_and_resumes(tmp_path, monkeypatch) -> None:
    import unime.multi_vector_index as module

    matrices = pages(300)
    ids, keys = page_ids(300)
    index = MultiVectorIndex(tmp_path / "index", model="synthetic", fingerprint=FINGERPRINT, shard_size=100)
    written = []
    original = module._write_faiss_atomic

    def dies_on_the_third_part(faiss_index, path):
        if path.parent.name == "parts":
            if len(written) == 2:
                raise KeyboardInterrupt
            written.append(path.name)
        original(faiss_index, path)

    monkeypatch.setattr(module, "_write_faiss_atomic", dies_on_the_third_part)
    with pytest.raises(KeyboardInterrupt):
        index.add(ids, keys, Matrices(matrices))
    monkeypatch.setattr(module, "_write_faiss_atomic", original)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "index" / "parts").iterdir()}
    assert len(before) == 2 and not list((tmp_path / "index" / "parts").glob(".*"))  # no half-written part
    report = MultiVectorIndex(tmp_path / "index", model="synthetic", fingerprint=FINGERPRINT).add(
        ids, keys, Matrices(matrices)
    )
    assert report.computed == 0 and report.parts_written == ["shard-00002.faiss"]
    assert {p: (tmp_path / "index" / "parts" / p).stat().st_mtime_ns for p in before} == before


# Bad input ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_index(tmp_path) -> tuple[MultiVectorIndex, list[np.ndarray]]:
    matrices = pages(200)
    return build(tmp_path / "index", matrices), matrices


def test_a_corrupt_or_truncated_part_is_named(small_index) -> None:
    index, matrices = small_index
    part = index.directory / "parts" / "shard-00001.faiss"
    part.write_bytes(part.read_bytes()[:200])
    with pytest.raises(MultiVectorIndexError, match=r"shard-00001\.faiss: cannot read"):
        MultiVectorIndex.open(index.directory).search(queries_of(matrices, 50))
    part.write_bytes(b"not an index")
    with pytest.raises(MultiVectorIndexError, match=r"shard-00001\.faiss.*rebuild"):
        MultiVectorIndex.open(index.directory).search(queries_of(matrices, 50))
    # Deleting it and building again restores the index from the stored matrices, computing nothing.
    part.unlink()
    with pytest.raises(MultiVectorIndexError, match=r"shard-00001\.faiss: missing"):
        MultiVectorIndex.open(index.directory).search(queries_of(matrices, 50))
    reopened = MultiVectorIndex.open(index.directory)
    ids, keys = page_ids(200)
    report = reopened.add(ids, keys, Matrices([]))  # nothing computed: the part is rebuilt from the store
    assert report.parts_written == ["shard-00001.faiss"] and report.already_indexed == 200
    queries = queries_of(matrices, 50)
    assert [h.id for h in reopened.search(queries)[0]] == [h.id for h in reopened.exact_search(queries)[0]]
    shutil.rmtree(index.directory / "parts")
    reopened = MultiVectorIndex.open(index.directory)
    ids, keys = page_ids(1, 900)
    assert reopened.add(ids, keys, Matrices(pages(1, 900))).parts_written == [f"shard-0000{i}.faiss" for i in range(3)]
    assert [h.id for h in reopened.search(queries)[0]] == [h.id for h in reopened.exact_search(queries)[0]]


def test_a_truncated_store_shard_is_named(small_index) -> None:
    index, _ = small_index
    shard = index.store.root / "shard-00000.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(EmbeddingStoreError, match=r"shard-00000\.pt: cannot read"):
        MultiVectorIndex.open(index.directory)


def test_another_model_or_pool_factor_is_refused_naming_both(small_index) -> None:
    index, _ = small_index
    with pytest.raises(MultiVectorIndexError, match=r"built by the model 'synthetic'.*not by 'other-model'"):
        MultiVectorIndex(index.directory, model="other-model", fingerprint="0" * 64)
    with pytest.raises(MultiVectorIndexError, match="pools pages by 1, not 2"):
        MultiVectorIndex(index.directory, model="synthetic", fingerprint=FINGERPRINT, pool_factor=2)


def test_a_query_of_another_dimension_is_refused(small_index) -> None:
    index, matrices = small_index
    with pytest.raises(MultiVectorIndexError, match=r"query 1: token vectors of dimension 16.*holds 32-d"):
        index.search([matrices[0], np.ones((3, 16), np.float32)])
    with pytest.raises(MultiVectorIndexError, match="query 0: expected a non-empty"):
        index.search([np.ones((0, DIM), np.float32)])


def test_a_failed_add_loses_nothing_of_the_complete_index(small_index) -> None:
    index, matrices = small_index
    queries = queries_of(matrices, 40)
    before = [[h.id for h in hits] for hits in index.search(queries)]
    ids, keys = page_ids(50, 500)
    wrong = [np.ones((4, 16), np.float32)] * 50  # another dimension: the store refuses it
    with pytest.raises(EmbeddingStoreError, match="16-d"):
        index.add(ids, keys, Matrices(wrong))
    with pytest.raises(MultiVectorIndexError, match="page-3.*other content"):
        index.add(["page-3"], [content_key(text="something else")], Matrices(pages(1)))
    with pytest.raises(MultiVectorIndexError, match="no pages to add"):
        index.add([], [], Matrices([]))
    after = MultiVectorIndex.open(index.directory)
    assert [[h.id for h in hits] for hits in after.search(queries)] == before
    assert len(after.pages()) == 200


# With a model: the commands ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "tiny-colqwen2"
    unime.build_tiny("qwen2_vl", seed=0, multi_vector=MultiVectorConfig(dim=16)).save(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, scenes) -> Path:
    images, captions = scenes
    folder = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, (image, caption) in enumerate(zip(images[:6], captions[:6], strict=True)):
        image.save(folder / f"page{i}.png")
        rows.append({"id": f"page{i}", "image": f"page{i}.png", "text": caption})
    (folder / "broken.png").write_bytes((folder / "page0.png").read_bytes()[:120])  # a truncated PNG
    rows.insert(3, {"id": "broken", "image": "broken.png"})
    rows.append({"text": "a text-only page about a blue square"})
    path = folder / "pages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_index_commands_build_and_search_like_brute_force_maxsim(model_dir, corpus, tmp_path, capsys) -> None:
    index_dir = tmp_path / "index"
    status = cli.main(["index", "build", str(corpus), str(index_dir), "--model", str(model_dir), "--shard-size", "4"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "indexed 7 new pages" in out
    assert "1 pages failed" in out and "broken" in out and "cannot be decoded" in out
    hits_file = tmp_path / "hits.jsonl"
    queries = ["a red circle", "a green triangle on the right"]
    argv = ["index", "search", str(index_dir), "--text", *queries, "--output", str(hits_file), "--nprobe", "64"]
    assert cli.main([*argv, "--token-k", "10000", "--candidates", "100"]) == 0
    lines = [json.loads(line) for line in hits_file.read_text().splitlines()]
    assert [line["query"] for line in lines] == ["q0", "q1"]

    # Brute force: the model's token matrices, pooled as the index pools them (by 2), MaxSim over every page.
    embedder = unime.load(model_dir)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows = [row for row in rows if row.get("id") != "broken"]
    items = [{k: str(corpus.parent / v) if k == "image" else v for k, v in r.items() if k != "id"} for r in rows]
    pages_ = [pool_tokens(m, 2) for m in embedder.encode(items, output="multi_vector", prompt_name="document")]
    query_matrices = embedder.encode(queries, output="multi_vector", prompt_name="query")
    brute = maxsim_scores(query_matrices, pages_)  # [2, 7]
    names = [row.get("id", f"pages.jsonl:{n}") for n, row in enumerate(rows, start=1)]
    names[-1] = "pages.jsonl:8"  # the text page's line, after the broken one
    for line, scores in zip(lines, brute, strict=True):
        order = torch.argsort(scores, descending=True).tolist()
        assert [hit["id"] for hit in line["hits"]] == [names[i] for i in order][: len(line["hits"])]
        np.testing.assert_allclose([hit["score"] for hit in line["hits"]], scores[order].numpy(), atol=2e-3)

    # A second build computes nothing; the same ids keep their place.
    assert cli.main(["index", "build", str(corpus), str(index_dir), "--model", str(model_dir)]) == 0
    assert "0 token matrices computed" in capsys.readouterr().out


def test_index_commands_refuse_another_model_and_an_empty_corpus(model_dir, corpus, tmp_path, capsys) -> None:
    index_dir = tmp_path / "index"
    assert cli.main(["index", "build", str(corpus), str(index_dir), "--model", str(model_dir)]) == 0
    other = tmp_path / "other-model"
    unime.build_tiny("qwen2_vl", seed=1, multi_vector=MultiVectorConfig(dim=16)).save(other)
    capsys.readouterr()
    assert cli.main(["index", "search", str(index_dir), "--text", "a circle", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"built by the model {str(model_dir)!r}" in err and f"not by {str(other)!r}" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli.main(["index", "build", str(empty), str(tmp_path / "i2"), "--model", str(model_dir)]) == 2
    assert f"{empty}: the corpus holds no page" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    assert cli.main(["index", "build", str(bad), str(tmp_path / "i3"), "--model", str(model_dir)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_python_api_builds_with_a_loaded_model(model_dir, corpus, tmp_path) -> None:
    embedder = unime.load(model_dir)
    settings = IndexBuildSettings(corpus=str(corpus), index_dir=str(tmp_path / "index"), model=str(model_dir))
    report = build_index(settings, embedder)
    assert report.lines == 8 and [f["id"] for f in report.failed] == ["broken"]
    assert report.added is not None and report.added.computed == 7
    ids, hits = search_index(IndexSearchSettings(index_dir=str(tmp_path / "index"), text=["a red circle"]), embedder)
    assert ids == ["q0"] and len(hits[0]) == 7
