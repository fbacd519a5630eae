"""The generator's pages mode (queries that find a page image) against a scripted OpenAI-compatible server on a
loopback port: rows kept and loadable, bad answers rejected by reason, resumed after a crash mid-page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unime.cli import main as cli_main
from unime.data.dataset import load_examples
from unime.data_synth.manifest import Manifest, ShardedJsonlWriter
from unime.data_synth.mllm.answer import Rejected, page_answer_schema, parse_page_answer
from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
from unime.data_synth.mllm.images import open_photo
from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig
from unime.data_synth.mllm.plan import PlanChoices
from unime.data_synth.mllm.prompting import PAGE_PLACEHOLDERS, image_data_url, load_prompt
from unime.errors import ConfigError

from .conftest import make_photo_folder
from .scripted_server import ScriptedChatServer, photo_digest

MAX_SIDE = 256
K = 2
BEHAVIOURS = {
    "a00.jpg": "valid",
    "a01.jpg": "invalid_json",
    "a02.jpg": "wrong_count",
    "a03.jpg": "empty_fact",
    "a04.jpg": "repeated_query",
    "a05.jpg": "shared_queries",
    "a06.jpg": "shared_queries",  # both its queries repeat a05's: rejected as near-duplicates
    "a07.jpg": "valid",
    "a08.jpg": "valid",
    "a09.jpg": "valid",
}
KEPT_PAGES = ["a00.jpg", "a05.jpg", "a07.jpg", "a08.jpg", "a09.jpg"]
REJECTED = {
    "invalid_json": 1,
    "wrong_count:queries": 1,
    "empty_field:queries[0].fact": 1,
    "repeated_query": 1,
    "near_duplicate": K,
    "unreadable_image": 1,  # broken.jpg
    "near_duplicate_image": 1,  # zz-copy-of-a00.png
}
LANGUAGE = re.compile(r"language = (\S+)\.")
COUNT = re.compile(r"write exactly (\d+) queries")
RETRY_ARGS = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.05}


class ScriptedPageServer(ScriptedChatServer):
    """Answers the pages prompt: `count` queries in the language the prompt suggests, as the script says."""

    def respond(self, body: dict) -> tuple[int, dict, dict]:
        prompt, digest, _ = self.read_request(body)
        with self.lock:
            self.schemas.append(body["response_format"]["json_schema"]["schema"])
        behaviour = self.script.get(digest, "valid")
        language, count = LANGUAGE.search(prompt).group(1), int(COUNT.search(prompt).group(1))
        owner = "shared" if behaviour == "shared_queries" else digest
        queries = [
            {
                "query": f"Which page reports figure {index} of {owner}?",
                "fact": f"Figure {index} of {owner} is 4{index}.",
            }
            for index in range(count)
        ]
        if behaviour == "wrong_count":
            queries = queries[:-1]
        if behaviour == "empty_fact":
            queries[0]["fact"] = " "
        if behaviour == "repeated_query":
            queries[-1]["query"] = queries[0]["query"].upper()
        answer = {"description": f"A report page, {digest}.", "language": language, "queries": queries}
        text = '{"description": "a page", "queries": [' if behaviour == "invalid_json" else json.dumps(answer)
        return 200, {}, self.completion(body, f"chatcmpl-{digest}", text)

    def __init__(self, script: dict[str, str]):
        super().__init__(script)
        self.schemas: list[dict] = []


@pytest.fixture(scope="module")
def page_folder(tmp_path_factory, ten_photo_paths) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("mllm-pages") / "pages", ten_photo_paths)


@pytest.fixture()
def server(page_folder):
    script = {
        photo_digest(image_data_url(open_photo(page_folder / name), max_side=MAX_SIDE)): behaviour
        for name, behaviour in BEHAVIOURS.items()
    }
    with ScriptedPageServer(script) as started:
        yield started


def run(folder: Path, out: Path, server: ScriptedChatServer, **config) -> Manifest:
    backend = OpenAIBackend(
        OpenAIBackendConfig(base_url=server.base_url, model="scripted", concurrency=4, **RETRY_ARGS)
    )
    config = dict(image_dir=str(folder), out_dir=str(out), max_image_side=MAX_SIDE, records_per_shard=3, **config)
    return generate_dataset(GenerateConfig(mode="pages", queries_per_page=K, **config), backend, backend_kind="openai")


def written(out: Path) -> tuple[list[str], list[str], dict[str, bytes]]:
    """The shards' rows and the key files' lines in order, and the facts files by name. (Shard boundaries
    differ after a crash: the writer commits the open shard when an exception leaves it.)"""
    rows = [line for path in sorted(out.glob("shard-*.jsonl")) for line in path.open()]
    keys = [line for path in sorted(out.glob("shard-*.keys")) for line in path.open()]
    facts = {path.name: path.read_bytes() for path in (out / "facts").glob("*.json")}
    return rows, keys, facts


def test_kept_answers_become_loadable_rows_and_bad_ones_are_rejected_by_reason(page_folder, server, tmp_path):
    out = tmp_path / "out"
    manifest = run(page_folder, out, server, choices=PlanChoices(languages=("English", "French")))

    assert manifest.kept == K * len(KEPT_PAGES)
    assert manifest.rejected == dict(sorted(REJECTED.items()))
    assert manifest.details["last_run"]["failed"] == {}
    assert manifest.details["last_run"]["rejection_examples"]["wrong_count:queries"]["key"] == "a02.jpg"
    assert manifest.prompt_version.startswith("visdoc_queries_v1@")
    assert manifest.settings == {"mode": "pages", "queries_per_page": K}
    assert "kept_by_combination" not in manifest.details
    # the schema sent asks for exactly K queries in the run's languages
    assert {json.dumps(schema, sort_keys=True) for schema in server.schemas} == {
        json.dumps(page_answer_schema(PlanChoices(languages=("English", "French")), K), sort_keys=True)
    }
    assert all(schema["properties"]["queries"]["minItems"] == K for schema in server.schemas)

    shards = sorted(out.glob("shard-*.jsonl"))
    examples, report = load_examples(shards)
    assert report.kept == K * len(KEPT_PAGES) and report.skipped == 0
    keys = [json.loads(line)["key"] for path in sorted(out.glob("shard-*.keys")) for line in path.open()]
    kept_keys = [f"{name}#{index}" for name in KEPT_PAGES for index in range(K)]
    assert [key for key in keys if key in kept_keys] == kept_keys
    for key, example in zip(kept_keys, examples, strict=True):
        page, index = key.split("#")
        digest = photo_digest(image_data_url(open_photo(page_folder / page), max_side=MAX_SIDE))
        owner = "shared" if page == "a05.jpg" else digest
        assert example.query.text == f"Which page reports figure {index} of {owner}?"
        assert example.query.image is None and example.negatives == ()
        assert example.positive.image.resolve() == (page_folder / page).resolve() and not example.positive.text
        assert example.source == "Generated-VisDoc"

    # each kept page's answer, facts included, is saved beside the rows
    facts = [json.loads(path.read_text()) for path in sorted((out / "facts").glob("*.json"))]
    saved = {fact["key"]: fact for fact in facts}
    assert set(saved) == set(KEPT_PAGES) | {"a06.jpg"}  # a06 was accepted; its rows were near-duplicates
    assert saved["a00.jpg"]["queries"][1]["fact"].startswith("Figure 1 of ")
    assert saved["a00.jpg"]["language"] in ("English", "French")


def test_a_run_that_crashes_mid_page_resumes_to_the_uninterrupted_output(page_folder, server, tmp_path, monkeypatch):
    whole = run(page_folder, tmp_path / "whole", server)
    asked_once = dict(server.attempts)

    # Crash between the two rows of a05, the second kept page (a01..a04 are rejected: no rows).
    original, before_crash = ShardedJsonlWriter.write, []

    def crashing_write(self, key, record, *, signature=None):
        if len(before_crash) == K + 1:
            raise RuntimeError("simulated crash")
        before_crash.append(key)
        return original(self, key, record, signature=signature)

    monkeypatch.setattr(ShardedJsonlWriter, "write", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(page_folder, tmp_path / "crashed", server)
    monkeypatch.setattr(ShardedJsonlWriter, "write", original)
    assert before_crash == ["a00.jpg#0", "a00.jpg#1", "a05.jpg#0"]

    before = dict(server.attempts)
    resumed = run(page_folder, tmp_path / "crashed", server)
    asked_again = {digest for digest, count in server.attempts.items() if count != before[digest]}
    a05 = photo_digest(image_data_url(open_photo(page_folder / "a05.jpg"), max_side=MAX_SIDE))
    assert a05 not in asked_again  # finished from its saved answer, not asked again
    assert sum(asked_once.values()) == len(asked_once) == len(BEHAVIOURS)

    keys = [json.loads(line)["key"] for path in (tmp_path / "crashed").glob("shard-*.keys") for line in path.open()]
    assert len(keys) == len(set(keys)) == whole.generated  # nothing written twice
    assert written(tmp_path / "crashed") == written(tmp_path / "whole")
    for manifest in (whole, resumed):
        del manifest.details["last_run"], manifest.shards[:]
    assert resumed == whole

    # A third run has nothing left to do and asks nothing.
    settled = dict(server.attempts)
    again = run(page_folder, tmp_path / "crashed", server)
    assert server.attempts == settled and again.kept == whole.kept


def test_a_folder_resumes_only_with_the_same_queries_per_page_and_limits(page_folder, server, tmp_path):
    run(page_folder, tmp_path / "out", server, limit=1)
    backend = OpenAIBackend(OpenAIBackendConfig(base_url=server.base_url, model="scripted", **RETRY_ARGS))
    config = GenerateConfig(str(page_folder), str(tmp_path / "out"), mode="pages", queries_per_page=K + 1)
    with pytest.raises(ConfigError, match="queries_per_page"):
        generate_dataset(config, backend)
    config = GenerateConfig(
        str(page_folder), str(tmp_path / "out"), mode="pages", queries_per_page=K, max_query_chars=50
    )
    with pytest.raises(ConfigError, match="max_query_chars: was '<not recorded>', now 50"):
        generate_dataset(config, backend)


def test_the_command_line_runs_the_pages_mode(page_folder, server, tmp_path, capsys):
    out = tmp_path / "cli"
    command = [
        "generate", str(page_folder), str(out),
        "--backend", "openai", "--openai.base-url", server.base_url, "--openai.model", "scripted",
        "--mode", "pages", "--queries-per-page", str(K), "--max-image-side", str(MAX_SIDE),
    ]  # fmt: skip
    assert cli_main(command) == 0
    kept = K * len(KEPT_PAGES)
    assert f"{kept} kept" in capsys.readouterr().out
    examples, report = load_examples(sorted(out.glob("shard-*.jsonl")))
    assert report.kept == kept and {example.source for example in examples} == {"Generated-VisDoc"}
    assert Manifest.load(out).settings == {"mode": "pages", "queries_per_page": K}


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"description": "d", "language": "English", "queries": "q"}, "wrong_type:queries"),
        ({"description": "d", "language": "Klingon", "queries": []}, "invalid_choice:language"),
        ({"description": "d", "language": "English"}, "missing_field:queries"),
        ({"description": "d", "language": "English", "queries": [{"query": "q"}]}, "missing_field:queries[0].fact"),
        ({"description": "d", "language": "English", "queries": ["q"]}, "wrong_type:queries[0]"),
        (
            {"description": " ", "language": "English", "queries": [{"query": "q", "fact": "f"}]},
            "empty_field:description",
        ),
        (
            {"description": "d", "language": "English", "queries": [{"query": "q" * 201, "fact": "f"}]},
            "too_long:queries[0].query",
        ),
        (
            {"description": "d" * 1001, "language": "English", "queries": [{"query": "q", "fact": "f"}]},
            "too_long:description",
        ),
    ],
)
def test_malformed_page_answers_are_rejected_with_their_first_problem(answer, reason):
    with pytest.raises(Rejected) as rejected:
        parse_page_answer(json.dumps(answer), PlanChoices(), 1)
    assert rejected.value.reason == reason


def test_a_fenced_page_answer_is_accepted_and_a_cut_one_is_truncated():
    answer = {"description": "d", "language": "English", "queries": [{"query": "q", "fact": "f"}]}
    parsed = parse_page_answer(f"```json\n{json.dumps(answer)}\n```", PlanChoices(), 1)
    assert [(query.query, query.fact) for query in parsed.queries] == [("q", "f")]
    with pytest.raises(Rejected, match="truncated_answer"):
        parse_page_answer(json.dumps(answer)[:-5], PlanChoices(), 1, truncated=True)


def test_a_pages_prompt_may_use_the_pages_placeholders_only(tmp_path):
    packaged = load_prompt("visdoc_queries_v1", PAGE_PLACEHOLDERS)
    text = packaged.render_pages("French", PlanChoices(), 4)
    assert "$" not in text and "language = French." in text and "write exactly 4 queries" in text
    path = tmp_path / "mine.txt"
    path.write_text("Write $queries_per_page queries for $task.")
    with pytest.raises(ConfigError, match=r"\$queries_per_page"):
        load_prompt(str(path), PAGE_PLACEHOLDERS)


def test_every_text_of_a_pages_answer_is_bounded_in_the_schema_and_in_the_checks():
    """maxLength in the schema (what guided decoding enforces) and the checks agree, at the default and when set."""
    for max_chars, limits in (
        (200, {"query": 200, "fact": 400, "description": 1000}),
        (10, {"query": 10, "fact": 20, "description": 50}),
    ):
        schema = (
            page_answer_schema(PlanChoices(), 2, max_chars)
            if max_chars != 200
            else page_answer_schema(PlanChoices(), 2)
        )
        query = schema["properties"]["queries"]["items"]["properties"]
        bounds = {"description": schema["properties"]["description"], **query}
        assert {name: (bound["minLength"], bound["maxLength"]) for name, bound in bounds.items()} == {
            name: (1, limit) for name, limit in limits.items()
        }
        longest = {"query": "q" * limits["query"], "fact": "f" * limits["fact"]}
        answer = {
            "description": "d" * limits["description"],
            "language": "English",
            "queries": [longest, {**longest, "query": "Q" * limits["query"] + "?"}],
        }
        with pytest.raises(Rejected, match="too_long:queries.1..query"):
            parse_page_answer(json.dumps(answer), PlanChoices(), 2, max_query_chars=max_chars)
        answer["queries"][1]["query"] = "z" * limits["query"]
        assert len(parse_page_answer(json.dumps(answer), PlanChoices(), 2, max_query_chars=max_chars).queries) == 2


def test_a_raw_control_character_inside_a_string_is_still_an_answer():
    """Guided decoding lets a model write a raw tab inside a string (invalid in strict JSON): accepted."""
    text = '{"description": "a\tpage", "language": "English", "queries": [{"query": "q\x19", "fact": "f"}]}'
    parsed = parse_page_answer(text, PlanChoices(), 1)
    assert parsed.description == "a\tpage" and parsed.queries[0].query == "q\x19"
