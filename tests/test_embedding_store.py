"""The embedding store: vectors read back equal, resume after a kill, shared folders, fingerprints and keys."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from unime.embedding_store import (
    EmbeddingStore,
    EmbeddingStoreError,
    content_key,
    model_fingerprint,
    namespace_slug,
)

NAMESPACE = "org/model-6d"
DIM = 6

# A child process's helpers: the vector of a key is a function of the key alone, so any process can check any row.
VECTOR_SOURCE = """
import hashlib
import numpy as np

def vector(key):
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(6).astype(np.float32)
"""
namespace: dict = {}
exec(VECTOR_SOURCE, namespace)
vector = namespace["vector"]


def keys(n: int, prefix: str = "key") -> list[str]:
    return [content_key(text=f"{prefix} {i}") for i in range(n)]


class Counting:
    """A compute function that records every key it is asked for."""

    def __init__(self, all_keys: list[str]):
        self.all_keys = all_keys
        self.asked: list[str] = []

    def __call__(self, positions: list[int]) -> np.ndarray:
        batch = [self.all_keys[i] for i in positions]
        self.asked += batch
        return np.stack([vector(key) for key in batch])


def shard_files(store: EmbeddingStore) -> list[Path]:
    return sorted(store.root.glob("shard-*.pt"))


def run_child(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", VECTOR_SOURCE + textwrap.dedent(code), *args], env=env, capture_output=True, text=True
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow  # another process reads them
def test_vectors_read_back_equal_after_reopening_and_in_another_process(tmp_path: Path):
    wanted = keys(23)
    store = EmbeddingStore(tmp_path, NAMESPACE, shard_size=5)
    assert store.fill(wanted, Counting(wanted), batch_size=3) == 23
    expected = np.stack([vector(key) for key in wanted])
    assert np.array_equal(store.get(wanted), expected)
    assert np.array_equal(EmbeddingStore(tmp_path, NAMESPACE).get(wanted[::-1]), expected[::-1])
    assert len(shard_files(store)) == 5  # 4 full shards of 5 and the remainder
    # Another process reads what this one wrote, and this one reads what another process writes.
    child = """
        import sys
        import numpy as np
        from unime.embedding_store import EmbeddingStore, content_key

        store = EmbeddingStore(sys.argv[1], "org/model-6d")
        old = [content_key(text=f"key {i}") for i in range(23)]
        assert np.array_equal(store.get(old), np.stack([vector(k) for k in old]))
        new = [content_key(text=f"new {i}") for i in range(4)]
        assert store.fill(new, lambda positions: np.stack([vector(new[i]) for i in positions])) == 4
    """
    run_child(child, str(tmp_path))
    assert np.array_equal(store.get(keys(4, "new")), np.stack([vector(key) for key in keys(4, "new")]))
    assert len(store) == 27 and store.dim == DIM


def test_repeats_and_stored_keys_are_computed_once(tmp_path: Path):
    wanted = keys(6)
    compute = Counting(wanted + wanted)
    store = EmbeddingStore(tmp_path, NAMESPACE)
    assert store.fill(wanted + wanted, compute, batch_size=4) == 6
    assert store.fill(wanted, compute) == 0
    assert compute.asked == wanted
    assert store.get([]).shape == (0, DIM)
    with pytest.raises(KeyError, match=r"key 1 .* not in the embedding store"):
        store.get([wanted[0], content_key(text="never stored")])


@pytest.mark.slow  # a child process, killed mid-fill
def test_a_killed_fill_keeps_whole_shards_only_and_a_rerun_computes_only_the_rest(tmp_path: Path):
    # The child dies without unwinding (as under SIGKILL) in the middle of writing its third shard.
    child = """
        import os, sys
        import numpy as np
        import torch
        from unime.embedding_store import EmbeddingStore, content_key

        real_save, saved = torch.save, []

        def dying_save(obj, handle):
            if len(saved) == 2:
                handle.write(b"half a shard")
                handle.flush()
                os._exit(9)
            saved.append(1)
            real_save(obj, handle)

        torch.save = dying_save
        wanted = [content_key(text=f"key {i}") for i in range(20)]
        store = EmbeddingStore(sys.argv[1], "org/model-6d", shard_size=4)
        store.fill(wanted, lambda positions: np.stack([vector(wanted[i]) for i in positions]), batch_size=2)
    """
    assert run_child(child, str(tmp_path), check=False).returncode == 9
    wanted = keys(20)
    store = EmbeddingStore(tmp_path, NAMESPACE, shard_size=4)
    assert len(shard_files(store)) == 2 and len(store) == 8  # the half-written shard was never published
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")]  # (only its temporary file is left)
    rerun = Counting(wanted)
    assert store.fill(wanted, rerun, batch_size=2) == 12
    assert rerun.asked == wanted[8:]
    assert np.array_equal(EmbeddingStore(tmp_path, NAMESPACE).get(wanted), np.stack([vector(k) for k in wanted]))


def test_an_exception_in_compute_keeps_what_was_computed(tmp_path: Path):
    wanted = keys(10)

    def failing(positions: list[int]) -> np.ndarray:
        if positions[0] >= 6:
            raise KeyboardInterrupt("stopped")
        return np.stack([vector(wanted[i]) for i in positions])

    store = EmbeddingStore(tmp_path, NAMESPACE, shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        store.fill(wanted, failing, batch_size=3)
    assert [len(torch.load(p, weights_only=True)["keys"]) for p in shard_files(store)] == [4, 2]
    rerun = Counting(wanted)
    assert EmbeddingStore(tmp_path, NAMESPACE).fill(wanted, rerun) == 4 and rerun.asked == wanted[6:]


@pytest.mark.slow  # two child processes
def test_two_processes_fill_one_folder_at_once(tmp_path: Path):
    # Each writes 40 keys, 20 of them shared, a shard per key, racing for every number: nothing is lost or replaced.
    child = """
        import sys, time
        from pathlib import Path
        import numpy as np
        from unime.embedding_store import EmbeddingStore, content_key

        start = int(sys.argv[2])
        wanted = [content_key(text=f"key {i}") for i in range(start, start + 40)]
        store = EmbeddingStore(sys.argv[1], "org/model-6d", shard_size=1)

        def compute(positions):
            # `fill` has listed what is missing before its first call: waiting here until the other writer has
            # too, both find nothing stored and then race for every shard number.
            (Path(sys.argv[1]) / f"ready-{start}").touch()
            while len(list(Path(sys.argv[1]).glob("ready-*"))) < 2:
                time.sleep(0.01)
            return np.stack([vector(wanted[i]) for i in positions])

        store.fill(wanted, compute, batch_size=1)
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen([sys.executable, "-c", VECTOR_SOURCE + textwrap.dedent(child), str(tmp_path), start], env=env)
        for start in ("0", "20")
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    wanted = keys(60)
    store = EmbeddingStore(tmp_path, NAMESPACE)
    assert np.array_equal(store.get(wanted), np.stack([vector(k) for k in wanted]))
    rows = [torch.load(p, weights_only=True)["keys"] for p in shard_files(store)]
    assert len(rows) == 80 and sum(map(len, rows)) == 80  # 40 shards from each writer, none overwritten
    assert store.fill(wanted, Counting(wanted)) == 0


