"""A multi-vector (late-interaction) index: token matrices of a corpus, candidates from a token index, exact MaxSim.

Scoring every page of a large corpus with MaxSim costs a matmul over all its token vectors per query. The index
keeps that exact score but computes it on a shortlist only:

1. **Token matrices** of the pages live in the one embedding store (`EmbeddingStore(token_matrices=True)`, float16,
   memory-mapped), under the model's fingerprint, optionally **pooled** first (`pool_tokens`: each page's tokens
   clustered hierarchically, the normalised cluster means kept; pool factor 2 halves the tokens).
2. **Candidates**: an inverted-file faiss index over every stored token vector (`token_index_factory`: 4-bit codes
   per dimension, `IVF<nlist>,PQ<dim>x4`, searched with SIMD fast scan; inner product; each token's id names its
   page), one part per store shard. A query's tokens each fetch their `token_k` nearest page tokens; a page's
   first-stage score is the sum over query tokens of the best similarity found for it (the MaxSim of what was
   retrieved), and the `candidates` best pages go on.
3. **Exact MaxSim** (`unime.late_interaction.maxsim_packed`) of the query against the candidates' stored matrices,
   gathered back to back with no padding, ranks them.

Why this candidate stage: it needs no summary of a page to be trained, its recall grows smoothly with `nprobe` and
`token_k`, and adding pages only assigns their tokens to the trained centroids (no rebuild). Per-page summary
vectors (the mean of a page's tokens) were measured as the alternative in `bench/late_interaction_index.py`.

Layout of an index folder:
- `index.json`: the model (name and fingerprint), dimension, pool factor, format;
- `store/<fingerprint>/`: the embedding store of the (pooled) token matrices;
- `trained.faiss`: the trained, empty token index (centroids and quantiser), written once;
- `parts/shard-NNNNN.faiss`: the tokens of store shard `shard-NNNNN.pt`, ids `shard number << 32 | row`;
- `pages-<digest>.json`: the page ids and content keys of one completed build or add.

Every file is written atomically. A killed build keeps its finished store shards and parts; the next build computes
only what is missing. Pages become searchable when their pages file is written, last, so an index that was complete
stays searchable whatever happens to a later add.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unime.atomic import create_temporary, write_json_atomic
from unime.embedding_store import SHARD_NAME, ComputeMatrices, EmbeddingStore
from unime.errors import UnimeError
from unime.late_interaction import maxsim_packed

INDEX_META = "index.json"
INDEX_FORMAT = 1
TRAINED_NAME = "trained.faiss"
PARTS_DIR = "parts"
STORE_DIR = "store"
PAGES_PREFIX = "pages-"
SAMPLE_PER_CENTROID = 64
"""Training tokens per inverted list (faiss asks for at least 39)."""


class MultiVectorIndexError(UnimeError, ValueError):
    """An index on disk does not fit what is asked of it (another model or dimension, a damaged or missing file)
    or was given unusable input; the message names the folder, file or item."""


@dataclass(frozen=True)
class SearchHit:
    """One page found: its id and its exact MaxSim score."""

    id: str
    score: float


@dataclass(frozen=True)
class SearchParams:
    """How much work a search does before exact MaxSim."""

    k: int = 10
    """Pages returned per query."""
    nprobe: int = 16
    """Inverted lists visited per query token (more: better recall, slower)."""
    token_k: int = 512
    """Nearest page tokens fetched per query token."""
    candidates: int = 512
    """Pages scored by exact MaxSim per query (the best by the first-stage score)."""


@dataclass
class AddReport:
    """What one `add` did."""

    pages: int = 0
    """Page ids given."""
    already_indexed: int = 0
    """Ids the index held already with the same content (skipped)."""
    computed: int = 0
    """Token matrices computed (distinct contents not stored yet)."""
    parts_written: list[str] = field(default_factory=list)
    """Parts of the token index written (one per store shard not indexed yet)."""


# Token pooling ---------------------------------------------------------------------------------------------------


def pool_tokens(matrix: np.ndarray, pool_factor: int) -> np.ndarray:
    """A page's token matrix with about `n / pool_factor` rows: its tokens clustered by Ward's hierarchical
    clustering (on the unit vectors, where Euclidean distance is a function of cosine), each cluster replaced by
    its mean, L2-normalised. Near-duplicate tokens (the background patches of a page) merge first, so the
    MaxSim of a query against the page changes little. `pool_factor` 1 returns the matrix unchanged.

    Ward's clustering was kept after measuring the alternatives against exact unpooled MaxSim, each in one run.
    Synthetic pages (`synthetic_page`: 20,000 pages of 48-112 tokens in 400 topics; 1,000 queries of 3 tokens with
    noise 3.0; pool factor 2; nDCG@5 loss, standard error in brackets): Ward 1.46% (0.60); average linkage on cosine
    2.57% (0.67); complete linkage on cosine 1.60% (1.03, 5,000 pages); unnormalised means 3.56% (0.69); a tenth of
    the kept vectors given unpooled to the tokens farthest from their cluster's mean 1.88% (0.61), a quarter 0.21%
    against Ward's -0.13% (5,000 pages); Ward's clusters refined by three rounds of spherical k-means (each token to
    its most similar mean) the same ranking on every query; clusters capped at `pool_factor` tokens (greedy
    most-similar pairs at 2) 0.97% (0.58), better here, where a page has no near-duplicates to merge. On drawn pages
    with a trained model (`bench/late_interaction_index.py --drawn`: 16 image tokens a page, most of them grey
    clutter, 3 small two-colour markers; 200 held-out pages, each ranked among its 3 hard negatives for its own
    query) the cap is what fails: once the clutter is paired it must pair marker tokens, and it lost 2.08% of nDCG@5
    (0.8192 to 0.8022; the page first 0.515 against 0.560 unpooled) and kept 0.361 of the unpooled top 10 of those
    queries, where Ward lost 0.21% (0.8175; first 0.550) and kept 0.883. Real pages repeat themselves (margins,
    background, runs of text), as the drawn ones do.

    Args:
        matrix: `[n, D]` float token vectors of one page.
        pool_factor: how many tokens make one, on average (>= 1).

    Returns:
        `[m, D]` float32, `m = max(1, n // pool_factor)` (fewer when clusters tie).
    """
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    matrix = np.asarray(matrix, dtype=np.float32)
    clusters = max(1, len(matrix) // pool_factor)
    if pool_factor == 1 or clusters >= len(matrix):
        return matrix
    # scipy is an optional dependency (the eval extra), needed only to pool.
    from scipy.cluster.hierarchy import fcluster, linkage

    labels = fcluster(linkage(matrix, method="ward"), t=clusters, criterion="maxclust") - 1  # [n] from 0
    members = np.zeros((labels.max() + 1, len(matrix)), dtype=np.float32)  # [m, n] one-hot rows
    members[labels, np.arange(len(matrix))] = 1.0
    sums = (members @ matrix)[members.any(axis=1)]  # [m, D] (a matmul: far faster than np.add.at)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)  # [m, D]


# Synthetic pages for tests and benchmarks -------------------------------------------------------------------------


def synthetic_page(page: int, *, dim: int, tokens: tuple[int, int], topics: int, seed: int = 0) -> np.ndarray:
    """A synthetic page's unit token matrix `[n, dim]`, a function of (page, seed) alone: 2-4 facets, each a noisy
    copy of one of `topics` shared topic vectors, and each token a noisy copy of one facet - clustered like the
    patches of a real page (several tokens per region), with pages of one topic alike but not equal."""
    rng = np.random.default_rng([seed, page])
    centres = _topic_centres(seed, topics, dim)  # [T, D]
    count = int(rng.integers(tokens[0], tokens[1] + 1))
    facets = centres[rng.integers(0, topics, size=int(rng.integers(2, 5)))]  # [F, D]
    facets = facets + 0.6 * rng.standard_normal(facets.shape).astype(np.float32)  # [F, D]
    rows = facets[rng.integers(0, len(facets), size=count)]  # [n, D]
    rows = rows + 0.5 * rng.standard_normal(rows.shape).astype(np.float32)  # [n, D]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)  # [n, D]


@functools.lru_cache(maxsize=4)
def _topic_centres(seed: int, topics: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, 1 << 40]).standard_normal((topics, dim)).astype(np.float32)  # [T, D]


def synthetic_query(page: np.ndarray, *, tokens: int, seed: int, noise: float = 0.6) -> np.ndarray:
    """A query `[tokens, D]` that asks for `page`: noisy copies of some of its tokens, normalised (`noise` is the
    norm of the noise added to each unit token: 0.6 leaves a cosine of about 0.85 with it, 1.5 about 0.55)."""
    rng = np.random.default_rng(seed)
    rows = page[rng.integers(0, len(page), size=tokens)]  # [tokens, D]
    rows = rows + noise * rng.standard_normal(rows.shape).astype(np.float32) / math.sqrt(page.shape[1])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)  # [tokens, D]


# Packed batches of stored matrices ---------------------------------------------------------------------------------


def _token_rows(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The token rows of a chunk (`[n + 1]` offsets) that matrices `rows` own, one matrix after the other
    (`[sum of lengths]`), and their `[len(rows)]` lengths: one index for one gather, no Python loop over pages."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]  # [r], [r]
    first = np.cumsum(lengths) - lengths  # [r] where each matrix begins in the gathered tokens
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum())), lengths


def _query_batch(queries: Sequence[np.ndarray], dim: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Query matrices checked against the index's dimension, padded: `[Q, Lq, D]` and `[Q, Lq]`."""
    tensors = []
    for number, query in enumerate(queries):
        array = np.asarray(query, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0:
            raise MultiVectorIndexError(
                f"query {number}: expected a non-empty [n_tokens, dim] matrix, got shape {array.shape}"
            )
        if array.shape[1] != dim:
            raise MultiVectorIndexError(
                f"query {number}: token vectors of dimension {array.shape[1]}, but the index {where} holds {dim}-d "
                "vectors (search it with the model that built it)"
            )
        tensors.append(torch.from_numpy(array))
    padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)  # [Q, Lq, D]
    lengths = torch.tensor([len(t) for t in tensors])  # [Q]
    return padded, torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)


