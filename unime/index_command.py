"""`unime index build` / `unime index search`: a multi-vector index of a corpus, made and searched with a model.

    unime index build pages.jsonl runs/index --model runs/colqwen --pool-factor 2
    unime index search runs/index --queries queries.jsonl --k 10 > hits.jsonl

The corpus is JSONL of inputs, one page per line (`{"id", "text", "image", "instruction"}`, images relative to the
file; `id` defaults to `<file name>:<line>`), as `unime encode` reads it. A page whose image cannot be decoded is
counted and listed, and the build goes on without it; a malformed line stops the build, naming it. Building again
into the same folder resumes a killed build and adds new pages (`MultiVectorIndex.add`); the folder refuses another
model. `search` embeds the queries with the index's model (or `--model`, which must be the same model) and prints
one JSON line per query: `{"query": id, "hits": [{"id", "score"}, ...]}`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tyro.conf import Positional

import unime
from unime.atomic import atomic_write
from unime.data.dataset import DataError, parse_side
from unime.embedding_store import content_key, model_fingerprint
from unime.errors import ConfigError
from unime.inputs import Input
from unime.multi_vector_index import AddReport, MultiVectorIndex, SearchHit, SearchParams, read_index_meta


@dataclass(kw_only=True)
class IndexBuildSettings:
    """Build (or resume, or extend) a multi-vector index of a corpus of pages with a multi-vector model."""

    corpus: Positional[str]
    """JSONL of pages, one per line: {"id", "text", "image", "instruction"} (images relative to the file)."""
    index_dir: Positional[str]
    """The index folder (created, resumed or extended; it refuses another model)."""
    model: str | None = None
    """Multi-vector model directory (unime.load); required."""
    pool_factor: int = 2
    """Token pooling of pages: about n / pool_factor token vectors kept per page (1: none)."""
    nlist: int | None = None
    """Inverted lists of the token index (default: a power of two near 2 sqrt(tokens)); set at the first build."""
    batch_size: int = 8
    """Pages per forward pass."""
    shard_size: int = 1024
    """Pages per store shard and index part (the most work a kill loses)."""
    device: str | None = None
    """torch device for the model (default: cuda if available)."""


@dataclass(kw_only=True)
class IndexSearchSettings:
    """Search a multi-vector index: candidates from its token index, ranked by exact MaxSim."""

    index_dir: Positional[str]
    """The index folder."""
    queries: str | None = None
    """JSONL of queries, one per line: {"id", "text", "image", "instruction"}."""
    text: list[str] = field(default_factory=list)
    """Query texts given on the command line (ids q0, q1, ...), beside or instead of --queries."""
    model: str | None = None
    """The model to embed queries with (default: the one the index records; another model is refused)."""
    k: int = 10
    """Pages returned per query."""
    nprobe: int = 16
    """Inverted lists visited per query token (more: better recall, slower)."""
    token_k: int = 512
    """Nearest page tokens fetched per query token."""
    candidates: int = 512
    """Pages scored by exact MaxSim per query."""
    batch_size: int = 8
    """Queries per forward pass."""
    output: str | None = None
    """Write the hits here (JSONL) instead of printing them."""
    device: str | None = None
    """torch device for the model (default: cuda if available)."""


@dataclass
class BuildReport:
    """What a build read, skipped and added."""

    lines: int = 0
    """Pages read from the corpus."""
    failed: list[dict[str, Any]] = field(default_factory=list)
    """Pages left out: {"file", "line", "id", "reason"} (an image that cannot be decoded)."""
    added: AddReport | None = None


def decode_problem(path: Path) -> str | None:
    """Why a page image cannot be used (missing, or not decodable to the end), or None."""
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not half-way through a build
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"image file {str(path)!r} cannot be decoded ({err})"
    return None


def read_pages(path: str | Path, report: BuildReport) -> tuple[list[str], list[Input]]:
    """Page ids and inputs of a JSONL corpus; pages whose image cannot be decoded go to `report.failed`.

    Raises:
        ConfigError: the file is missing or holds no page.
        DataError: a line that is not JSON or not a page (naming file and line), or a repeated id.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: corpus file does not exist")
    ids: list[str] = []
    inputs: list[Input] = []
    lines_of: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from err
            page_id = raw.pop("id", None) if isinstance(raw, dict) else None
            page_id = f"{path.name}:{number}" if page_id is None else page_id
            if not isinstance(page_id, str) or not page_id:
                raise DataError(f"{where}.id: expected a non-empty string, got {page_id!r}")
            if page_id in lines_of:
                raise DataError(f"{where}: page id {page_id!r} repeats line {lines_of[page_id]}")
            lines_of[page_id] = number
            page = parse_side(raw, where, path.parent)
            report.lines += 1
            problem = decode_problem(page.image) if page.image is not None else None
            if problem is not None:
                report.failed.append({"file": str(path), "line": number, "id": page_id, "reason": problem})
                continue
            ids.append(page_id)
            inputs.append(page)
    if not report.lines:
        raise ConfigError(f"{path}: the corpus holds no page")
    return ids, inputs