def test_reads_are_memory_mapped(tmp_path: Path):
    # 64 MiB of vectors: reading them into private memory would show in the resident set; mapping them does not.
    wanted = [f"k{i}" for i in range(4096)]
    big = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    EmbeddingStore(tmp_path, NAMESPACE, shard_size=4096).fill(wanted, lambda positions: big[positions], batch_size=4096)

    process = psutil.Process()
    before = process.memory_info().rss
    store = EmbeddingStore(tmp_path, NAMESPACE)
    assert process.memory_info().rss - before < 16 << 20
    assert np.array_equal(store.get(wanted[:3]), big[:3])


def test_a_folder_that_does_not_fit_is_refused_by_name(tmp_path: Path):
    wanted = keys(2)
    store = EmbeddingStore(tmp_path, NAMESPACE, settings={"normalize": True})
    store.fill(wanted, Counting(wanted))
    # Another dimension.
    with pytest.raises(EmbeddingStoreError, match=rf"{DIM}-d .* gives 3-d"):
        EmbeddingStore(tmp_path, NAMESPACE).fill(["other"], lambda positions: np.ones((1, 3)))
    # Other settings, another namespace with the same folder name.
    with pytest.raises(EmbeddingStoreError, match="normalize=False"):
        EmbeddingStore(tmp_path, NAMESPACE, settings={"normalize": False})
    assert namespace_slug("org model-6d") == namespace_slug(NAMESPACE)
    with pytest.raises(EmbeddingStoreError, match="'org/model-6d', not 'org model-6d'"):
        EmbeddingStore(tmp_path, "org model-6d")
    # A damaged shard is named.
    shard_files(store)[0].write_bytes(b"not a shard")
    with pytest.raises(EmbeddingStoreError, match="shard-00000.pt.*delete it"):
        EmbeddingStore(tmp_path, NAMESPACE)


