"""The shared output machinery: `--shard i/N` ownership, the manifest, and the resumable sharded writer."""

from __future__ import annotations

import json

import pytest

from unime.data.dataset import load_examples
from unime.data_synth.manifest import Manifest, ShardedJsonlWriter, near_duplicate_signature
from unime.data_synth.sharding import Shard, parse_shard, stable_hash
from unime.errors import ConfigError


def _row(i: int) -> dict:
    return {"query": {"text": f"question {i}"}, "positive": {"text": f"answer {i}"}}


def test_shards_partition_keys_exactly_and_stably():
    keys = [f"scene-{i:06d}" for i in range(3000)]
    shards = [parse_shard(f"{i}/4") for i in range(4)]
    owners = [[shard.index for shard in shards if shard.owns(key)] for key in keys]
    assert all(len(found) == 1 for found in owners)  # every key has exactly one owner
    sizes = [sum(found == [i] for found in owners) for i in range(4)]
    assert min(sizes) > 600  # a hash, not a skewed rule: 750 each on average
    assert stable_hash("scene-000001") == stable_hash("scene-000001") != stable_hash("scene-000002")
    assert parse_shard(None) == Shard(0, 1) and parse_shard("") == Shard(0, 1)
    assert all(parse_shard(None).owns(key) for key in keys[:50])


@pytest.mark.parametrize("spec", ["4/4", "-1/3", "1", "a/b", "1/0"])
def test_bad_shard_specs_name_the_problem(spec):
    with pytest.raises(ConfigError, match="shard"):
        parse_shard(spec)


def test_writer_resumes_after_a_kill_without_losing_or_duplicating(tmp_path):
    settings = {"model": "procedural", "seed": 3, "prompt_version": "v1"}
    writer = ShardedJsonlWriter(tmp_path, manifest=Manifest(**settings), records_per_shard=4)
    for i in range(10):
        assert writer.write(f"k{i}", _row(i), signature=near_duplicate_signature(_row(i)))
    assert writer.reject("broken", "invalid_json")
    # A kill: the writer is never closed, and the line being written is torn.
    assert sorted(p.name for p in tmp_path.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]
    partial = tmp_path / ".shard-00002.partial"
    with partial.open("a") as handle:
        handle.write('{"key": "k10", "signature": "x", "rec')
    del writer

    resumed = ShardedJsonlWriter(tmp_path, manifest=Manifest(**settings), records_per_shard=4)
    assert "k9" in resumed and "broken" in resumed and "k10" not in resumed
    for i in range(14):  # the first 10 are done: skipped, not written twice
        resumed.write(f"k{i}", _row(i), signature=near_duplicate_signature(_row(i)))
    assert not resumed.reject("broken", "invalid_json")
    # Same text up to case, spacing and punctuation: a near-duplicate, counted and not written.
    twin = {"query": {"text": "Question  3!"}, "positive": {"text": "answer 3"}}
    assert not resumed.write("twin", twin, signature=near_duplicate_signature(twin))
    manifest = resumed.close()

    assert manifest.kept == 14 and manifest.rejected == {"invalid_json": 1, "near_duplicate": 1}
    assert manifest.generated == 16 and manifest.seed == 3 and manifest.model == "procedural"
    assert manifest.shards == [f"shard-{i:05d}.jsonl" for i in range(4)]
    rows = [json.loads(line) for name in manifest.shards for line in (tmp_path / name).read_text().splitlines()]
    assert rows == [_row(i) for i in range(14)]
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*tmp"))
    assert Manifest.load(tmp_path) == manifest
    examples, _ = load_examples([tmp_path / name for name in manifest.shards])  # the training schema
    assert len(examples) == 14


def test_resuming_with_other_settings_is_refused(tmp_path):
    ShardedJsonlWriter(tmp_path, manifest=Manifest(seed=1)).close()
    with pytest.raises(ConfigError, match="seed"):
        ShardedJsonlWriter(tmp_path, manifest=Manifest(seed=2))


def test_a_corrupt_manifest_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text('{"kept": 1, "colour": "red"}')
    with pytest.raises(ConfigError, match="colour"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="manifest.json"):
        Manifest.load(tmp_path / "manifest.json")