def load_multi_vector_model(model: str, device: str | None) -> unime.Embedder:
    """The embedder of a model directory, which must have a multi-vector head."""
    embedder = unime.load(model, **({"device": device} if device else {}))
    if not isinstance(embedder, unime.Embedder) or embedder.multi_vector_head is None:
        raise ConfigError(f"{model}: not a multi-vector model (its unime_config.json records no multi_vector head)")
    return embedder


def resolve(embedder: unime.Embedder, inputs: list[Input], role: str) -> list[Input]:
    """Inputs with the instruction the model applies (their own, else the role's)."""
    return [replace(i, instruction=i.instruction or embedder.instruction_for(role, None)) for i in inputs]


def encode_matrices(embedder: unime.Embedder, inputs: list[Input], batch_size: int) -> list[np.ndarray]:
    """Token matrices `[n_tokens, D]` of resolved inputs, one `encode` call per distinct instruction."""
    out: list[np.ndarray | None] = [None] * len(inputs)
    groups: dict[str | None, list[int]] = {}
    for slot, item in enumerate(inputs):
        groups.setdefault(item.instruction, []).append(slot)
    for instruction, slots in groups.items():
        # A dict's text is always text (a plain string ending in ".png" would be read as an image path).
        items = [inputs[slot].to_dict() for slot in slots]
        matrices = embedder.encode(items, output="multi_vector", prompt=instruction, batch_size=batch_size)
        for slot, matrix in zip(slots, matrices, strict=True):
            out[slot] = matrix
    return out  # type: ignore[return-value]


def build_index(settings: IndexBuildSettings, embedder: unime.Embedder | None = None) -> BuildReport:
    """Embed the corpus's pages the index lacks and index them (see the module docstring)."""
    if not settings.model:
        raise ConfigError("give the multi-vector model to build with: --model DIR")
    report = BuildReport()
    ids, pages = read_pages(settings.corpus, report)
    if not pages:
        raise ConfigError(f"{settings.corpus}: no page could be decoded ({len(report.failed)} failed)")
    index = MultiVectorIndex(
        settings.index_dir,
        model=settings.model,
        fingerprint=model_fingerprint(settings.model),
        pool_factor=settings.pool_factor,
        nlist=settings.nlist,
        shard_size=settings.shard_size,
    )
    embedder = embedder or load_multi_vector_model(settings.model, settings.device)
    pages = resolve(embedder, pages, "document")
    keys = [content_key(text=p.text, image=p.image, instruction=p.instruction, role="document") for p in pages]
    report.added = index.add(
        ids,
        keys,
        lambda positions: encode_matrices(embedder, [pages[p] for p in positions], settings.batch_size),
        batch_size=settings.batch_size,
    )
    return report


def read_queries(settings: IndexSearchSettings) -> tuple[list[str], list[Input]]:
    ids = [f"q{i}" for i in range(len(settings.text))]
    queries = [Input(text=text) for text in settings.text]
    if settings.queries:
        scratch = BuildReport()
        more_ids, more = read_pages(settings.queries, scratch)
        if scratch.failed:
            first = scratch.failed[0]
            raise DataError(f"{first['file']}:{first['line']}: {first['reason']}")
        ids, queries = ids + more_ids, queries + more
    if not queries:
        raise ConfigError("give queries to search for: --queries FILE.jsonl or --text ...")
    return ids, queries


def search_index(
    settings: IndexSearchSettings, embedder: unime.Embedder | None = None
) -> tuple[list[str], list[list[SearchHit]]]:
    """Query ids and each query's hits."""
    meta = read_index_meta(Path(settings.index_dir))
    model = settings.model or meta["model"]
    index = MultiVectorIndex(
        settings.index_dir, model=model, fingerprint=model_fingerprint(model), pool_factor=meta["pool_factor"]
    )
    ids, queries = read_queries(settings)
    embedder = embedder or load_multi_vector_model(model, settings.device)
    matrices = encode_matrices(embedder, resolve(embedder, queries, "query"), settings.batch_size)
    params = SearchParams(
        k=settings.k, nprobe=settings.nprobe, token_k=settings.token_k, candidates=settings.candidates
    )
    return ids, index.search(matrices, params)


def run_index_build(settings: IndexBuildSettings) -> int:
    report = build_index(settings)
    added = report.added
    assert added is not None
    print(
        f"indexed {added.pages - added.already_indexed} new pages of {settings.corpus} into {settings.index_dir} "
        f"({added.already_indexed} already there; {added.computed} token matrices computed, "
        f"{len(added.parts_written)} index parts written); {len(report.failed)} pages failed"
    )
    for failed in report.failed:
        print(f"  failed {failed['file']}:{failed['line']} ({failed['id']}): {failed['reason']}")
    return 0


def run_index_search(settings: IndexSearchSettings) -> int:
    ids, results = search_index(settings)
    lines = [
        json.dumps({"query": qid, "hits": [{"id": h.id, "score": round(h.score, 6)} for h in hits]})
        for qid, hits in zip(ids, results, strict=True)
    ]
    if settings.output:
        with atomic_write(settings.output) as handle:
            handle.write("".join(line + "\n" for line in lines))
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))
    return 0