def test_folders_of_the_older_layouts_are_refused_or_ignored(tmp_path: Path):
    # The older teacher and eval caches: a meta.json of format 1.
    old = tmp_path / namespace_slug(NAMESPACE)
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"teacher": NAMESPACE, "dim": 6, "format_version": 1}))
    with pytest.raises(EmbeddingStoreError, match=rf"layout 1, not the layout 2 .* delete {old}"):
        EmbeddingStore(tmp_path, NAMESPACE)
    shutil.rmtree(old)
    # The older mining cache: npz chunks in a folder of its own, never read.
    (tmp_path / "0123456789abcdef01234567").mkdir()
    np.savez(tmp_path / "0123456789abcdef01234567" / "chunk-0.npz", keys=np.array(["a"]), vectors=np.ones((1, 6)))
    assert len(EmbeddingStore(tmp_path, NAMESPACE)) == 0


def test_the_encoder_output_is_checked(tmp_path: Path):
    store = EmbeddingStore(None, NAMESPACE)
    with pytest.raises(EmbeddingStoreError, match=r"returned shape \(1, 6\) for 2 items"):
        store.fill(["a", "b"], lambda positions: np.ones((1, 6)), unit="items")
    with pytest.raises(EmbeddingStoreError, match="non-finite values for item 'b'"):
        store.fill(
            ["a", "b"], lambda positions: np.array([[1.0] * 6, [np.nan] * 6]), label=lambda i: f"item {'ab'[i]!r}"
        )
    assert len(store) == 0 and store.root is None


