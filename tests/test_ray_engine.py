"""Embedding a corpus on a real local Ray cluster (2 CPUs, started once for this module): the same vectors as the
local path, resumable after a failed job, and every key exactly once after a worker dies mid-job."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from unime.cli import main
from unime.data_synth.mining.miner import MiningEncoder
from unime.data_synth.scenes import describe, draw_scene, random_scene
from unime.embedding_store import SHARD_NAME, EmbeddingStore, content_key, model_fingerprint
from unime.inputs import Input
from unime.ray_engine import RaySettings, fill_store_on_ray

pytestmark = pytest.mark.slow

LINES = 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """JSONL of texts, drawn images and image+text lines (images relative to the file)."""
    root = tmp_path_factory.mktemp("ray-corpus")
    rng = random.Random(3)
    lines = []
    for number in range(LINES):
        scene = random_scene(rng)
        kind = number % 3
        if kind == 0:
            lines.append({"text": describe(scene) + f" (line {number})"})
            continue
        draw_scene(scene, size=48).save(root / f"scene-{number}.png")
        lines.append({"image": f"scene-{number}.png", **({"text": describe(scene)} if kind == 2 else {})})
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _store(directory: Path, model: Path) -> EmbeddingStore:
    return EmbeddingStore(directory, model_fingerprint(model))


def _shard_keys(store: EmbeddingStore) -> list[str]:
    """Every key in every shard file of the store, repeats kept."""
    import torch

    keys: list[str] = []
    for path in sorted(p for p in store.root.iterdir() if SHARD_NAME.match(p.name)):
        keys += torch.load(path, weights_only=True)["keys"]
    return keys


@pytest.fixture(scope="module")
def local_store(corpus, tiny_dir, tmp_path_factory) -> EmbeddingStore:
    directory = tmp_path_factory.mktemp("local-store")
    assert main(["encode", str(corpus), str(directory), "--model", str(tiny_dir)]) == 0
    store = _store(directory, tiny_dir)
    assert len(store) == LINES
    return store


def _same_vectors(store: EmbeddingStore, expected: EmbeddingStore) -> None:
    keys = sorted(_shard_keys(expected))
    assert sorted(_shard_keys(store)) == keys  # the same keys, each once
    np.testing.assert_allclose(store.get(keys), expected.get(keys), atol=1e-6, rtol=0)


def test_encode_on_ray_gives_the_local_vectors(ray_local, corpus, tiny_dir, local_store, tmp_path, capsys):
    directory = tmp_path / "ray-store"
    argv = ["encode", str(corpus), str(directory), "--model", str(tiny_dir), "--engine", "ray"]
    assert main([*argv, "--ray.batch-size", "4", "--ray.num-workers", "2"]) == 0
    assert f"{LINES} computed (ray)" in capsys.readouterr().out
    _same_vectors(_store(directory, tiny_dir), local_store)


def test_a_failed_job_resumes_without_recomputing_finished_blocks(ray_local, corpus, tiny_dir, local_store, tmp_path):
    import unime
    from unime.data_synth.mining.miner import MiningReport, SideEmbedder, read_corpus

    sides = read_corpus(corpus, MiningReport())
    embedder = unime.load(tiny_dir, device="cpu")
    settings = RaySettings(num_workers=1, batch_size=4)
    store = EmbeddingStore(tmp_path, model_fingerprint(tiny_dir), shard_size=4)
    SideEmbedder(embedder, store).fill(sides[:8], "document")  # a store with two shards already written
    # The Ray job fails on line 21 (its block, the 4th of the 22 missing lines, raises): what came back before stays.
    failing = SideEmbedder(embedder, store, ray=_ray(FailsOn(MiningEncoder(str(tiny_dir)), sides[21].text), settings))
    with pytest.raises(Exception, match="planted failure"):
        failing.fill(sides, "document")
    kept = len(_store(tmp_path, tiny_dir))
    assert 8 <= kept <= 20, kept  # the stored lines, and at most the blocks before the failing one
    first_shards = {p.name: p.read_bytes() for p in store.root.iterdir() if SHARD_NAME.match(p.name)}

    resumed = SideEmbedder(embedder, _store(tmp_path, tiny_dir), ray=_ray(MiningEncoder(str(tiny_dir)), settings))
    resumed.fill(sides, "document")
    assert resumed.computed == LINES - kept  # only the missing ones went to the cluster
    store = _store(tmp_path, tiny_dir)
    assert all((store.root / name).read_bytes() == data for name, data in first_shards.items())  # left as they were
    _same_vectors(store, local_store)


def test_a_worker_killed_mid_job_leaves_every_key_exactly_once(ray_local, corpus, tiny_dir, local_store, tmp_path):
    import unime
    from unime.data_synth.mining.miner import MiningReport, read_corpus

    sides = read_corpus(corpus, MiningReport())
    embedder = unime.load(tiny_dir, device="cpu")
    instruction = embedder.instruction_for("document", None)
    resolved = [Input(text=s.text, image=s.image, instruction=instruction) for s in sides]
    keys = [content_key(text=s.text, image=s.image, instruction=s.instruction, role="document") for s in resolved]
    marker = tmp_path / "died"
    store = EmbeddingStore(tmp_path / "store", model_fingerprint(tiny_dir), shard_size=4)
    dies = DiesOnce(MiningEncoder(str(tiny_dir)), sides[12].text, str(marker))
    settings = RaySettings(num_workers=2, batch_size=4, max_restarts=2)
    assert fill_store_on_ray(store, keys, resolved, dies, settings) == LINES
    assert marker.exists()  # an actor did die (os._exit) on that block; Ray restarted it and retried the block
    store = _store(tmp_path / "store", tiny_dir)
    _same_vectors(store, local_store)


def _ray(make_encoder, settings):
    from unime.ray_engine import RayEncoding

    return RayEncoding(make_encoder, settings)


@dataclass
class FailsOn:
    """An encoder factory whose encoder raises on every block holding `text`."""

    inner: MiningEncoder
    text: str

    def __call__(self):
        encode = self.inner()

        def run(inputs: list[Input]):
            if any(item.text == self.text for item in inputs):
                raise RuntimeError("planted failure")
            return encode(inputs)

        return run


@dataclass
class DiesOnce:
    """An encoder factory whose encoder kills its own process the first time it sees `text` (a marker file
    remembers it across the actor's restart)."""

    inner: MiningEncoder
    text: str
    marker: str

    def __call__(self):
        encode = self.inner()

        def run(inputs: list[Input]):
            if any(item.text == self.text for item in inputs) and not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
            return encode(inputs)

        return run


def test_mining_finds_an_encoded_corpus_in_the_store(corpus, tiny_dir, local_store, tmp_path):
    """`unime encode` keys vectors as mining does: mining that corpus from that store computes only its queries."""
    lines = [json.loads(line) for line in corpus.read_text().splitlines()]
    images = [line["image"] for line in lines if "image" in line and "text" not in line][:3]
    train = corpus.parent / "train-for-mining.jsonl"
    rows = [{"query": {"text": f"query {i}"}, "positive": {"image": image}} for i, image in enumerate(images)]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "mined.jsonl"
    cache = tmp_path / "cache"
    shutil.copytree(local_store.root.parent, cache)  # a copy: the module's store stays as encoded
    argv = ["mine", str(tiny_dir), str(train), str(out), "--corpus", str(corpus), "--cache-dir", str(cache)]
    assert main([*argv, "--top-k", "4", "--negatives", "2"]) == 0
    details = json.loads((tmp_path / "mined.manifest.json").read_text())["details"]
    assert details["embeddings_computed"] == len(rows)  # the queries; the positives and the corpus were stored


def test_a_pool_larger_than_the_cluster_is_refused(ray_local):
    from unime.ray_engine import RayClusterError, map_records

    with pytest.raises(RayClusterError, match="ray.num_workers=3 workers need 3 CPUs but the cluster has 2"):
        next(map_records([{"text": "x"}], lambda: len, RaySettings(num_workers=3)))


@dataclass
class BlockShapes:
    """An encoder factory whose encoder answers, for every input, how many modalities its block mixed (1 or 2)."""

    def __call__(self):
        def run(inputs: list[Input]):
            mixed = len({item.image is not None for item in inputs})
            return np.full((len(inputs), 2), float(mixed), dtype=np.float32)  # [n, 2]

        return run


def test_blocks_are_cut_from_inputs_sorted_by_shape(ray_local, corpus, tmp_path):
    """An actor batches within its block, so a block mixing texts and images would pad them together: the blocks
    of a corpus that alternates modalities hold one modality each (as the local path's sorted batches do)."""
    lines = [json.loads(line) for line in corpus.read_text().splitlines()]
    items = [
        Input(text=line.get("text"), image=corpus.parent / line["image"] if "image" in line else None) for line in lines
    ]
    texts = sum(item.image is None for item in items)
    keys = [content_key(text=item.text, image=item.image) for item in items]
    store = EmbeddingStore(tmp_path / "store", "block-shapes", shard_size=7)
    # Blocks the size of the text share: a block cut in corpus order would mix both modalities.
    assert fill_store_on_ray(store, keys, items, BlockShapes(), RaySettings(num_workers=1, batch_size=texts)) == len(
        set(keys)
    )
    assert store.get(keys)[:, 0].tolist() == [1.0] * len(keys)  # every block held one modality
