"""The generator against a scripted OpenAI-compatible server on a loopback port: kept, rejected, retried,
resumed after a kill."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from unime.cli import main as cli_main
from unime.data.dataset import load_examples
from unime.data_synth.manifest import Manifest
from unime.data_synth.mllm.backend import GenerationRequest
from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
from unime.data_synth.mllm.images import open_photo
from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig
from unime.data_synth.mllm.plan import sides_of
from unime.data_synth.mllm.prompting import chat_messages, image_data_url
from unime.data_synth.sharding import parse_shard

from .conftest import make_photo_folder
from .scripted_server import ScriptedChatServer, photo_digest

MAX_SIDE = 256
BEHAVIOURS = {
    "a00.jpg": "valid",
    "a01.jpg": "invalid_json",
    "a02.jpg": "missing_field",
    "a03.jpg": "low_score",
    "a04.jpg": "slow_once",
    "a05.jpg": "error_once",
    "a06.jpg": "rate_limited_once",
    "a07.jpg": "always_503",
    "a08.jpg": "duplicate_text",
    "a09.jpg": "duplicate_text",
}
KEPT = ["a00.jpg", "a04.jpg", "a05.jpg", "a06.jpg", "a08.jpg"]
REJECTED = {
    "invalid_json": 1,
    "missing_field:final": 1,
    "self_evaluation_failed": 1,
    "near_duplicate": 1,  # a09 says what a08 said
    "unreadable_image": 1,  # broken.jpg
    "near_duplicate_image": 1,  # zz-copy-of-a00.png
}
# The timeout is well above the server's answer time even on a loaded machine, and well below slow_s.
RETRY_ARGS = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.05}
SLOW_S = 4.0


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, ten_photo_paths) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("mllm") / "photos", ten_photo_paths)


def script_for(folder: Path) -> dict[str, str]:
    """Digest of each photo as the generator sends it -> its scripted behaviour."""
    return {
        photo_digest(image_data_url(open_photo(folder / name), max_side=MAX_SIDE)): behaviour
        for name, behaviour in BEHAVIOURS.items()
    }


def run(folder: Path, out: Path, server: ScriptedChatServer, **config) -> Manifest:
    settings = OpenAIBackendConfig(base_url=server.base_url, model="scripted", concurrency=4, **RETRY_ARGS)
    backend = OpenAIBackend(settings)
    config = dict(image_dir=str(folder), out_dir=str(out), max_image_side=MAX_SIDE, records_per_shard=2, **config)
    return generate_dataset(GenerateConfig(**config), backend, backend_kind="openai")


def test_valid_answers_are_kept_bad_ones_rejected_failures_retried(photo_folder, tmp_path):
    with ScriptedChatServer(script_for(photo_folder), slow_s=SLOW_S) as server:
        manifest = run(photo_folder, tmp_path / "out", server)
        attempts = dict(server.attempts)

        assert manifest.kept == len(KEPT)
        assert manifest.rejected == dict(sorted(REJECTED.items()))
        assert manifest.generated == len(KEPT) + sum(REJECTED.values())
        # a07 always answers 503: reported, not written, not counted as done
        assert manifest.details["last_run"]["failed"] == {"endpoint_http_503": 1}
        # one retry each for the slow, failing and rate-limited photo, two for the one that always fails
        assert manifest.details["last_run"]["retries"] == 5
        examples = manifest.details["last_run"]["rejection_examples"]
        assert examples["invalid_json"]["key"] == "a01.jpg"
        assert examples["invalid_json"]["answer_start"].startswith("Here is the example")
        assert manifest.prompt_version.startswith("mme5_v1@") and manifest.model == "scripted"
        assert Manifest.load(tmp_path / "out") == manifest

        rows = [json.loads(line) for path in sorted((tmp_path / "out").glob("shard-*.jsonl")) for line in path.open()]
        examples, report = load_examples(sorted((tmp_path / "out").glob("shard-*.jsonl")))
        assert report.kept == len(KEPT) and report.skipped == 0
        digests = {
            name: photo_digest(image_data_url(open_photo(photo_folder / name), max_side=MAX_SIDE)) for name in KEPT
        }
        for name, row, example in zip(KEPT, rows, examples, strict=True):
            combination = row["source"].split("/")[2]
            sides = sides_of(combination)
            assert bool(example.query.image) == sides.query_image
            assert bool(example.positive.image) == sides.candidate_image
            if sides.query_image:
                assert example.query.image.resolve() == (photo_folder / name).resolve()
            if sides.candidate_text:
                assert digests[name] in example.positive.text or name == "a08.jpg"
                assert example.negatives[0].text != example.positive.text
        assert sum(manifest.details["kept_by_combination"].values()) == len(KEPT)

        # A second run resumes: only the photo that failed is asked again; nothing is written twice.
        again = run(photo_folder, tmp_path / "out", server)
        assert (again.kept, again.rejected, again.generated) == (manifest.kept, manifest.rejected, manifest.generated)
        asked_again = {digest for digest, count in server.attempts.items() if count != attempts[digest]}
        assert asked_again == {photo_digest(image_data_url(open_photo(photo_folder / "a07.jpg"), max_side=MAX_SIDE))}


def test_the_backend_does_not_retry_what_retrying_cannot_fix(photo_folder):
    """400 fails at once; a 200 that is not a chat completion is a failure, not an answer; a closed port is
    retried, then reported."""
    names = {"a00.jpg": "bad_request", "a01.jpg": "not_a_completion"}
    urls = {name: image_data_url(open_photo(photo_folder / name), max_side=MAX_SIDE) for name in names}
    requests = [GenerationRequest(name, chat_messages("task = vqa, combination = I->T, language = English.", url))
                for name, url in urls.items()]  # fmt: skip
    with ScriptedChatServer({photo_digest(urls[name]): behaviour for name, behaviour in names.items()}) as server:
        backend = OpenAIBackend(OpenAIBackendConfig(base_url=server.base_url, model="scripted", **RETRY_ARGS))
        results = {result.key: result for result in backend.generate(requests, {})}
        closed_port = server.base_url
    assert (results["a00.jpg"].failure, results["a00.jpg"].attempts) == ("endpoint_http_400", 1)
    assert (results["a01.jpg"].failure, results["a01.jpg"].attempts) == ("endpoint_bad_response", 1)
    backend = OpenAIBackend(OpenAIBackendConfig(base_url=closed_port, model="scripted", **RETRY_ARGS))
    [result] = backend.generate(requests[:1], {})
    assert (result.failure, result.attempts, result.text) == ("endpoint_connection_error", 3, None)


def test_another_shard_splits_the_job(photo_folder, tmp_path):
    """Shards 0/2 and 1/2 together do exactly what one shard does."""
    with ScriptedChatServer(script_for(photo_folder), slow_s=SLOW_S) as server:
        halves = [run(photo_folder, tmp_path / f"out-{i}", server, shard=f"{i}/2") for i in range(2)]
    keys = [
        {json.loads(line)["key"] for path in (tmp_path / f"out-{i}").glob("shard-*.keys") for line in path.open()}
        for i in range(2)
    ]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(BEHAVIOURS) - {"a07.jpg"} | {"broken.jpg", "zz-copy-of-a00.png"}
    # Duplicate photos are found across shards (every shard hashes the whole folder); duplicate texts only
    # within a shard's folder: a09 repeats a08's texts, and is kept too when another shard owns it.
    same_shard = parse_shard("0/2").owns("a08.jpg") == parse_shard("0/2").owns("a09.jpg")
    assert sum(half.kept for half in halves) == len(KEPT) + (0 if same_shard else 1)
    assert sum(half.rejected.get("near_duplicate_image", 0) for half in halves) == 1


@pytest.mark.slow  # forks a process and kills it
def test_a_run_killed_and_resumed_writes_exactly_the_uninterrupted_output(photo_folder, tmp_path, capsys):
    """The uninterrupted run goes through the command line; the interrupted one is a forked copy of this
    process (a fresh interpreter would spend most of this test importing torch), killed with SIGKILL once it
    has written a few records, then resumed."""
    with ScriptedChatServer(script_for(photo_folder), slow_s=SLOW_S, delay_s=0.3) as server:
        whole_dir = tmp_path / "whole"
        command = [
            "generate", str(photo_folder), str(whole_dir),
            "--backend", "openai", "--openai.base-url", server.base_url, "--openai.model", "scripted",
            "--openai.concurrency", "4", "--records-per-shard", "2", "--max-image-side", str(MAX_SIDE),
            "--openai.timeout-s", "2", "--openai.max-retries", "2", "--openai.backoff-s", "0.05",
        ]  # fmt: skip
        assert cli_main(command) == 0
        printed = capsys.readouterr()
        assert "11 generated, 5 kept" in printed.out and "1x endpoint_http_503" in printed.err
        whole = Manifest.load(whole_dir)

        killed = tmp_path / "killed"
        child = multiprocessing.get_context("fork").Process(target=run, args=(photo_folder, killed, server))
        child.start()
        deadline = time.monotonic() + 60
        while records_written(killed) < 5:
            assert child.is_alive(), "the run ended before it was killed"
            assert time.monotonic() < deadline, "the run wrote nothing within 60 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        assert records_written(killed) < whole.generated  # it really was interrupted

        resumed = run(photo_folder, killed, server)

    assert resumed.details["last_run"]["failed"] == {"endpoint_http_503": 1}
    assert data_files(killed) == data_files(whole_dir)
    for manifest in (whole, resumed):
        del manifest.details["last_run"]
    assert resumed == whole


def records_written(out: Path) -> int:
    """Records (kept or rejected) on disk: committed key files plus the open shard's log."""
    paths = list(out.glob("shard-*.keys")) + list(out.glob(".shard-*.partial"))
    count = 0
    for path in paths:
        try:
            count += path.read_text().count("\n")
        except FileNotFoundError:  # committed and removed between glob and read
            pass
    return count


def data_files(out: Path) -> dict[str, bytes]:
    """Every shard, key file and second view, by name."""
    names = [path for path in out.rglob("*") if path.is_file() and path.name != "manifest.json"]
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in names}
