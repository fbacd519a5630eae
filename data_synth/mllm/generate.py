"""The MLLM generator (mmE5 style): one generation pass per real photo, written as sharded training rows.

For each photo of a folder (in key order, restricted to this `--shard i/N`):
1. skip it if an earlier run already wrote or rejected its key (resume);
2. reject it if it cannot be decoded ("unreadable_image") or nearly duplicates an earlier photo
   ("near_duplicate_image", by dHash over the whole folder);
3. otherwise send one request: the photo plus the versioned prompt with a suggested task, combination and
   language; the model describes the photo, picks the plan, writes instruction, query, positive and hard
   negative, evaluates and revises them, all in one JSON answer;
4. check the answer against the schema and the combination (`answer.parse_answer`): a bad one is rejected
   with its reason; a good one becomes a training row (`rows.training_row`), unless its texts duplicate an
   earlier row's ("near_duplicate").

Results are committed in key order whatever order the backend finishes them in, so a run killed and resumed
writes exactly what an uninterrupted run writes. Backend failures (timeouts, HTTP errors, a dead engine) are
counted in the manifest's `details.last_run.failed` and are not recorded as done: the next run retries them.
`details.last_run.rejection_examples` shows the start of the first rejected answer of each reason.

With `mode="pages"` (the ColPali / mmE5 way for document pages), step 3 asks instead for `queries_per_page`
queries a user would type to find the page, each with the fact it asks about (`answer.parse_page_answer`), and
step 4 writes one row per query (text -> page image, `rows.page_query_row`) under the key `<page key>#<i>`. The
accepted answer, facts included, is first saved as `facts/<hash>.json`: a run killed between a page's rows
finishes that page from the file instead of asking again, so that resuming writes what an uninterrupted run
writes here too.

With `engine: ray` (`ray_generation.RayBackend`, a `backend.PhotoBackend`) step 3 runs in the actors of a Ray
cluster, which read the photos themselves; everything else, the writing included, happens here as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from unime.atomic import atomic_write
from unime.data_synth.manifest import Manifest, ShardedJsonlWriter
from unime.data_synth.mllm.answer import (
    MAX_QUERY_CHARS,
    PageAnswer,
    PageQuery,
    Rejected,
    answer_schema,
    page_answer_schema,
    parse_answer,
    parse_page_answer,
)
from unime.data_synth.mllm.backend import (
    Backend,
    GenerationRequest,
    GenerationResult,
    PhotoBackend,
    PhotoRequest,
    read_request,
)
from unime.data_synth.mllm.images import (
    Photo,
    difference_hash,
    find_near_duplicates,
    list_photos,
    open_photo,
    second_view,
)
from unime.data_synth.mllm.plan import PlanChoices, sides_of, suggest_plan
from unime.data_synth.mllm.prompting import (
    PAGE_PLACEHOLDERS,
    PAGES_PROMPT_VERSION,
    PROMPT_VERSION,
    TASK_PLACEHOLDERS,
    load_prompt,
)
from unime.data_synth.mllm.rows import page_query_row, page_query_signature, text_signature, training_row
from unime.data_synth.sharding import parse_shard
from unime.errors import ConfigError

UNREADABLE_IMAGE = "unreadable_image"
NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
VIEWS_DIR = "views"
FACTS_DIR = "facts"


@dataclass
class GenerateConfig:
    """One generation run. (Not frozen: the command's settings extend it and the data jobs' `EngineSettings`.)"""

    image_dir: str
    """The folder of photos (searched recursively)."""
    out_dir: str
    """Where the shards, `manifest.json` and second views go; an existing run there is resumed."""
    mode: Literal["tasks", "pages"] = "tasks"
    """"tasks": mmE5 examples from photos (a task, a modality combination, a hard negative); "pages": for
    images of document pages, `queries_per_page` queries that find each page (ColPali / mmE5 VisDoc)."""
    queries_per_page: int = 3
    """With `mode: pages`: queries asked per page, each one row."""
    max_query_chars: int = MAX_QUERY_CHARS
    """With `mode: pages`: the longest query the answer's schema allows (a fact: twice that; the page's
    description: five times): guided decoding then closes every string, and longer answers are rejected."""
    prompt: str | None = None
    """A packaged prompt name or a prompt file path; None: the mode's packaged prompt (`mme5_v1` for tasks,
    `visdoc_queries_v1` for pages)."""
    choices: PlanChoices = field(default_factory=PlanChoices)
    """Allowed tasks, combinations and languages (the pages mode uses the languages only)."""
    seed: int = 0
    """Seeds the suggested plans (and the backend's sampling)."""
    shard: str | None = None
    """`"i/N"`: generate only the photos whose key this shard owns (machines that share no Ray cluster; with
    `engine: ray` the cluster shares the work)."""
    min_score: int = 4
    """Lowest self-evaluation score (1-5) that is kept."""
    max_image_side: int = 1024
    """Photos are downscaled to this longer side before they are sent."""
    near_duplicate_bits: int = 4
    """Photos whose dHashes differ in at most this many of 64 bits are near-duplicates (-1: keep all)."""
    records_per_shard: int = 1000
    """Kept rows per shard file."""
    limit: int | None = None
    """Generate for at most this many of the shard's photos (in key order)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_score <= 5:
            raise ConfigError(f"min_score must be 1-5, got {self.min_score}")
        if self.max_image_side < 28:
            raise ConfigError(f"max_image_side must be >= 28, got {self.max_image_side}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.mode not in ("tasks", "pages"):
            raise ConfigError(f"mode must be 'tasks' or 'pages', got {self.mode!r}")
        if self.queries_per_page < 1:
            raise ConfigError(f"queries_per_page must be >= 1, got {self.queries_per_page}")
        if self.max_query_chars < 1:
            raise ConfigError(f"max_query_chars must be >= 1, got {self.max_query_chars}")

    @property
    def pages(self) -> bool:
        return self.mode == "pages"


def generate_dataset(config: GenerateConfig, backend: Backend | PhotoBackend, *, backend_kind: str = "") -> Manifest:
    """Run (or resume) one generation job; returns its manifest (also saved as `out_dir/manifest.json`). With a
    `PhotoBackend` (on Ray) the workers read the photos; the writing is the same."""
    image_dir, out_dir = Path(config.image_dir), Path(config.out_dir)
    if not image_dir.is_dir():
        raise ConfigError(f"image folder {str(image_dir)!r} does not exist")
    photos = list_photos(image_dir)
    if not photos:
        raise ConfigError(f"image folder {str(image_dir)!r} holds no image files")
    shard = parse_shard(config.shard)
    if config.pages:
        prompt = load_prompt(config.prompt or PAGES_PROMPT_VERSION, PAGE_PLACEHOLDERS)
        schema = page_answer_schema(config.choices, config.queries_per_page, config.max_query_chars)
    else:
        prompt = load_prompt(config.prompt or PROMPT_VERSION, TASK_PLACEHOLDERS)
        schema = answer_schema(config.choices)

    unreadable, hashes = set(), {}
    for photo in photos:  # every photo, not only this shard's: near-duplicate decisions must agree across shards
        try:
            hashes[photo.key] = difference_hash(open_photo(photo.path))
        except OSError:
            unreadable.add(photo.key)
    duplicates = find_near_duplicates(hashes, config.near_duplicate_bits)
    owned = [photo for photo in photos if shard.owns(photo.key)]
    if config.limit is not None:
        owned = owned[: config.limit]

    manifest = Manifest(
        prompt_version=prompt.version,
        model=backend.name,
        seed=config.seed,
        # The tasks mode records no settings (folders written before the pages mode resume as they did); the
        # pages mode's keys depend on queries_per_page (and what it keeps on its limits), so a folder resumes only
        # with the same.
        settings=_pages_settings(config) if config.pages else {},
        details={
            "generator": "mllm",
            "backend": backend_kind,
            "shard": str(shard),
            "photos_in_folder": len(photos),
            "photos_in_shard": len(owned),
            "choices": {key: list(value) for key, value in asdict(config.choices).items()},
            "min_score": config.min_score,
            "near_duplicate_bits": config.near_duplicate_bits,
        },
    )
    run = _Run(config, out_dir, prompt, schema)
    with ShardedJsonlWriter(out_dir, manifest=manifest, records_per_shard=config.records_per_shard) as writer:
        todo: list[Photo] = []
        for photo in owned:
            if run.done(photo, writer):
                continue
            if photo.key in unreadable:
                writer.reject(photo.key, UNREADABLE_IMAGE)
            elif photo.key in duplicates:
                writer.reject(photo.key, NEAR_DUPLICATE_IMAGE)
            elif not run.finish_saved_page(photo, writer):
                todo.append(photo)
        run.generate(todo, backend, writer)
        manifest.details["last_run"] = {
            **run.stats(),
            "engine": "ray" if isinstance(backend, PhotoBackend) else "local",
        }
    if not config.pages:
        manifest.details["kept_by_combination"] = _kept_by_combination(writer.shard_paths)
    manifest.save(out_dir)
    return manifest


class _Run:
    """One pass over the photos still to do: requests out, results committed in key order."""

    def __init__(self, config: GenerateConfig, out_dir: Path, prompt, schema: dict):
        self.config = config
        self.out_dir = out_dir
        self.prompt = prompt
        self.schema = schema
        self.failed: Counter[str] = Counter()
        self.late_unreadable: set[str] = set()
        self.requests = 0
        self.retries = 0
        self.examples: dict[str, dict[str, str]] = {}
        """The first rejected answer of each reason in this run: what the model said, to see why."""

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "failed": dict(sorted(self.failed.items())),
            "rejection_examples": dict(sorted(self.examples.items())),
        }

    def done(self, photo: Photo, writer: ShardedJsonlWriter) -> bool:
        """Whether an earlier run recorded `photo` (a page: rejected, or every one of its query rows)."""
        if photo.key in writer or not self.config.pages:
            return photo.key in writer
        return all(_query_key(photo.key, index) in writer for index in range(self.config.queries_per_page))

    def finish_saved_page(self, photo: Photo, writer: ShardedJsonlWriter) -> bool:
        """Write the rows of a page whose answer a killed run saved but did not write in full; False if none."""
        path = self._facts_path(photo)
        if not self.config.pages or not path.is_file():
            return False
        saved = json.loads(path.read_text(encoding="utf-8"))
        queries = tuple(PageQuery(**query) for query in saved["queries"])
        self._write_page_rows(photo, PageAnswer(saved["description"], saved["language"], queries), writer)
        return True

    def _photo_request(self, photo: Photo) -> PhotoRequest:
        plan = suggest_plan(photo.key, self.config.seed, self.config.choices)
        if self.config.pages:
            text = self.prompt.render_pages(plan.language, self.config.choices, self.config.queries_per_page)
        else:
            text = self.prompt.render(plan, self.config.choices)
        return PhotoRequest(photo.key, text, str(photo.path.resolve()))

    def _requests(self, todo: list[Photo]) -> Iterator[GenerationRequest]:
        for photo in todo:
            try:
                request = read_request(self._photo_request(photo), self.config.max_image_side)
            except OSError:  # changed since it was checked: counted when its turn comes
                self.late_unreadable.add(photo.key)
                continue
            self.requests += 1
            yield request

    def _results(self, todo: list[Photo], backend: Backend | PhotoBackend) -> Iterator[GenerationResult]:
        if not isinstance(backend, PhotoBackend):
            return backend.generate(self._requests(todo), self.schema)
        # The workers read the photos: a photo one cannot read comes back as a failure, retried by the next run
        # (this process read every photo moments ago, so the worker most likely does not see the folder).
        self.requests += len(todo)
        return backend.generate_photos(
            [self._photo_request(photo) for photo in todo], self.schema, self.config.max_image_side
        )

    def generate(self, todo: list[Photo], backend: Backend | PhotoBackend, writer: ShardedJsonlWriter) -> None:
        arrived: dict[str, GenerationResult] = {}
        position = 0

        def commit_ready(final: bool) -> None:
            nonlocal position
            while position < len(todo):
                photo = todo[position]
                if photo.key in self.late_unreadable:
                    writer.reject(photo.key, UNREADABLE_IMAGE)
                elif photo.key in arrived:
                    self._commit(photo, arrived.pop(photo.key), writer)
                elif final:
                    self.failed["no_result"] += 1
                else:
                    return
                position += 1

        for result in self._results(todo, backend):
            self.retries += max(0, result.attempts - 1)
            arrived[result.key] = result
            commit_ready(final=False)
        commit_ready(final=True)

    def _commit(self, photo: Photo, result: GenerationResult, writer: ShardedJsonlWriter) -> None:
        if result.failure is not None or result.text is None:
            self.failed[result.failure or "no_answer"] += 1
            return
        config = self.config
        try:
            if config.pages:
                page = parse_page_answer(
                    result.text,
                    config.choices,
                    config.queries_per_page,
                    truncated=result.truncated,
                    max_query_chars=config.max_query_chars,
                )
            else:
                answer = parse_answer(
                    result.text, config.choices, min_score=config.min_score, truncated=result.truncated
                )
        except Rejected as rejected:
            if writer.reject(photo.key, rejected.reason) and rejected.reason not in self.examples:
                self.examples[rejected.reason] = {
                    "key": photo.key,
                    "detail": rejected.detail[:200],
                    "answer_start": result.text[:200],
                }
            return
        if config.pages:
            self._save_facts(photo, page)
            self._write_page_rows(photo, page, writer)
            return
        sides = sides_of(answer.combination)
        view = None
        if sides.query_image and sides.candidate_image:
            try:
                view = self._write_view(photo)
            except OSError:
                writer.reject(photo.key, UNREADABLE_IMAGE)
                return
        row = training_row(answer, self._photo_ref(photo), view)
        writer.write(photo.key, row, signature=text_signature(row))

    def _photo_ref(self, photo: Photo) -> str:
        """The photo's path as it goes into a row: relative to the shard folder."""
        return Path(os.path.relpath(photo.path.resolve(), self.out_dir.resolve())).as_posix()

    def _write_page_rows(self, photo: Photo, page: PageAnswer, writer: ShardedJsonlWriter) -> None:
        """One row per query; the writer skips the keys an interrupted run already wrote."""
        page_ref = self._photo_ref(photo)
        for index, query in enumerate(page.queries):
            row = page_query_row(query, page_ref)
            writer.write(_query_key(photo.key, index), row, signature=page_query_signature(row))

    def _facts_path(self, photo: Photo) -> Path:
        return self.out_dir / FACTS_DIR / f"{hashlib.sha256(photo.key.encode('utf-8')).hexdigest()[:20]}.json"

    def _save_facts(self, photo: Photo, page: PageAnswer) -> None:
        """The accepted answer, facts included, saved atomically before any of its rows."""
        with atomic_write(self._facts_path(photo), "w") as handle:
            json.dump({"key": photo.key, **asdict(page)}, handle, ensure_ascii=False, indent=1)

    def _write_view(self, photo: Photo) -> str:
        """Save the photo's second view under `views/` (atomically; the same file on every run)."""
        name = f"{VIEWS_DIR}/{hashlib.sha256(photo.key.encode('utf-8')).hexdigest()[:20]}.jpg"
        target = self.out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        view = second_view(open_photo(photo.path))
        with atomic_write(target, "wb") as handle:
            view.save(handle, format="JPEG", quality=95)
        return name


def _pages_settings(config: GenerateConfig) -> dict[str, int | str]:
    """What decides the rows of the pages mode (its keys, its limits): a folder resumes only with the same."""
    settings: dict[str, int | str] = {"mode": "pages", "queries_per_page": config.queries_per_page}
    if config.max_query_chars != MAX_QUERY_CHARS:
        # Recorded only when set: folders written before the limit existed resume with the default.
        settings["max_query_chars"] = config.max_query_chars
    return settings


def _query_key(page_key: str, index: int) -> str:
    """The record key of a page's `index`-th query (a page's own key is never an image file name plus '#')."""
    return f"{page_key}#{index}"


def _kept_by_combination(shard_paths: list[Path]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for path in shard_paths:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                counts[json.loads(line)["source"].split("/")[2]] += 1
    return dict(sorted(counts.items()))


def print_summary(manifest: Manifest, out_dir: str | os.PathLike) -> None:
    rejected = ", ".join(f"{count}x {reason}" for reason, count in manifest.rejected.items()) or "none"
    failed = manifest.details.get("last_run", {}).get("failed", {})
    print(f"{out_dir}: {manifest.generated} generated, {manifest.kept} kept, rejected: {rejected}")
    if failed:
        retry = ", ".join(f"{count}x {reason}" for reason, count in failed.items())
        print(f"not done, retried by the next run: {retry}", file=sys.stderr)
