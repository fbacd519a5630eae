"""MLLM generator throughput through an OpenAI-compatible endpoint: bounded concurrency against one request
at a time.

A local chat-completions server answers every request with a valid JSON answer after a fixed latency (a
stand-in for a real model's time per answer); the generator runs over the same real photos with
`--concurrency` 1 (the baseline) and each larger setting, each into a fresh output folder, in one process,
so the ratios hold on a noisy machine. Every run must keep every photo.

    .venv/bin/python bench/generate_openai.py [--photos 48] [--latency 0.2] [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PLAN = re.compile(r"task = (\S+), combination = (\S+), language = (\S+)\.")


def fixed_latency_server(latency_s: float) -> ThreadingHTTPServer:
    counter = iter(range(10**9))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
            task, combination, language = PLAN.search(prompt).groups()
            with lock:
                n = next(counter)
            example = {
                "instruction": f"Find the match {n}.",
                "query": f"query {n}",
                "positive": f"positive {n}",
                "hard_negative": f"negative {n}",
            }
            answer = {
                "description": f"photo {n}",
                "task": task,
                "combination": combination,
                "language": language,
                "draft": example,
                "evaluation": {"score": 5, "issues": ""},
                "final": example,
            }
            time.sleep(latency_s)
            message = {"role": "assistant", "content": json.dumps(answer)}
            data = json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    from conformal_clip_data import nominal_dir

    from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
    from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig

    server = fixed_latency_server(args.latency)
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for path in sorted(nominal_dir().glob("*.jpg"))[: args.photos]:
            shutil.copy(path, photos)
        print(f"{args.photos} photos, {args.latency:.2f} s per answer")
        print(f"{'concurrency':>11} | {'photos/s':>8} | {'vs 1':>6}")
        baseline = None
        for concurrency in sorted(set(args.concurrency) | {1}):
            backend = OpenAIBackend(OpenAIBackendConfig(base_url=base_url, model="bench", concurrency=concurrency))
            config = GenerateConfig(image_dir=str(photos), out_dir=f"{tmp}/out-{concurrency}", max_image_side=256)
            start = time.perf_counter()
            manifest = generate_dataset(config, backend, backend_kind="openai")
            rate = args.photos / (time.perf_counter() - start)
            assert manifest.kept == args.photos, manifest
            baseline = baseline or rate
            print(f"{concurrency:>11} | {rate:>8.1f} | {rate / baseline:>5.1f}x")
    server.shutdown()


if __name__ == "__main__":
    main()
