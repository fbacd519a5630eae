"""`unime mine <model_dir> <train.jsonl> <out.jsonl> ...`: the command-line front of `miner.mine_file`."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tyro.conf import Positional

import unime
from unime.data_synth.mining.miner import MiningConfig, MiningEncoder, mine_file
from unime.data_synth.sharding import parse_shard
from unime.embedding_store import model_fingerprint
from unime.errors import ConfigError
from unime.ray_engine import EngineSettings, RayEncoding, ray_cluster


@dataclass(kw_only=True)
class MineSettings(MiningConfig, EngineSettings):
    """Mine hard negatives for training rows: the mining settings, plus what to read and where to write. With
    `--engine ray` the embeddings are computed on a Ray cluster (`--ray.address`; default: a local one)."""

    model_dir: Positional[str]
    """Embedder model directory (unime.load) that embeds queries and candidates."""
    train: Positional[str]
    """Training JSONL/parquet, or a `synth tasks` folder, whose rows get negatives."""
    out: Positional[str]
    """JSONL to write (with --shard i/N: out.part-i-of-N.jsonl), manifest beside it."""
    corpus: str | None = None
    """JSONL of candidate sides ({text, image}); default: all rows' positives."""
    judge: str | None = None
    """Reranker model directory: judge scores filter candidates and are written."""
    cache_dir: str | None = None
    """Embedding cache folder (default: <out folder>/.embedding-cache)."""
    shard: str | None = None
    """`i/N`: mine only the rows this shard owns (0-based i): several machines without a Ray cluster split one
    job (with `--engine ray` the cluster shares the embedding instead)."""
    skip_bad_rows: bool = False
    """Drop every invalid row (listed with file:line in the manifest); the same as `max_bad_share` 1."""
    device: str | None = None
    """torch device for the models (default: cuda if available)."""


def run_mine(settings: MineSettings) -> int:
    config = MiningConfig(
        **{field.name: getattr(settings, field.name) for field in dataclasses.fields(MiningConfig)},
    )
    if settings.skip_bad_rows:
        config.max_bad_share = 1.0
    shard = parse_shard(settings.shard)
    load_kwargs = {"device": settings.device} if settings.device else {}
    ray = None
    if settings.on_ray:
        ray = RayEncoding(MiningEncoder(settings.model_dir, config.batch_size, settings.device), settings.ray)
    # On Ray the model here only names the instructions (and checks the directory): the actors embed.
    embedder = unime.load(settings.model_dir, **({"device": "cpu"} if ray else load_kwargs))
    if not isinstance(embedder, unime.Embedder):
        raise ConfigError(f"{settings.model_dir}: is a {type(embedder).__name__}; mining needs an embedder directory")
    judge = unime.load(settings.judge, **load_kwargs) if settings.judge else None
    if judge is not None and not callable(getattr(judge, "predict", None)):
        raise ConfigError(f"{settings.judge}: is a {type(judge).__name__}; --judge needs a reranker directory")
    cache_dir = settings.cache_dir or Path(settings.out).resolve().parent / ".embedding-cache"
    with ray_cluster(settings.ray) if ray else nullcontext():
        out, manifest = mine_file(
            embedder,
            settings.train,
            settings.out,
            config,
            model_id=model_fingerprint(settings.model_dir),
            corpus_path=settings.corpus,
            judge=judge,
            judge_id=str(settings.judge or ""),
            cache_dir=cache_dir,
            shard=shard,
            ray=ray,
        )
    details = manifest.details
    print(
        f"wrote {manifest.kept} rows to {out} ({manifest.generated} read; rejected {manifest.rejected or 'none'}); "
        f"search {details['search'].get('method')}, dropped {details['dropped_by_margin']} by margin and "
        f"{details['dropped_by_judge']} by judge; {details['rows_short_of_negatives']} rows short of negatives"
    )
    print_dropped_rows(details["dropped_rows"], out.with_name(out.stem + ".manifest.json"))
    return 0


SHOWN_DROPPED_ROWS = 20
"""Dropped rows printed in the summary; the manifest lists them all."""


def print_dropped_rows(dropped: list[dict], manifest_path: Path) -> None:
    if not dropped:
        return
    print(f"dropped {len(dropped)} invalid row(s):")
    for row in dropped[:SHOWN_DROPPED_ROWS]:
        print(f"  {row['file']}:{row['line']}: {row['reason']}")
    if len(dropped) > SHOWN_DROPPED_ROWS:
        print(f"  ... and {len(dropped) - SHOWN_DROPPED_ROWS} more, all listed in {manifest_path}")