# Files ------------------------------------------------------------------------------------------------------------


def _write_faiss_atomic(index: Any, path: Path) -> None:
    # faiss is a heavy optional dependency (the eval extra): imported where an index is read or written.
    import faiss

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary(path)
    os.close(fd)
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_faiss(path: Path, what: str) -> Any:
    import faiss  # heavy optional dependency, see _write_faiss_atomic

    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MultiVectorIndexError(
            f"{path}: cannot read this {what} ({first_line}); delete it and run the build again to rebuild it from "
            "the stored token matrices"
        ) from err


FAST_SCAN_MIN_DIM = 16
"""Token vectors of fewer dimensions are coded with SQ8: faiss's 4-bit fast scan corrupted memory on 2- and
4-dimensional vectors here, and such small vectors gain nothing from it."""
FAST_SCAN_MIN_SAMPLE = 16 * 39
"""Training tokens the 16 codes of each dimension need (faiss asks for 39 per centroid); fewer: SQ8."""


def token_index_factory(dim: int, nlist: int, sample: int) -> str:
    """The faiss factory string of the token index: `IVF<nlist>,PQ<dim>x4`, a 4-bit code per dimension (16 trained
    levels per dimension of the residual to the list's centroid: half the bytes of SQ8), searched in faiss's fast-
    scan layout (`_for_fast_scan`: SIMD lookup tables, several times faster than decoding SQ8 codes);
    `IVF<nlist>,SQ8` below `FAST_SCAN_MIN_DIM` dimensions or `FAST_SCAN_MIN_SAMPLE` training tokens. The codes only
    pick candidates: the final ranking is exact MaxSim of the stored matrices either way
    (`bench/late_interaction_index.py` measured both at 100k pages)."""
    if dim >= FAST_SCAN_MIN_DIM and sample >= FAST_SCAN_MIN_SAMPLE:
        return f"IVF{nlist},PQ{dim}x4"
    return f"IVF{nlist},SQ8"


