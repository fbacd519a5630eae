"""The one on-disk store of embeddings: vectors keyed by content, for one model, reused across runs and processes.

Every cache of vectors in unime is this store: the teacher's text embeddings of stage 1
(`unime.train.teacher.TeacherCache`), the eval harness's item embeddings (`unime.eval.embedding`) and the
embeddings of hard-negative mining (`unime.data_synth.mining`). Each names its vectors by `content_key` (what
is embedded: text, image bytes, instruction, role) inside a namespace that names the model, usually its
`model_fingerprint`:

```python
store = EmbeddingStore("cache/embeddings", model_fingerprint("runs/stage1"))
store.fill(keys, lambda positions: encode([inputs[i] for i in positions]))  # computes only what is missing
vectors = store.get(keys)  # [N, D] float32
```

Layout (format 2): `<directory>/<namespace slug>/meta.json` (namespace, dimension, format version and the
user's own settings, such as the teacher's `normalize`) and `shard-00000.pt`, `shard-00001.pt`, ... each a
dict `{"keys": [content key, ...], "embeddings": float32 [n, D]}`. A shard is written to a temporary file
beside it and published under the next free number with a hard link, which fails rather than replaces, so
several processes can fill one folder at once and a reader never sees half a shard; an interrupted `fill`
keeps every shard it finished and a rerun computes only what is missing. Shards are memory-mapped when read:
a large store costs page cache, shared by every process on the machine, not private memory. A folder of
another layout (format 1 of the older teacher and eval caches) is refused with an error that says to delete
it; the older mining cache (`chunk-*.npz` files under a 24-character folder) is never read.

Token matrices (`token_matrices=True`, for multi-vector models): a key holds a variable-length `[n_tokens, D]`
matrix instead of one vector. Such a namespace records `"layout": "token_matrices"` in `meta.json` (a folder of
the other layout is refused), and each shard is `{"keys": [n keys], "tokens": [total tokens, D] (float16 by
default), "offsets": int64 [n + 1]}`: key i owns rows `offsets[i]:offsets[i + 1]`, all of a shard's tokens in one
memory-mapped tensor. `fill_matrices` / `get_matrices` are `fill` / `get` for them, with the same atomic shards,
resume and sharing; `matrix_shards` hands an index each shard's tokens whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unime.atomic import create_temporary, write_json_atomic
from unime.errors import UnimeError

META_NAME = "meta.json"
FORMAT_VERSION = 2
SHARD_NAME = re.compile(r"^shard-(\d+)\.pt$")
VECTORS, TOKEN_MATRICES = "vectors", "token_matrices"
"""The two layouts of a namespace: one `[D]` vector per key, or one `[n_tokens, D]` matrix per key."""

Compute = Callable[[list[int]], "np.ndarray | torch.Tensor"]
"""Positions into the keys given to `fill` -> `[len(positions), D]` vectors, row i for position i."""

ComputeMatrices = Callable[[list[int]], "Sequence[np.ndarray | torch.Tensor]"]
"""Positions into the keys given to `fill_matrices` -> one `[n_tokens_i, D]` matrix per position, in order."""


class EmbeddingStoreError(UnimeError, ValueError):
    """A store on disk does not fit what is asked of it (another model, dimension or layout, a damaged shard), or
    an encoder returned unusable vectors; the message names the folder, the shard or the input."""


# Content: keys and fingerprints ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=200_000)
def _file_digest(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    del size, mtime_ns, ctime_ns  # part of the memo key only: a rewritten file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, memoised in this process by path, size and times (a file rewritten
    in place gets a new modification or change time, and is hashed again)."""
    stat = os.stat(path)
    return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def content_key(
    *,
    text: str | None = None,
    image: str | os.PathLike | bytes | None = None,
    instruction: str | None = None,
    role: str | None = None,
) -> str:
    """The key of what is embedded: equal for an equal text, equal image bytes, instruction and role.

    Args:
        text: the text, if any.
        image: an image file (keyed by its bytes, so a copy under another name has the same key) or its bytes.
        instruction: the instruction the model applies, if any (another instruction gives another vector).
        role: "query" or "document", when the model applies the role's own instruction.

    Returns:
        A sha256 hex digest: of the text's UTF-8 bytes for a text alone (the teacher's keys), else of a byte
        0xFF, which UTF-8 never contains, followed by the canonical JSON of the parts (so the two never collide).
    """
    if image is None and instruction is None and role is None:
        if text is None:
            raise ValueError("content_key needs a text, an image or both")
        # surrogatepass: a lone surrogate (from a badly decoded file) must still get a key rather than crash a run.
        return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
    if isinstance(image, bytes):
        image = hashlib.sha256(image).hexdigest()
    elif isinstance(image, (str, os.PathLike)):
        image = file_digest(image)
    elif image is not None:
        raise TypeError(f"content_key: image must be a file path or bytes, got a {type(image).__name__}")
    parts = {"text": text, "image": image, "instruction": instruction, "role": role}
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    return hashlib.sha256(b"\xff" + canonical).hexdigest()


