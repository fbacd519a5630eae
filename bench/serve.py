"""Serving throughput and latency: micro-batching against batch-1, and vLLM against transformers, in one run.

Each configuration is a real `unime serve` subprocess on a loopback port, hosting the same randomly initialised
Qwen2-VL embedder (`--model tiny`: 0.2 M parameters, its forward pass mostly framework overhead; `--model small`:
16 M parameters, compute-bound like a real model); a closed-loop client keeps `concurrency` one-item requests in
flight (mixed texts, images and text+image pairs) until `--requests` have been answered. Every request is checked
(status 200, one vector), so errors and lost requests (sent, never answered) are counted, not hidden. Ratios are
against the transformers backend without micro-batching (batch-1), measured in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve.py [--model tiny|small] [--concurrency 1 8 32] [--requests 256]
        [--rounds 3] [--no-vllm] [--http-workers N]

With `--http-workers N`, the transformers backend is measured also with N HTTP worker processes in front of the
model process (batch-1 and micro-batching), against the same batch-1 baseline, and the run times the pipe
between a worker and the model process per request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    name: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    errors: int
    lost: int


def payloads(count: int, seed: int = 0) -> list[dict]:
    """One-item requests: texts of 3..40 words, drawn scenes of 40..160 px, text+image pairs."""
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(seed)
    out = []
    for index in range(count):
        scene = random_scene(rng)
        caption = describe(scene)
        if index % 3 == 0:
            words = ((caption + " ") * 8).split()[: rng.randint(3, 40)]
            out.append({"input": [" ".join(words)]})
            continue
        buffer = io.BytesIO()
        draw_scene(scene, size=rng.randint(40, 160)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        out.append({"input": [{"image": url} if index % 3 == 1 else {"text": caption, "image": url}]})
    return out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(model_dir: Path, extra: list[str], log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "unime.cli", "serve", str(model_dir), "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not start; see {log}")


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one keep-alive connection (Content-Length bodies only).

    httpx's async client, not the server, was the bottleneck here: 208 /health requests/s at 32 connections
    against 2600 with this client, so the numbers would have measured the client.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def load(url: str, requests: list[dict], concurrency: int) -> tuple[float, list[float], int, int]:
    """Closed loop: `concurrency` workers, each sending its next request when the previous one is answered."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    errors = lost = 0
    queue = list(reversed(requests))

    async def worker() -> None:
        nonlocal errors, lost
        client = KeepAliveClient(host, int(port))
        while queue:
            payload = queue.pop()
            start_time = time.perf_counter()
            try:
                status, raw = await client.post("/v1/embeddings", payload)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                lost += 1  # sent, never answered
                await client.close()
                continue
            latencies.append(time.perf_counter() - start_time)
            if status != 200 or len(json.loads(raw)["data"]) != len(payload["input"]):
                errors += 1
        await client.close()

    start_time = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start_time, latencies, errors, lost


def measure(url: str, requests: list[dict], concurrency: int, name: str) -> Run:
    elapsed, latencies, errors, lost = asyncio.run(load(url, requests, concurrency))
    ordered = sorted(latencies) or [float("nan")]
    return Run(
        name=name,
        concurrency=concurrency,
        throughput=len(latencies) / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        errors=errors,
        lost=lost,
    )


def model_only_ms(model_dir: Path, requests: list[dict], batch_size: int) -> tuple[float, float]:
    """Milliseconds per item of the model alone (no HTTP, no JSON), batch-1 and `batch_size`, in this process.

    Their ratio is what batching gains in the model itself; the server adds per-request work (HTTP, JSON, image
    decoding) that no batching shares out, and its batches at a given concurrency are smaller than the concurrency.
    """
    import torch

    from unime.serve.backends import TransformersEmbedder
    from unime.serve.images import ImagePolicy
    from unime.serve.protocol import Limits, parse_embedding_request

    torch.set_num_threads(1)
    limits = Limits(max_items=1, max_text_chars=20_000, images=ImagePolicy(max_pixels=4096 * 4096))
    items = [parse_embedding_request(request, limits).items[0] for request in requests]
    # The device the servers use too (CUDA when available).
    backend = TransformersEmbedder(str(model_dir), dtype=None, device=None, max_batch_items=batch_size)
    backend.embed(items[:batch_size], [None] * len(items[:batch_size]))  # warm-up

    def per_item(size: int) -> float:
        start_time = time.perf_counter()
        for first in range(0, len(items), size):
            chunk = items[first : first + size]
            backend.embed(chunk, [None] * len(chunk))
        return 1000 * (time.perf_counter() - start_time) / len(items)

    # Best of two, interleaved: the machine may be shared.
    timings = [(per_item(1), per_item(batch_size)) for _ in range(2)]
    return min(t[0] for t in timings), min(t[1] for t in timings)