def auto_nlist(tokens: int) -> int:
    """Inverted lists for `tokens` token vectors: a power of two near 2 sqrt(tokens), each list trained on at least
    `SAMPLE_PER_CENTROID` tokens where the corpus allows, at most 65536."""
    if tokens < 1:
        raise ValueError("auto_nlist needs at least one token")
    wanted = 2 ** int(math.log2(max(1.0, 2 * math.sqrt(tokens))))
    return max(1, min(wanted, tokens // SAMPLE_PER_CENTROID or 1, 65536))


# The index --------------------------------------------------------------------------------------------------------


class MultiVectorIndex:
    """Token matrices of pages with a token index for candidates, in one folder, for one model.

    `MultiVectorIndex(directory, model=..., fingerprint=..., pool_factor=...)` creates the folder or opens the one
    there when it was built by the same model (fingerprint) and pool factor, and refuses it otherwise, naming both
    models. `add` computes what is missing and indexes it; `search` finds the best pages of query matrices.

    Args:
        directory: the index folder.
        model: the model's name or directory, recorded to name it in messages (and used by `unime index search`).
        fingerprint: the model's identity (`unime.embedding_store.model_fingerprint`): the index answers only it.
        pool_factor: token pooling of pages (1: none; 2-4 shrink the index by about that factor).
        nlist: inverted lists of the token index; None picks `auto_nlist` of the tokens stored at first training.
        shard_size: pages per store shard (and per part of the token index): the most work a kill loses.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        model: str,
        fingerprint: str,
        pool_factor: int = 1,
        nlist: int | None = None,
        shard_size: int = 1024,
    ) -> None:
        if pool_factor < 1:
            raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
        self.directory = Path(directory)
        meta_path = self.directory / INDEX_META
        if meta_path.is_file():
            meta = read_index_meta(self.directory)
            if meta["fingerprint"] != fingerprint:
                raise MultiVectorIndexError(
                    f"{meta_path}: this index was built by the model {meta['model']!r} (fingerprint "
                    f"{meta['fingerprint'][:12]}), not by {model!r} (fingerprint {fingerprint[:12]}); use another "
                    "folder for another model"
                )
            if meta["pool_factor"] != pool_factor:
                raise MultiVectorIndexError(
                    f"{meta_path}: this index pools pages by {meta['pool_factor']}, not {pool_factor}; use another "
                    "folder or the same pool factor"
                )
        else:
            meta = {"format": INDEX_FORMAT, "model": model, "fingerprint": fingerprint, "pool_factor": pool_factor}
            write_json_atomic(meta_path, {**meta, "dim": None, "nlist": nlist})
        self.meta = meta
        self.model = meta["model"]
        self.fingerprint = fingerprint
        self.pool_factor = pool_factor
        self.nlist = meta.get("nlist") or nlist
        self.store = EmbeddingStore(
            self.directory / STORE_DIR,
            fingerprint,
            shard_size=shard_size,
            settings={"pool_factor": pool_factor},
            token_matrices=True,
        )
        self._searcher: _Searcher | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> MultiVectorIndex:
        """The index in `directory`, by the model its `index.json` names."""
        meta = read_index_meta(Path(directory))
        return cls(directory, model=meta["model"], fingerprint=meta["fingerprint"], pool_factor=meta["pool_factor"])

    @property
    def dim(self) -> int | None:
        """The token vectors' dimension, None while nothing is stored."""
        return self.store.dim

    def pages(self) -> dict[str, str]:
        """Page id -> content key, of every completed build and add."""
        table: dict[str, str] = {}
        for path in sorted(self.directory.glob(f"{PAGES_PREFIX}*.json")):
            try:
                written = json.loads(path.read_text())
                ids, keys = written["ids"], written["keys"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise MultiVectorIndexError(f"{path}: not a pages file of this index ({err})") from err
            table.update(zip(ids, keys, strict=True))
        return table

    # Building -----------------------------------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[str],
        keys: Sequence[str],
        compute: ComputeMatrices,
        *,
        batch_size: int = 16,
        label: Any = None,
    ) -> AddReport:
        """Add pages: compute the (pooled) token matrices the store lacks, index every stored shard not indexed
        yet, then record the pages. Rerunning after a kill redoes only what was not finished.

        Args:
            ids: one id per page (unique among themselves and against the index, unless with the same content).
            keys: each page's content key (`content_key`); equal contents are computed and stored once.
            compute: positions into `ids` -> their `[n_tokens, D]` matrices (unpooled: the index pools them).
            batch_size: positions per `compute` call.
            label: names the page at a position in error messages.

        Raises:
            MultiVectorIndexError: no pages, repeated ids, an id already indexed with other content.
        """
        if len(ids) != len(keys):
            raise ValueError(f"add needs one key per id, got {len(ids)} ids and {len(keys)} keys")
        if not ids:
            raise MultiVectorIndexError(f"{self.directory}: no pages to add")
        report = AddReport(pages=len(ids))
        known = self.pages()
        seen: dict[str, int] = {}
        fresh: list[int] = []
        for position, (page_id, key) in enumerate(zip(ids, keys, strict=True)):
            if page_id in seen:
                raise MultiVectorIndexError(
                    f"page id {page_id!r} given twice (positions {seen[page_id]} and {position})"
                )
            seen[page_id] = position
            if page_id in known:
                if known[page_id] != key:
                    raise MultiVectorIndexError(
                        f"page id {page_id!r} is in the index {self.directory} already with other content; give the "
                        "new page another id"
                    )
                report.already_indexed += 1
            else:
                fresh.append(position)
        if not fresh:
            # Nothing new to embed; a part deleted (or a build killed while indexing) is still rebuilt here.
            report.parts_written = self._index_new_shards() if len(self.store) else []
            return report

        def pooled(positions: list[int]) -> list[np.ndarray]:
            matrices = compute([fresh[p] for p in positions])
            return [pool_tokens(np.asarray(m, dtype=np.float32), self.pool_factor) for m in matrices]

        name = label or (lambda position: f"page {ids[position]!r}")
        report.computed = self.store.fill_matrices(
            [keys[p] for p in fresh],
            pooled,
            batch_size=batch_size,
            source="the model",
            label=lambda p: name(fresh[p]),
        )
        self._record_dim()
        report.parts_written = self._index_new_shards()
        digest = hashlib.sha256(json.dumps([[ids[p], keys[p]] for p in fresh]).encode()).hexdigest()[:16]
        write_json_atomic(
            self.directory / f"{PAGES_PREFIX}{digest}.json",
            {"ids": [ids[p] for p in fresh], "keys": [keys[p] for p in fresh]},
        )
        self._searcher = None
        return report

    def _record_dim(self) -> None:
        meta_path = self.directory / INDEX_META
        meta = read_index_meta(self.directory)
        if meta.get("dim") != self.store.dim:
            write_json_atomic(meta_path, {**meta, "dim": self.store.dim})

    def _index_new_shards(self) -> list[str]:
        """Train the token index once (on a sample of every stored token), then write the part of each store shard
        that has none."""
        trained_path = self.directory / TRAINED_NAME
        if not trained_path.is_file():
            self._train(trained_path)
        written = []
        for _, name, _, tokens, offsets in self.store.matrix_shards():
            assert name is not None  # an index's store is always on disk
            part = self.part_path(name)
            if part.is_file():
                continue
            index = _read_faiss(trained_path, "trained token index")
            number = int(SHARD_NAME.match(name).group(1))
            rows = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))  # [tokens] their page
            ids = (np.int64(number) << 32) + rows  # [tokens]
            for start in range(0, len(tokens), 1 << 16):  # float32 copies a slice at a time
                index.add_with_ids(tokens[start : start + (1 << 16)].float().numpy(), ids[start : start + (1 << 16)])
            _write_faiss_atomic(index, part)
            written.append(part.name)
        return written

    def _train(self, path: Path) -> None:
        import faiss  # heavy optional dependency, see _write_faiss_atomic

        shards = self.store.matrix_shards()
        sizes = np.array([len(tokens) for _, _, _, tokens, _ in shards])  # [shards]
        total = int(sizes.sum())
        nlist = self.nlist or auto_nlist(total)
        rng = np.random.default_rng(0)
        wanted = np.sort(rng.choice(total, size=min(total, nlist * SAMPLE_PER_CENTROID), replace=False))  # [s]
        bounds = np.concatenate([[0], np.cumsum(sizes)])  # [shards + 1]
        sample = [
            shards[i][3][torch.from_numpy(wanted[(wanted >= bounds[i]) & (wanted < bounds[i + 1])] - bounds[i])]
            for i in range(len(shards))
        ]
        sample_matrix = torch.cat(sample).float().numpy()  # [s, D]
        factory = token_index_factory(sample_matrix.shape[1], nlist, len(sample_matrix))
        index = faiss.index_factory(sample_matrix.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if isinstance(index, faiss.IndexIVFPQ):
            # Polysemous training reorders codes for Hamming filtering, which fast scan never uses: 18x the time.
            index.do_polysemous_training = False
        index.train(sample_matrix)
        self.nlist = nlist
        write_json_atomic(self.directory / INDEX_META, {**read_index_meta(self.directory), "nlist": nlist})
        _write_faiss_atomic(index, path)

    def part_path(self, shard_name: str) -> Path:
        return self.directory / PARTS_DIR / f"{Path(shard_name).stem}.faiss"

    # Searching ----------------------------------------------------------------------------------------------------

    def search(self, queries: Sequence[np.ndarray], params: SearchParams | None = None) -> list[list[SearchHit]]:
        """The best pages of each query matrix `[n_tokens, D]`: candidates from the token index, ranked by exact
        MaxSim. Only pages of completed builds and adds are searched.

        Raises:
            MultiVectorIndexError: an empty index, a query of another dimension, a damaged or missing part.
        """
        params = params or SearchParams()
        searcher = self._open_searcher()
        padded, mask = _query_batch(queries, searcher.dim, str(self.directory))
        return searcher.search(padded, mask, params)

    def exact_search(self, queries: Sequence[np.ndarray], k: int = 10) -> list[list[SearchHit]]:
        """The best pages of each query by exact MaxSim against every indexed page (the reference a search
        approximates; its cost grows with the whole corpus)."""
        searcher = self._open_searcher()
        padded, mask = _query_batch(queries, searcher.dim, str(self.directory))
        return searcher.exact(padded, mask, k)

    def exact_scores(self, queries: Sequence[np.ndarray], keys: Sequence[str]) -> torch.Tensor:
        """Exact MaxSim `[Q, len(keys)]` of query matrices against stored pages named by content key (to rank
        candidates found another way)."""
        searcher = self._open_searcher()
        padded, mask = _query_batch(queries, searcher.dim, str(self.directory))
        entries = np.array([searcher.first_entry[key] for key in keys], dtype=np.int64)
        return searcher.score(padded, mask, entries)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the index holds: `tokens` (stored matrices), `token_index` (codes and ids of the parts)."""
        searcher = self._open_searcher()
        tokens = sum(t.numel() * t.element_size() for _, _, _, t, _ in self.store.matrix_shards())
        codes = searcher.index.ntotal * (searcher.index.code_size + 8)  # + an int64 id per token
        return {"tokens": tokens, "token_index": codes}

    def _open_searcher(self) -> _Searcher:
        if self._searcher is None:
            self.store.refresh()
            self._searcher = _Searcher(self)
        return self._searcher


def read_index_meta(directory: Path) -> dict[str, Any]:
    """The `index.json` of an index folder, checked."""
    path = directory / INDEX_META
    if not path.is_file():
        raise MultiVectorIndexError(f"{directory}: not a multi-vector index (no {INDEX_META}); build one first")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MultiVectorIndexError(f"{path}: not valid JSON ({err})") from err
    needed = {"format", "model", "fingerprint", "pool_factor"}
    if not isinstance(meta, dict) or not needed <= set(meta) or meta["format"] != INDEX_FORMAT:
        raise MultiVectorIndexError(f"{path}: expected format {INDEX_FORMAT} with {sorted(needed)}, got {meta!r:.200}")
    return meta


class _Searcher:
    """The merged token index and the page table of an index, as read once for searching."""

    def __init__(self, index: MultiVectorIndex) -> None:
        self.store = index.store
        pages = index.pages()
        if not pages:
            raise MultiVectorIndexError(f"{index.directory}: the index holds no pages yet; build it first")
        self.dim = int(index.store.dim)
        self.ids_of: dict[str, list[str]] = {}
        for page_id, key in pages.items():
            self.ids_of.setdefault(key, []).append(page_id)
        shards = index.store.matrix_shards()
        self.chunks = {chunk: (tokens, offsets) for chunk, _, _, tokens, offsets in shards}
        # Entries: every stored matrix, numbered chunk after chunk; a token's faiss id names (shard number, row).
        self.entry_chunk = np.concatenate([np.full(len(keys), c) for c, _, keys, _, _ in shards])  # [E]
        self.entry_row = np.concatenate([np.arange(len(keys)) for _, _, keys, _, _ in shards])  # [E]
        self.entry_key = [key for _, _, keys, _, _ in shards for key in keys]
        numbers = [int(SHARD_NAME.match(name).group(1)) for _, name, _, _, _ in shards]
        self.base = np.zeros(max(numbers) + 1, dtype=np.int64)  # shard number -> its first entry
        self.base[numbers] = np.concatenate([[0], np.cumsum([len(keys) for _, _, keys, _, _ in shards])[:-1]])
        self.index = None
        for _, name, keys, tokens, _ in shards:
            part_path = index.part_path(name)
            if not part_path.is_file():
                if any(key in self.ids_of for key in keys):
                    raise MultiVectorIndexError(
                        f"{part_path}: missing, but pages of store shard {name} are in the index; run the build again "
                        "to rebuild it"
                    )
                continue  # a shard of an add that did not finish: none of its pages is searchable yet
            part = _read_faiss(part_path, "part of the token index")
            if part.ntotal != len(tokens) or part.d != self.dim:
                raise MultiVectorIndexError(
                    f"{part_path}: holds {part.ntotal} {part.d}-d token vectors, but store shard {name} has "
                    f"{len(tokens)} {self.dim}-d ones; delete the part and run the build again to rebuild it"
                )
            if self.index is None:
                self.index = part
            else:
                self.index.merge_from(part, 0)
        self.index = _for_fast_scan(self.index)
        # A key computed twice (two writers) appears twice: search keeps its first entry only.
        self.first_entry: dict[str, int] = {}
        for entry, key in enumerate(self.entry_key):
            self.first_entry.setdefault(key, entry)
        self.searchable = np.array(
            [self.first_entry[k] == e and k in self.ids_of for e, k in enumerate(self.entry_key)]
        )

    def _entries(self, faiss_ids: np.ndarray) -> np.ndarray:
        return self.base[faiss_ids >> 32] + (faiss_ids & 0xFFFFFFFF)

    def score(self, queries: torch.Tensor, mask: torch.Tensor, entries: np.ndarray) -> torch.Tensor:
        """Exact MaxSim `[Q, len(entries)]` of queries against stored entries: up to 8192 entries at a time, their
        tokens gathered from their chunks into one packed buffer in the store's dtype (one gather per chunk, no
        padding), scored by one `maxsim_packed` call."""
        scores = torch.empty(queries.shape[0], len(entries))  # [Q, n]
        by_chunk = np.argsort(self.entry_chunk[entries], kind="stable")  # [n] positions grouped by chunk
        for start in range(0, len(entries), 8192):  # bounds the buffer
            positions = by_chunk[start : start + 8192]  # [m]
            chunks = self.entry_chunk[entries[positions]]  # [m], sorted
            gathers = []
            for chunk in np.unique(chunks).tolist():
                tokens, offsets = self.chunks[chunk]
                rows, lengths = _token_rows(offsets, self.entry_row[entries[positions[chunks == chunk]]])
                gathers.append((tokens, torch.from_numpy(rows), lengths))
            lengths = np.concatenate([lengths for _, _, lengths in gathers])  # [m]
            packed = gathers[0][0].new_empty(int(lengths.sum()), self.dim)  # [tokens of the m entries, D]
            at = 0
            for tokens, rows, _ in gathers:
                if tokens.dtype == packed.dtype:
                    torch.index_select(tokens, 0, rows, out=packed[at : at + len(rows)])
                else:  # a shard written with another token dtype
                    packed[at : at + len(rows)] = tokens.index_select(0, rows)
                at += len(rows)
            scores[:, torch.from_numpy(positions)] = maxsim_packed(queries, mask, packed, torch.from_numpy(lengths))
        return scores

    def _hits(self, entries: np.ndarray, scores: torch.Tensor, k: int) -> list[SearchHit]:
        order = torch.argsort(scores, descending=True, stable=True).numpy()
        hits: list[SearchHit] = []
        for position in order:
            for page_id in self.ids_of[self.entry_key[entries[position]]]:
                hits.append(SearchHit(page_id, float(scores[position])))
            if len(hits) >= k:
                break
        return hits[:k]

    def exact(self, queries: torch.Tensor, mask: torch.Tensor, k: int) -> list[list[SearchHit]]:
        # Every chunk's tokens are scored where they lie (a chunk is already packed: nothing is gathered), then the
        # searchable entries are kept.
        scores = torch.cat(
            [
                maxsim_packed(queries, mask, tokens, torch.from_numpy(np.diff(offsets)))  # [Q, chunk's entries]
                for tokens, offsets in self.chunks.values()
            ],
            dim=1,
        )  # [Q, E]
        entries = np.flatnonzero(self.searchable)  # [E']
        scores = scores[:, torch.from_numpy(entries)]  # [Q, E']
        return [self._hits(entries, scores[q], k) for q in range(len(queries))]

    def search(self, queries: torch.Tensor, mask: torch.Tensor, params: SearchParams) -> list[list[SearchHit]]:
        if self.index is None:
            raise MultiVectorIndexError("the token index holds no parts; run the build again")
        tokens = queries[mask].numpy()  # [T, D] every query's real tokens
        owner = mask.nonzero()[:, 0].numpy()  # [T]
        self.index.nprobe = params.nprobe
        similarities, ids = self.index.search(tokens, params.token_k)  # [T, token_k] each
        results = []
        for q in range(len(queries)):
            rows = np.flatnonzero(owner == q)  # this query's tokens
            found = ids[rows] >= 0  # [t, token_k]
            entries = self._entries(ids[rows][found])  # [f]
            keep = self.searchable[entries]
            entries, sims = entries[keep], similarities[rows][found][keep]
            token = np.nonzero(found)[0][keep]  # [f] which query token found it
            candidates = _first_stage(entries, token, sims, params.candidates)
            scores = self.score(queries[q : q + 1], mask[q : q + 1], candidates)[0]  # [c]
            results.append(self._hits(candidates, scores, params.k))
        return results


def _for_fast_scan(index: Any) -> Any:
    """The merged token index as searched: 4-bit PQ codes (`token_index_factory`) repacked into faiss's fast-scan
    layout, blocks of 32 codes read with SIMD lookup tables. The parts are written as plain IVFPQ because merging
    fast-scan parts corrupted memory in faiss 1.15 (at 100k pages); the repacking is a copy (2 s of the 6 s that
    opening the 100k-page index took, one thread). Other codes (SQ8) are searched as they are."""
    import faiss  # heavy optional dependency, see _write_faiss_atomic

    if not isinstance(index, faiss.IndexIVFPQ) or index.pq.nbits != 4:  # read_index gives the concrete class
        return index
    fast = faiss.IndexIVFPQFastScan(index)  # holds a reference to `index`, whose quantiser it shares
    index.reset()  # its codes were copied: only the quantiser is still needed
    return fast


def _first_stage(entries: np.ndarray, token: np.ndarray, sims: np.ndarray, count: int) -> np.ndarray:
    """The `count` entries with the largest sum over query tokens of the best similarity retrieved for them."""
    if not len(entries):
        return entries
    pair = entries.astype(np.int64) * (int(token.max()) + 1) + token  # [f] one number per (entry, query token)
    order = np.lexsort((-sims, pair))  # by pair, best similarity first
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair[order][1:] != pair[order][:-1]
    best_entries, best_sims = entries[order][first], sims[order][first]  # each (entry, token) once, its best
    unique, inverse = np.unique(best_entries, return_inverse=True)
    totals = np.bincount(inverse, weights=best_sims)  # [u]
    if len(unique) <= count:
        return unique
    return unique[np.argpartition(-totals, count - 1)[:count]]


__all__ = [
    "AddReport",
    "MultiVectorIndex",
    "MultiVectorIndexError",
    "SearchHit",
    "SearchParams",
    "auto_nlist",
    "pool_tokens",
    "read_index_meta",
    "synthetic_page",
    "synthetic_query",
    "token_index_factory",
]