def model_fingerprint(name_or_path: str | os.PathLike) -> str:
    """A model's identity by content: equal fingerprints mean equal files, so equal vectors for equal inputs.

    A local directory (or file) is hashed over its files' relative names and bytes, each file's digest memoised
    by `file_digest` (touching a file without changing it keeps the fingerprint; changing one byte changes it);
    a hub name without a local directory is fingerprinted by its name.
    """
    path = Path(name_or_path)
    digest = hashlib.sha256()
    if path.is_dir():
        digest.update(b"directory\0")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\0".encode())
    elif path.is_file():
        digest.update(f"file\0{file_digest(path)}".encode())
    else:
        digest.update(f"name\0{name_or_path}".encode())
    return digest.hexdigest()


def namespace_slug(namespace: str) -> str:
    """The folder name of a namespace: every run of other characters than `[A-Za-z0-9._-]` becomes `--`
    (`sentence-transformers/all-MiniLM-L6-v2` -> `sentence-transformers--all-MiniLM-L6-v2`)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", namespace).strip(".-")
    if not slug:
        raise ValueError(f"namespace {namespace!r} gives no usable folder name")
    return slug


def checked_matrices(
    output: Any, count: int, *, source: str, label: Callable[[int], str] = lambda i: f"input {i}"
) -> list[np.ndarray]:
    """An encoder's token matrices as `count` float32 `[n_tokens_i, D]` arrays of one D, or an
    `EmbeddingStoreError` naming `source` and the input (a matrix without a token, of another dimension, or with
    non-finite values)."""
    matrices = list(output) if isinstance(output, (list, tuple)) else None
    if matrices is None or len(matrices) != count:
        got = f"{len(matrices)} matrices" if matrices is not None else f"a {type(output).__name__}"
        raise EmbeddingStoreError(f"{source} returned {got} for {count} inputs; expected a list of {count} matrices")
    checked = []
    for i, matrix in enumerate(matrices):
        if isinstance(matrix, torch.Tensor):
            matrix = matrix.detach().to("cpu", torch.float32).numpy()
        array = np.asarray(matrix, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] == 0 or (checked and array.shape[1] != checked[0].shape[1]):
            raise EmbeddingStoreError(
                f"{source} returned shape {tuple(array.shape)} for {label(i)}; expected a non-empty [n_tokens, dim] "
                "matrix of the batch's dim"
            )
        if not np.isfinite(array).all():
            raise EmbeddingStoreError(f"{source} returned non-finite values for {label(i)}")
        checked.append(array)
    return checked


def checked_vectors(
    output: Any,
    count: int,
    *,
    source: str,
    label: Callable[[int], str] = lambda i: f"input {i}",
    unit: str = "inputs",
) -> np.ndarray:
    """An encoder's output as float32 `[count, D]`, or an `EmbeddingStoreError` naming `source` and the input.

    Args:
        output: numpy array or torch tensor (any float dtype, any device).
        count: how many inputs were encoded.
        source: who computed it, for the message (e.g. "the teacher encoder").
        label: names input i in the message (e.g. `lambda i: f"text {texts[i]!r}"`).
        unit: what the inputs are, in the message ("texts", "items").
    """
    if isinstance(output, torch.Tensor):
        vectors = output.detach().to("cpu", torch.float32).numpy()
    else:
        vectors = np.asarray(output, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != count:
        raise EmbeddingStoreError(
            f"{source} returned shape {tuple(vectors.shape)} for {count} {unit}; expected [{count}, dim]"
        )
    finite = np.isfinite(vectors).all(axis=1)  # [count]
    if not finite.all():
        raise EmbeddingStoreError(f"{source} returned non-finite values for {label(int(np.flatnonzero(~finite)[0]))}")
    return vectors


# The store ------------------------------------------------------------------------------------------------------


class EmbeddingStore:
    """Vectors by content key for one namespace (one model), in a folder shared across runs and processes.

    `fill` computes the vectors of the keys not stored yet (each distinct key once, `batch_size` at a time) and
    writes a shard every `shard_size` new vectors, plus the remainder at the end; when interrupted by an
    exception (Ctrl-C included) it also writes what it had computed before raising, and a kill loses at most one
    unwritten shard. `get` returns stored vectors. A new store on the same folder and namespace reuses
    everything there, and picks up shards other processes write meanwhile.

    Args:
        directory: the store's root; this namespace's shards go to `<directory>/<namespace_slug(namespace)>/`.
            None keeps the vectors in this process's memory only.
        namespace: what the vectors are of, usually a `model_fingerprint` or a model's name.
        shard_size: how many new vectors make a shard (the most work a kill can lose).
        settings: settings the vectors depend on beyond the namespace (e.g. `{"normalize": True}`), recorded in
            `meta.json`; a folder written with other settings is refused.
        token_matrices: hold one `[n_tokens, D]` matrix per key (`fill_matrices`, `get_matrices`) instead of one
            vector; a folder of the other layout is refused.
        token_dtype: how token matrices are stored (float16 halves the disk and page cache; reads give float32).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None,
        namespace: str,
        *,
        shard_size: int = 4096,
        settings: Mapping[str, Any] | None = None,
        token_matrices: bool = False,
        token_dtype: torch.dtype = torch.float16,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty name, got {namespace!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.namespace = namespace
        self.root = Path(directory) / namespace_slug(namespace) if directory is not None else None
        self.shard_size = shard_size
        self.settings = dict(settings or {})
        self.layout = TOKEN_MATRICES if token_matrices else VECTORS
        self.token_dtype = token_dtype
        self._dim: int | None = None
        # One [n, D] tensor per shard read (memory-mapped) or kept in memory; for token matrices [tokens, D], with
        # the shard's [n + 1] offsets and name (None in memory) beside it.
        self._chunks: list[torch.Tensor] = []
        self._offsets: list[np.ndarray] = []
        self._chunk_names: list[str | None] = []
        self._chunk_keys: list[list[str]] = []
        self._index: dict[str, tuple[int, int]] = {}  # key -> (chunk, row)
        self._loaded: set[str] = set()  # names of the shard files already read
        self._read_meta()
        self.refresh()

    @property
    def dim(self) -> int | None:
        """The vectors' dimension, None while nothing was stored or computed yet."""
        return self._dim

    def __len__(self) -> int:
        """The number of distinct keys stored."""
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is stored (among the shards this instance has read)."""
        return key in self._index

    def __repr__(self) -> str:
        where = str(self.root) if self.root is not None else "<memory>"
        return f"EmbeddingStore({where!r}, namespace={self.namespace!r}, keys={len(self)}, dim={self._dim})"

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Positions of the keys not stored, after reading the shards other processes wrote since."""
        if any(key not in self._index for key in keys):
            self.refresh()
        return [i for i, key in enumerate(keys) if key not in self._index]

    def fill(
        self,
        keys: Sequence[str],
        compute: Compute,
        *,
        batch_size: int = 64,
        source: str = "the encoder",
        label: Callable[[int], str] | None = None,
        unit: str = "inputs",
    ) -> int:
        """Compute and store the vectors of every key not stored yet.

        Args:
            keys: content keys; repeats and stored keys are skipped.
            compute: positions into `keys` -> their vectors (see `Compute`); called with at most `batch_size`
                positions, each the first position of a distinct missing key.
            batch_size: positions per `compute` call.
            source: who computes, for error messages.
            label: names the input at a position in error messages; default "input <position>".
            unit: what the inputs are, in error messages ("texts", "items").

        Returns:
            How many vectors were computed (distinct keys that were not stored).

        Raises:
            EmbeddingStoreError: when `compute` returns another dimension than the store holds, a wrong number of
                rows, or non-finite values.
        """
        self._require_layout(VECTORS, "fill")
        todo = self._todo(keys, batch_size)
        name = label or (lambda position: f"input {position}")
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []  # computed batches not yet in a shard
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                vectors = checked_vectors(
                    compute(batch), len(batch), source=source, label=lambda i, batch=batch: name(batch[i]), unit=unit
                )
                self._set_dim(vectors.shape[1], source)
                pending.append(vectors)
                pending_keys.extend(keys[position] for position in batch)
                while len(pending_keys) >= self.shard_size:
                    pending_keys, pending = self._write_head(pending_keys, pending, self.shard_size)
        except BaseException:
            # Keep what was computed before the failure (or Ctrl-C): a rerun then computes only the rest.
            if pending_keys:
                self._write_head(pending_keys, pending, len(pending_keys))
            raise
        if pending_keys:
            self._write_head(pending_keys, pending, len(pending_keys))
        return len(todo)

    def fill_matrices(
        self,
        keys: Sequence[str],
        compute: ComputeMatrices,
        *,
        batch_size: int = 64,
        source: str = "the encoder",
        label: Callable[[int], str] | None = None,
    ) -> int:
        """`fill` for a store of token matrices: compute and store the `[n_tokens, D]` matrix of every key not
        stored yet, a shard every `shard_size` new keys; an interrupted fill keeps what it computed.

        Args:
            keys: content keys; repeats and stored keys are skipped.
            compute: positions into `keys` -> one matrix per position (see `ComputeMatrices`).
            batch_size: positions per `compute` call.
            source: who computes, for error messages.
            label: names the input at a position in error messages; default "input <position>".

        Returns:
            How many matrices were computed.

        Raises:
            EmbeddingStoreError: a matrix without a token, of another dimension than the store holds, or with
                non-finite values (naming the input), or a wrong number of matrices.
        """
        self._require_layout(TOKEN_MATRICES, "fill_matrices")
        todo = self._todo(keys, batch_size)
        name = label or (lambda position: f"input {position}")
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []  # computed matrices not yet in a shard, one per pending key
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                matrices = checked_matrices(
                    compute(batch), len(batch), source=source, label=lambda i, batch=batch: name(batch[i])
                )
                self._set_dim(matrices[0].shape[1], source)
                pending += matrices
                pending_keys += [keys[position] for position in batch]
                while len(pending_keys) >= self.shard_size:
                    self._store_matrices(pending_keys[: self.shard_size], pending[: self.shard_size])
                    pending_keys, pending = pending_keys[self.shard_size :], pending[self.shard_size :]
        except BaseException:
            # Keep what was computed before the failure (or Ctrl-C): a rerun then computes only the rest.
            if pending_keys:
                self._store_matrices(pending_keys, pending)
            raise
        if pending_keys:
            self._store_matrices(pending_keys, pending)
        return len(todo)

    def get_matrices(self, keys: Sequence[str]) -> list[np.ndarray]:
        """The stored token matrices of `keys` (repeats allowed): one float32 `[n_tokens_i, D]` copy per key.

        Raises:
            KeyError: naming the first key that is not stored.
        """
        self._require_layout(TOKEN_MATRICES, "get_matrices")
        self._check_stored(keys)
        return [self.matrix_at(*self._index[key]) for key in keys]

    def matrix_at(self, chunk: int, row: int) -> np.ndarray:
        """The float32 `[n_tokens, D]` matrix of row `row` of chunk `chunk` (see `matrix_shards`)."""
        start, stop = self._offsets[chunk][row], self._offsets[chunk][row + 1]
        return self._chunks[chunk][start:stop].numpy().astype(np.float32)

    def matrix_shards(self) -> list[tuple[int, str | None, list[str], torch.Tensor, np.ndarray]]:
        """Every chunk of token matrices read so far, in reading order: (chunk number, shard file name or None in
        memory, its keys, its `[tokens, D]` memory-mapped tokens, its int64 `[n + 1]` offsets). A key stored twice
        (by two concurrent writers) appears in both chunks."""
        self._require_layout(TOKEN_MATRICES, "matrix_shards")
        return [
            (chunk, self._chunk_names[chunk], self._chunk_keys[chunk], self._chunks[chunk], self._offsets[chunk])
            for chunk in range(len(self._chunks))
        ]

    def location(self, key: str) -> tuple[int, int]:
        """(chunk, row) of a stored key."""
        return self._index[key]

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """The stored vectors of `keys` (repeats allowed), row i for key i: `[N, D]` float32, a copy.

        Raises:
            KeyError: naming the first key that is not stored (after reading shards other processes wrote).
        """
        self._require_layout(VECTORS, "get")
        self._check_stored(keys)
        out = np.empty((len(keys), self._dim or 0), dtype=np.float32)  # [N, D]
        if not len(keys):
            return out
        chunks = np.array([self._index[key][0] for key in keys])  # [N]
        rows = torch.tensor([self._index[key][1] for key in keys])  # [N]
        for chunk in np.unique(chunks).tolist():
            where = chunks == chunk  # [N]
            out[where] = self._chunks[chunk][rows[torch.from_numpy(where)]].numpy()
        return out

    def get_or_compute(self, keys: Sequence[str], compute: Compute, **fill_kwargs: Any) -> np.ndarray:
        """`fill` then `get`: the vectors of `keys`, computing what is missing."""
        self.fill(keys, compute, **fill_kwargs)
        return self.get(keys)

    def _todo(self, keys: Sequence[str], batch_size: int) -> list[int]:
        """The first position of each distinct missing key, in first-seen order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        first: dict[str, int] = {}  # missing key -> its first position
        for position in self.missing(keys):
            first.setdefault(keys[position], position)
        return list(first.values())

    def _check_stored(self, keys: Sequence[str]) -> None:
        for position in self.missing(keys)[:1]:
            where = self.root if self.root is not None else "memory"
            raise KeyError(f"key {position} ({keys[position]}) is not in the embedding store {where}")

    def _require_layout(self, layout: str, method: str) -> None:
        if self.layout != layout:
            raise EmbeddingStoreError(f"{self!r} holds {self.layout}; {method} is for a store of {layout}")

    # Reading ------------------------------------------------------------------------------------------------------

    def _read_meta(self) -> None:
        if self.root is None or not (self.root / META_NAME).is_file():
            return
        path = self.root / META_NAME
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EmbeddingStoreError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("dim"), int):
            raise EmbeddingStoreError(f"{path}: expected an object with an integer 'dim', got {meta!r:.200}")
        if meta.get("layout", VECTORS) != self.layout:
            raise EmbeddingStoreError(
                f"{path}: this folder holds {meta.get('layout', VECTORS)}, but {self.layout} were asked; use another "
                "directory"
            )
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise EmbeddingStoreError(
                f"{path}: this folder holds embeddings in layout {version!r}, not the layout {FORMAT_VERSION} this "
                f"unime reads; delete {self.root} to recompute them"
            )
        if meta.get("namespace") != self.namespace:
            # Two namespaces with one slug (e.g. `a/b` and `a b`) must not share vectors.
            raise EmbeddingStoreError(
                f"{path}: this folder holds vectors of {meta.get('namespace')!r}, not {self.namespace!r}; use "
                "another directory"
            )
        for name, value in self.settings.items():
            if meta.get("settings", {}).get(name) != value:
                raise EmbeddingStoreError(
                    f"{path}: this folder holds vectors made with {name}={meta.get('settings', {}).get(name)!r}, "
                    f"but {name}={value!r} was asked; use another directory"
                )
        self._dim = meta["dim"]

    def refresh(self) -> None:
        """Read every shard not read yet (this process's own are known; others may have written more)."""
        if self.root is None or not self.root.is_dir():
            return
        names = sorted(p.name for p in self.root.iterdir() if SHARD_NAME.match(p.name) and p.name not in self._loaded)
        for name in names:
            self._load_shard(self.root / name)

    def _load_shard(self, path: Path) -> None:
        try:
            # mmap: rows are paged in on `get`, and the page cache is shared by every process on the machine.
            shard: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise EmbeddingStoreError(
                f"{path}: cannot read this embedding shard ({err}); delete it to recompute"
            ) from err
        if self.layout == TOKEN_MATRICES:
            self._load_matrix_shard(path, shard)
            return
        keys = shard.get("keys") if isinstance(shard, dict) else None
        embeddings = shard.get("embeddings") if isinstance(shard, dict) else None
        if (
            not isinstance(keys, list)
            or not isinstance(embeddings, torch.Tensor)
            or embeddings.dim() != 2
            or embeddings.shape[0] != len(keys)
        ):
            raise EmbeddingStoreError(
                f"{path}: expected {{'keys': [n str], 'embeddings': [n, dim] tensor}}; delete it to recompute"
            )
        self._set_dim(embeddings.shape[1], f"shard {path}")
        self._add_chunk(keys, embeddings.to(torch.float32))
        self._loaded.add(path.name)

    def _load_matrix_shard(self, path: Path, shard: Any) -> None:
        keys = shard.get("keys") if isinstance(shard, dict) else None
        tokens = shard.get("tokens") if isinstance(shard, dict) else None
        offsets = shard.get("offsets") if isinstance(shard, dict) else None
        well_formed = (
            isinstance(keys, list)
            and isinstance(tokens, torch.Tensor)
            and tokens.dim() == 2
            and isinstance(offsets, torch.Tensor)
            and offsets.shape == (len(keys) + 1,)
        )
        if well_formed:
            bounds = offsets.numpy().astype(np.int64)  # [n + 1]
            well_formed = bounds[0] == 0 and bounds[-1] == tokens.shape[0] and bool((np.diff(bounds) > 0).all())
        if not well_formed:
            raise EmbeddingStoreError(
                f"{path}: expected {{'keys': [n str], 'tokens': [total, dim] tensor, 'offsets': [n + 1] increasing "
                "from 0 to total}; delete it to recompute"
            )
        self._set_dim(tokens.shape[1], f"shard {path}")
        self._add_chunk(keys, tokens, bounds, path.name)
        self._loaded.add(path.name)

    def _add_chunk(
        self, keys: list[str], embeddings: torch.Tensor, offsets: np.ndarray | None = None, name: str | None = None
    ) -> None:
        chunk = len(self._chunks)
        self._chunks.append(embeddings)
        self._chunk_keys.append(keys)
        self._chunk_names.append(name)
        if offsets is not None:
            self._offsets.append(offsets)
        for row, key in enumerate(keys):
            # A key computed by two concurrent writers sits in two shards; the first one read wins.
            self._index.setdefault(key, (chunk, row))

    def _set_dim(self, dim: int, source: str) -> None:
        if self._dim is None:
            self._dim = dim
            if self.root is not None:
                self.root.mkdir(parents=True, exist_ok=True)
                meta = {
                    "namespace": self.namespace,
                    "dim": dim,
                    "settings": self.settings,
                    "format_version": FORMAT_VERSION,
                    **({"layout": self.layout} if self.layout != VECTORS else {}),
                }
                write_json_atomic(self.root / META_NAME, meta)
        elif dim != self._dim:
            where = self.root if self.root is not None else "the in-memory store"
            raise EmbeddingStoreError(
                f"{where}: this store holds {self._dim}-d vectors of {self.namespace!r}, but {source} gives "
                f"{dim}-d ones; use another directory (or delete this one) for a different model"
            )

    # Writing ------------------------------------------------------------------------------------------------------

    def _write_head(self, keys: list[str], batches: list[np.ndarray], n: int) -> tuple[list[str], list[np.ndarray]]:
        """Store the first `n` pending vectors (a shard on disk); return what remains pending."""
        vectors = np.concatenate(batches)  # [pending, D]
        head, tail = torch.from_numpy(vectors[:n].copy()), vectors[n:].copy()  # [n, D], [pending - n, D]
        if self.root is None:
            self._add_chunk(keys[:n], head)
        else:
            self._write_shard({"keys": list(keys[:n]), "embeddings": head.contiguous()})
        return keys[n:], ([tail] if len(tail) else [])

    def _store_matrices(self, keys: list[str], matrices: list[np.ndarray]) -> None:
        """Store token matrices as one chunk: a shard on disk, or kept in memory."""
        tokens = torch.from_numpy(np.concatenate(matrices)).to(self.token_dtype)  # [total, D]
        offsets = np.concatenate([[0], np.cumsum([len(m) for m in matrices])]).astype(np.int64)  # [n + 1]
        if self.root is None:
            self._add_chunk(list(keys), tokens, offsets)
        else:
            self._write_shard({"keys": list(keys), "tokens": tokens.contiguous(), "offsets": torch.from_numpy(offsets)})

    def _write_shard(self, payload: dict[str, Any]) -> None:
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(self.root / "shard.pt")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            path = self._publish(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        self._load_shard(path)

    def _publish(self, tmp: Path) -> Path:
        """Give a complete temporary shard the next free shard name, atomically, never replacing a shard."""
        assert self.root is not None
        number = 1 + max((int(m.group(1)) for p in self.root.iterdir() if (m := SHARD_NAME.match(p.name))), default=-1)
        while True:
            path = self.root / f"shard-{number:05d}.pt"
            try:
                # A hard link appears under its final name in one step, like a rename, but fails instead of
                # overwriting when another process took the number meanwhile.
                os.link(tmp, path)
                return path
            except FileExistsError:
                number += 1
            except OSError:
                # A file system without hard links: fall back to a rename (atomic, but may race another writer).
                if path.exists():
                    number += 1
                    continue
                os.replace(tmp, path)
                return path