def _echo_model_process(conn) -> None:
    """A model process whose model answers at once: what remains of a request's time is the IPC."""
    from unime.serve.hosting import HostedModel
    from unime.serve.workers import ModelService

    service = ModelService({"embedder": HostedModel("echo", "embedder", None, _echo_batcher())})
    service.attach(conn, 0)
    service.join(3600)  # until the other end closes


def _echo_batcher():
    import numpy as np

    from unime.serve.backends import BatchResult
    from unime.serve.hosting import join_batches, split_batch
    from unime.serve.micro_batching import MicroBatcher

    def run(inputs, instructions):
        return BatchResult(values=np.zeros((len(inputs), 64), dtype=np.float32), tokens=[1] * len(inputs))

    return MicroBatcher(
        "echo", run, split_batch, join=join_batches, max_queue=8, max_batch_items=8, max_batch_tokens=10**6,
        wait_ms=0, batching=False, retry_after_s=1,
    )  # fmt: skip


def ipc_cost_us(requests: list[dict], rounds: int = 3) -> tuple[float, float]:
    """Microseconds per one-item request (texts and decoded images) through an in-process batcher, and through
    a worker's `RemoteBatcher` to a model process and back; the model answers at once, so the difference is
    what the pipe costs (pickling, the two trips, the extra threads), one request at a time."""
    import multiprocessing

    from unime.serve.images import ImagePolicy
    from unime.serve.protocol import Limits, parse_embedding_request
    from unime.serve.workers import Channel, RemoteBatcher

    limits = Limits(max_items=1, max_text_chars=20_000, images=ImagePolicy(max_pixels=4096 * 4096))
    items = [parse_embedding_request(request, limits).items for request in requests]

    async def per_request(batcher) -> float:
        start_time = time.perf_counter()
        for inputs in items:
            with batcher.arriving():
                pending = batcher.enqueue(inputs, [None], [1])
            await pending
        return 1e6 * (time.perf_counter() - start_time) / len(items)

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    model_process = context.Process(target=_echo_model_process, args=(theirs,))
    model_process.start()
    theirs.close()
    remote, local = RemoteBatcher(Channel(ours), "embedder", [0]), _echo_batcher()
    try:
        timings = [(asyncio.run(per_request(local)), asyncio.run(per_request(remote))) for _ in range(rounds)]
    finally:
        local.close(5)
        remote.close()
        model_process.join(30)
    return min(t[0] for t in timings), min(t[1] for t in timings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend")
    parser.add_argument("--backbone", default="qwen2_vl")
    parser.add_argument(
        "--model",
        choices=("tiny", "small"),
        default="tiny",
        help="tiny: overhead-bound (a few ms a forward pass); small: compute-bound (hidden 384, 6 layers)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level; each backend's best is kept")
    parser.add_argument(
        "--http-workers", type=int, default=0, help="also measure transformers with N HTTP worker processes"
    )
    args = parser.parse_args(argv)

    import importlib.util

    import unime

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    requests = payloads(args.requests)
    configurations = [
        ("transformers, batch-1", ["--backend", "transformers", "--no-batching"]),
        ("transformers, micro-batching", ["--backend", "transformers"]),
    ]
    workers_label = f"{args.http_workers} http workers"
    if args.http_workers:
        workers = ["--http-workers", str(args.http_workers)]
        configurations += [
            (f"transformers, batch-1, {workers_label}", ["--backend", "transformers", "--no-batching", *workers]),
            (f"transformers, micro-batching, {workers_label}", ["--backend", "transformers", *workers]),
        ]
    with_vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    if with_vllm:
        configurations.append(("vllm", ["--backend", "vllm", "--enforce-eager"]))

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = unime.save_tiny(args.backbone, tmp_path / "model", size=args.model)
        env["VLLM_CPU_KVCACHE_SPACE"] = env.get("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_CACHE_ROOT"] = str(tmp_path / "vllm-cache")
        # All servers stay up, and each round measures them one after the other: a load change on a shared
        # machine hits every backend alike instead of skewing one of them.
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for index, (name, extra) in enumerate(configurations):
                print(f"starting: {name}", flush=True)
                servers[name] = start(model_dir, extra, tmp_path / f"server-{index}.log", env)
                asyncio.run(load(servers[name][1], requests[:16], 4))  # warm-up: first-call costs out
            ceiling_batch = max(args.concurrency)
            single_ms, batched_ms = model_only_ms(model_dir, requests[:64], ceiling_batch)
            print(f"  model alone: {single_ms:.2f} ms/item batch-1, {batched_ms:.2f} ms/item batch-{ceiling_batch}")
            if args.http_workers:
                local_us, remote_us = ipc_cost_us(requests[:64])
                print(f"  one request through a batcher: {local_us:.0f} us in process, {remote_us:.0f} us over IPC")
            results: dict[str, list[Run]] = {name: [] for name in servers}
            for concurrency in args.concurrency:
                for name, (_, url) in servers.items():
                    rounds = [measure(url, requests, concurrency, name) for _ in range(args.rounds)]
                    best = max(rounds, key=lambda run: run.throughput)
                    best.errors, best.lost = sum(r.errors for r in rounds), sum(r.lost for r in rounds)
                    results[name].append(best)
                    print(f"  {name:28s} c={concurrency:<3d} {best.throughput:8.1f} req/s (best of {args.rounds})")
        finally:
            for process, _ in servers.values():
                process.terminate()
            for process, _ in servers.values():
                process.wait(120)

    baseline = results["transformers, batch-1"]
    batched = results["transformers, micro-batching"]
    print()
    print(
        f"{args.requests} one-item requests (texts, images, text+image) per level and round, best of {args.rounds} "
        f"rounds, {args.model} {args.backbone}, loopback"
    )
    print("| backend | concurrency | req/s | p50 ms | p99 ms | errors | lost | throughput vs batch-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for runs in results.values():
        for run, base in zip(runs, baseline, strict=True):
            print(
                f"| {run.name} | {run.concurrency} | {run.throughput:.1f} | {run.p50_ms:.1f} | {run.p99_ms:.1f} | "
                f"{run.errors} | {run.lost} | {run.throughput / base.throughput:.2f}x |"
            )
    if with_vllm:
        print()
        for run, base in zip(results["vllm"], batched, strict=True):
            ratio = run.throughput / base.throughput
            print(f"vLLM / transformers micro-batching at concurrency {run.concurrency}: {ratio:.2f}x throughput")
    top = max(args.concurrency)

    def ratio_at_top(runs: list[Run]) -> float:
        return [b.throughput / a.throughput for a, b in zip(baseline, runs, strict=True) if a.concurrency == top][0]

    ratio = ratio_at_top(batched)
    total_errors = sum(run.errors + run.lost for runs in results.values() for run in runs)
    print(f"micro-batching / batch-1 at concurrency {top}: {ratio:.2f}x (aim >= 4x); errors + lost: {total_errors}")
    if args.http_workers:
        ratio = ratio_at_top(results[f"transformers, micro-batching, {workers_label}"])
        print(f"micro-batching with {workers_label} / batch-1 at concurrency {top}: {ratio:.2f}x")
        print(
            f"IPC per one-item request (pipe round trip, model answering at once, one request at a time): "
            f"{remote_us - local_us:.0f} us ({local_us:.0f} us in process, {remote_us:.0f} us across processes)"
        )
    print(
        f"the model alone (no HTTP, 64 items): {single_ms:.2f} ms/item batch-1, {batched_ms:.2f} ms/item "
        f"batch-{ceiling_batch}: {single_ms / batched_ms:.2f}x, batching's own gain before HTTP, JSON and images"
    )


if __name__ == "__main__":
    main()
