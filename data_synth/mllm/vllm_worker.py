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


def run_job(job: dict[str, Any]) -> None:
    from vllm import LLM
    from vllm.sampling_params import StructuredOutputsParams

    engine: dict[str, Any] = dict(job["engine"])
    if job.get("single_process"):
        # One process instead of three (front end, engine core, worker): each imports vLLM, and on a
        # small CPU machine those imports are most of the start-up time.
        engine["distributed_executor_backend"] = "uni"
    llm = LLM(model=job["model"], runner="generate", **engine)
    structured = StructuredOutputsParams(json=job["schema"]) if job["structured_output"] else None
    chat_template = Path(job["chat_template"]).read_text(encoding="utf-8") if job.get("chat_template") else None
    with Path(job["results"]).open("a", encoding="utf-8") as out:
        for chunk in staged_chunks(Path(job["requests_dir"])):
            mine = rank_slice(chunk, job["rank"], job["world"])
            for start in range(0, len(mine), job["batch_size"]):
                batch = mine[start : start + job["batch_size"]]
                out.write(
                    "".join(json.dumps(line) + "\n" for line in _generate(llm, batch, job, structured, chat_template))
                )
                out.flush()
    print("vllm worker: done", flush=True)


def _generate(llm, batch: list[dict[str, Any]], job: dict[str, Any], structured, chat_template) -> list[dict]:
    from vllm import SamplingParams

    params = [
        SamplingParams(
            max_tokens=job["max_tokens"],
            temperature=job["temperature"],
            seed=request["seed"],  # per request: the same answer whatever the batch
            structured_outputs=structured,
        )
        for request in batch
    ]
    try:
        outputs = llm.chat(
            [request["messages"] for request in batch], params, use_tqdm=False, chat_template=chat_template
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
