"""`unime encode CORPUS.jsonl STORE_DIR --model DIR`: embed a corpus into the embedding store, here or on Ray.

The corpus is JSONL of inputs, one per line (`{"text", "image", "instruction"}`, images relative to the file), as
`unime mine --corpus` reads it. The vectors go to `STORE_DIR` under the model's fingerprint, keyed as mining keys
them (content, instruction, role), so `unime mine --cache-dir STORE_DIR` with the same model and corpus finds
them all. A rerun computes only what is missing; with `--engine ray` the missing inputs are embedded by an actor
pool on a Ray cluster (`--ray.address`, default: a local cluster) and written here as blocks come back.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

from tyro.conf import Positional

import unime
from unime.data_synth.mining.miner import (
    MiningEncoder,
    MiningReport,
    SideEmbedder,
    check_bad_share,
    read_corpus,
)
from unime.embedding_store import EmbeddingStore, model_fingerprint
from unime.errors import ConfigError
from unime.ray_engine import EngineSettings, RayEncoding, ray_cluster


@dataclass(kw_only=True)
class EncodeSettings(EngineSettings):
    """Embed a corpus (JSONL of inputs) into the embedding store, computing only what it lacks; `--engine ray`
    embeds on a Ray cluster."""

    corpus: Positional[str]
    """JSONL of inputs, one per line: {"text", "image", "instruction"} (images relative to the file)."""
    store_dir: Positional[str]
    """The embedding store's folder (vectors go to a subfolder named after the model's fingerprint)."""
    model: str | None = None
    """Embedder model directory (unime.load); required."""
    role: Literal["query", "document"] = "document"
    """Whose default instruction a line without its own gets (and the role in each vector's key)."""
    batch_size: int = 32
    """Inputs per forward pass."""
    shard_size: int = 4096
    """New vectors per store shard (the most work a kill loses)."""
    skip_bad_rows: bool = False
    """Skip invalid lines (not JSON, no text or image, unreadable image), listing each; default: fail on any."""
    device: str | None = None
    """torch device for the model (default: cuda if available)."""


@dataclass
class EncodedCorpus:
    """What `encode_corpus` did."""

    store: EmbeddingStore
    """The store the vectors are in."""
    keys: list[str]
    """The key of each input embedded, in corpus order (skipped lines left out)."""
    computed: int
    """Vectors computed by this run (the others were stored already)."""
    report: MiningReport
    """Lines read and skipped."""


def encode_corpus(settings: EncodeSettings) -> EncodedCorpus:
    """Embed the corpus into the store, computing only what it lacks."""
    if not settings.model:
        raise ConfigError("give the embedder to encode with: --model DIR")
    report = MiningReport()
    sides = read_corpus(settings.corpus, report)
    check_bad_share(
        "corpus lines",
        len(report.dropped_rows),
        report.corpus_lines_read,
        1.0 if settings.skip_bad_rows else 0.0,
        report.dropped_rows,
    )
    if not sides:
        raise ConfigError(f"{settings.corpus}: no input to embed")
    ray = None
    if settings.on_ray:
        ray = RayEncoding(MiningEncoder(settings.model, settings.batch_size, settings.device), settings.ray)
    # On Ray the model here only names the instructions (and checks the directory): the actors embed.
    device = "cpu" if ray else settings.device
    embedder = unime.load(settings.model, **({"device": device} if device else {}))
    if not isinstance(embedder, unime.Embedder):
        raise ConfigError(f"{settings.model}: is a {type(embedder).__name__}; encoding needs an embedder directory")
    store = EmbeddingStore(settings.store_dir, model_fingerprint(settings.model), shard_size=settings.shard_size)
    embedding = SideEmbedder(embedder, store, settings.batch_size, ray)
    with ray_cluster(settings.ray) if ray else nullcontext():
        keys = embedding.fill(sides, settings.role)
    return EncodedCorpus(store, keys, embedding.computed, report)


def run_encode(settings: EncodeSettings) -> int:
    done = encode_corpus(settings)
    print(
        f"embedded {len(done.keys)} inputs of {settings.corpus}: {done.computed} computed ({settings.engine}), the "
        f"rest already stored; {len(done.store)} vectors in {done.store.root}"
    )
    for row in done.report.dropped_rows:
        print(f"  skipped {row['file']}:{row['line']}: {row['reason']}")
    return 0