def test_the_fingerprint_follows_file_bytes_not_times(tmp_path: Path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden": 8}')
    (model / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    first = model_fingerprint(model)
    assert model_fingerprint(str(model)) == first
    # Only the times change: same fingerprint.
    os.utime(model / "sub" / "weights.bin", ns=(1_000_000_000, 2_000_000_000))
    assert model_fingerprint(model) == first
    # A copy elsewhere is the same model.
    shutil.copytree(model, tmp_path / "copy")
    assert model_fingerprint(tmp_path / "copy") == first
    # One byte changes: another fingerprint; so does a renamed file.
    weights = bytearray((model / "sub" / "weights.bin").read_bytes())
    weights[100] ^= 1
    (model / "sub" / "weights.bin").write_bytes(bytes(weights))
    changed = model_fingerprint(model)
    assert changed != first
    (model / "sub" / "weights.bin").rename(model / "sub" / "other.bin")
    assert model_fingerprint(model) not in (first, changed)
    # A hub name without a local directory is fingerprinted by its name.
    assert model_fingerprint("org/some-model") == model_fingerprint("org/some-model") != model_fingerprint("org/b")


def test_the_fingerprint_hashes_each_unchanged_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\x01" * 4096)
    opened: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    fingerprint = model_fingerprint(model)
    assert model_fingerprint(model) == fingerprint and len(opened) == 1


def test_content_keys(tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG fake bytes")
    shutil.copyfile(image, tmp_path / "copy.png")
    # A text alone is keyed by the sha256 of its bytes.
    assert content_key(text="a cat") == hashlib.sha256(b"a cat").hexdigest()
    # An image by its bytes, wherever it lies.
    assert content_key(image=image) == content_key(image=tmp_path / "copy.png") == content_key(image=image.read_bytes())
    distinct = {
        content_key(text="a cat"),
        content_key(text="a cat", role="query"),
        content_key(text="a cat", role="document"),
        content_key(text="a cat", instruction="Find the photo."),
        content_key(text="a cat", image=image),
        content_key(image=image),
        content_key(image=image, role="query"),
        # A text that spells out another key's parts is still only a text.
        content_key(text=json.dumps({"image": None, "instruction": None, "role": "query", "text": "a cat"})),
    }
    assert len(distinct) == 8
    with pytest.raises(ValueError, match="a text, an image or both"):
        content_key()
    with pytest.raises(TypeError, match="file path or bytes, got a list"):
        content_key(image=[1, 2])  # type: ignore[arg-type]


# Token matrices -----------------------------------------------------------------------------------------------------


def matrix(key: str) -> np.ndarray:
    """A key's token matrix: 1 to 9 rows, a function of the key alone."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((int(rng.integers(1, 10)), DIM)).astype(np.float32)


class CountingMatrices:
    def __init__(self, all_keys: list[str], fail_after: int | None = None):
        self.all_keys, self.fail_after, self.asked = all_keys, fail_after, []

    def __call__(self, positions: list[int]) -> list[np.ndarray]:
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise RuntimeError("injected failure")
        self.asked += [self.all_keys[i] for i in positions]
        return [matrix(self.all_keys[i]) for i in positions]


def test_token_matrices_read_back_equal_on_disk_and_in_memory(tmp_path: Path):
    wanted = keys(23)
    for directory in (tmp_path, None):
        store = EmbeddingStore(directory, NAMESPACE, shard_size=5, token_matrices=True)
        assert store.fill_matrices(wanted + wanted[:4], CountingMatrices(wanted), batch_size=3) == 23
        reopened = EmbeddingStore(directory, NAMESPACE, token_matrices=True) if directory else store
        got = reopened.get_matrices(wanted[::-1])
        for key, read in zip(wanted[::-1], got, strict=True):
            assert read.dtype == np.float32
            np.testing.assert_allclose(read, matrix(key), rtol=1e-3, atol=1e-3)  # stored in float16
            np.testing.assert_array_equal(read, matrix(key).astype(np.float16).astype(np.float32))
        shards = reopened.matrix_shards()
        assert sum(len(k) for _, _, k, _, _ in shards) == 23
        assert all(offsets[-1] == len(tokens) for _, _, _, tokens, offsets in shards)
    assert len(list((tmp_path / namespace_slug(NAMESPACE)).glob("shard-*.pt"))) == 5
    float32_store = EmbeddingStore(tmp_path / "f32", NAMESPACE, token_matrices=True, token_dtype=torch.float32)
    float32_store.fill_matrices(wanted[:3], CountingMatrices(wanted))
    np.testing.assert_array_equal(float32_store.get_matrices(wanted[:1])[0], matrix(wanted[0]))


def test_an_interrupted_matrix_fill_keeps_what_was_computed(tmp_path: Path):
    wanted = keys(30)
    store = EmbeddingStore(tmp_path, NAMESPACE, shard_size=8, token_matrices=True)
    with pytest.raises(RuntimeError, match="injected"):
        store.fill_matrices(wanted, CountingMatrices(wanted, fail_after=20), batch_size=4)
    assert len(shard_files(store)) == 3  # two full shards and the 4 computed after them
    rerun = CountingMatrices(wanted)
    assert EmbeddingStore(tmp_path, NAMESPACE, token_matrices=True).fill_matrices(wanted, rerun) == 10
    assert rerun.asked == wanted[20:]


def test_the_layouts_do_not_mix_and_bad_matrices_are_named(tmp_path: Path):
    wanted = keys(4)
    EmbeddingStore(tmp_path, NAMESPACE, token_matrices=True).fill_matrices(wanted, CountingMatrices(wanted))
    with pytest.raises(EmbeddingStoreError, match="holds token_matrices, but vectors were asked"):
        EmbeddingStore(tmp_path, NAMESPACE)
    vectors = EmbeddingStore(tmp_path / "v", NAMESPACE)
    with pytest.raises(EmbeddingStoreError, match="fill_matrices is for a store of token_matrices"):
        vectors.fill_matrices(wanted, CountingMatrices(wanted))
    store = EmbeddingStore(tmp_path / "m", NAMESPACE, token_matrices=True)
    with pytest.raises(EmbeddingStoreError, match="get is for a store of vectors"):
        store.get(wanted)
    bad_outputs = {
        "shape (0, 6) for page 'b'": lambda p: [np.ones((2, DIM)), np.ones((0, DIM))],
        "non-finite values for page 'a'": lambda p: [np.full((2, DIM), np.nan), np.ones((1, DIM))],
        "returned 1 matrices for 2 inputs": lambda p: [np.ones((2, DIM))],
        "shape (2, 5) for page 'b'": lambda p: [np.ones((2, DIM)), np.ones((2, 5))],
    }
    for message, compute in bad_outputs.items():
        with pytest.raises(EmbeddingStoreError, match=re.escape(message)):
            store.fill_matrices(["k1", "k2"], compute, label=lambda i: f"page {'ab'[i]!r}")
    store.fill_matrices(["k1"], lambda p: [np.ones((2, DIM))])
    with pytest.raises(EmbeddingStoreError, match="holds 6-d vectors.*gives 5-d"):
        store.fill_matrices(["k2"], lambda p: [np.ones((2, 5))])


def test_a_damaged_matrix_shard_is_named(tmp_path: Path):
    wanted = keys(4)
    store = EmbeddingStore(tmp_path, NAMESPACE, token_matrices=True)
    store.fill_matrices(wanted, CountingMatrices(wanted))
    shard = store.root / "shard-00000.pt"
    payload = torch.load(shard, weights_only=True)
    payload["offsets"][-1] += 1
    torch.save(payload, shard)
    with pytest.raises(EmbeddingStoreError, match=r"shard-00000\.pt: expected .*offsets.*delete it to recompute"):
        EmbeddingStore(tmp_path, NAMESPACE, token_matrices=True)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(EmbeddingStoreError, match=r"shard-00000\.pt: cannot read this embedding shard"):
        EmbeddingStore(tmp_path, NAMESPACE, token_matrices=True)
