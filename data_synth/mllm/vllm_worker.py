"""The vLLM engine's process: `python -m unime.data_synth.mllm.vllm_worker JOB.json`.

vLLM runs here, never in the caller's process (an offline engine sometimes aborts at interpreter exit after
finishing its work, see ENVIRONMENT.md): the caller judges this process by the results file it writes, not by
its exit code. The job file names the folder where the caller stages request chunks (JSONL of {"key",
"messages", "seed"}), this rank's results file, the engine and sampling settings. Rank r of a data-parallel
job of size n takes requests r, r+n, r+2n, ... of each chunk.
Results are appended one line per request after each batch, flushed, so the caller streams them as they come
and a killed engine loses at most one batch.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

END_OF_REQUESTS = "requests.end"
"""Created by the caller after its last request chunk."""


def rank_slice(items: list, rank: int, world: int) -> list:
    """The items data-parallel rank `rank` of `world` generates: every world-th one, starting at rank."""
    return items[rank::world]


def _exit_with_parent() -> None:
    """Die when the caller dies (a killed run must not leave an engine generating for nobody)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def chunk_name(index: int) -> str:
    """The file name of staged request chunk `index`."""
    return f"requests-{index:06d}.jsonl"


def staged_chunks(directory: Path, poll_s: float = 0.2) -> Iterator[list[dict[str, Any]]]:
    """The request chunks the caller stages in `directory`, in order, until it marks the end of requests.

    The caller renames each chunk into place whole and creates the end marker after the last chunk, so a chunk
    seen is complete, and once the marker exists no chunk is still to come.
    """
    index = 0
    while True:
        path = directory / chunk_name(index)
        if path.is_file():
            yield [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            index += 1
        elif (directory / END_OF_REQUESTS).is_file():
            if not path.is_file():  # looked at again: it may have been renamed into place just before the marker
                return
        else:
            time.sleep(poll_s)


class Engine:
    """One vLLM engine with the job's sampling settings, started once (here, or in a Ray actor)."""

    def __init__(self, job: dict[str, Any]):
        from vllm import LLM  # heavy optional dependency (the `vllm` extra)
        from vllm.sampling_params import StructuredOutputsParams

        engine: dict[str, Any] = dict(job["engine"])
        if job.get("single_process"):
            # One process instead of three (front end, engine core, worker): each imports vLLM, and on a
            # small CPU machine those imports are most of the start-up time.
            engine["distributed_executor_backend"] = "uni"
        if job["structured_output"]:
            # Compact JSON (an engine setting in vLLM 0.32, ignored per request, and only for a named backend): with
            # whitespace allowed between fields, a small or random model spent its whole token budget on it.
            engine.setdefault("structured_outputs_config", {"backend": "xgrammar", "disable_any_whitespace": True})
        self.job = job
        self.llm = LLM(model=job["model"], runner="generate", **engine)
        self.structured = StructuredOutputsParams(json=job["schema"]) if job["structured_output"] else None
        template = job.get("chat_template")
        self.chat_template = Path(template).read_text(encoding="utf-8") if template else None

    def generate(self, requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Results ({"key", "text", "truncated"} or {"key", "failure"}) of requests ({"key", "messages", "seed"}),
        `batch_size` at a time."""
        for start in range(0, len(requests), self.job["batch_size"]):
            yield from _generate(self, requests[start : start + self.job["batch_size"]])


def run_job(job: dict[str, Any]) -> None:
    engine = Engine(job)
    with Path(job["results"]).open("a", encoding="utf-8") as out:
        for chunk in staged_chunks(Path(job["requests_dir"])):
            mine = rank_slice(chunk, job["rank"], job["world"])
            for start in range(0, len(mine), job["batch_size"]):
                batch = mine[start : start + job["batch_size"]]
                out.write("".join(json.dumps(line) + "\n" for line in _generate(engine, batch)))
                out.flush()
    print("vllm worker: done", flush=True)


def _generate(engine: Engine, batch: list[dict[str, Any]]) -> list[dict]:
    from vllm import SamplingParams  # heavy optional dependency (the `vllm` extra)

    job = engine.job
    params = [
        SamplingParams(
            max_tokens=job["max_tokens"],
            temperature=job["temperature"],
            seed=request["seed"],  # per request: the same answer whatever the batch
            structured_outputs=engine.structured,
        )
        for request in batch
    ]
    try:
        outputs = engine.llm.chat(
            [request["messages"] for request in batch], params, use_tqdm=False, chat_template=engine.chat_template
        )
    except Exception as err:  # noqa: BLE001 - a failed batch is reported per request; the run goes on
        print(f"a batch failed: {err!r}", file=sys.stderr, flush=True)
        return [{"key": request["key"], "failure": "engine_error"} for request in batch]
    return [
        {
            "key": request["key"],
            "text": output.outputs[0].text,
            "truncated": output.outputs[0].finish_reason == "length",
        }
        for request, output in zip(batch, outputs, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m unime.data_synth.mllm.vllm_worker JOB.json", file=sys.stderr)
        return 2
    _exit_with_parent()
    job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    run_job(job)
    if job.get("single_process"):
        # Every result is flushed and its file closed: skip the engine's teardown and the interpreter's exit,
        # which took 10-20 s on a loaded CPU machine and sometimes aborts (exit 134). With several processes
        # the normal exit stays, so that vLLM stops its engine-core and worker processes itself.
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
