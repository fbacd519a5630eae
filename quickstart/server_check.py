"""Start the real server on the trained models, ask it one embedding and one rerank question, stop it.

`unime serve <embedder> --reranker <reranker>` runs as a subprocess on a free loopback port with a fresh API
key; its answers are compared with the same models loaded here (`unime.load`), and it is stopped with SIGTERM,
which must end it cleanly (exit 0).
"""

from __future__ import annotations

import base64
import io
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from unime.errors import UnimeError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cosine(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_server(
    embedder_dir: Path,
    reranker_dir: Path,
    log_path: Path,
    *,
    backend: str,
    startup_timeout_s: float,
    extra_args: list[str] = (),
) -> dict[str, Any]:
    """Serve both models, check one `/v1/embeddings` and one `/v1/rerank` answer; returns what was seen.

    Raises `UnimeError` (with the server's log) when the server does not start, answers wrongly, or does not
    stop cleanly.
    """
    import httpx

    import unime
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(3)]
    captions = [describe(scene) for scene in scenes]
    image = draw_scene(scenes[0])
    port, key = _free_port(), secrets.token_hex(16)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    command = [sys.executable, "-m", "unime.cli", "serve", str(embedder_dir), "--reranker", str(reranker_dir)]
    command += ["--backend", backend, "--host", "127.0.0.1", "--port", str(port), *extra_args]
    env = {**os.environ, "UNIME_API_KEY": key, "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    # vLLM's CPU build otherwise reserves a fraction of all memory for its KV cache and refuses to start when
    # other processes hold part of it; 1 GiB is plenty for one request of each kind (GPU builds ignore it).
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=4, desc="serve check")
    with open(log_path, "w") as log:
        # Its own session: signals meant for the server's process group (vLLM's workers) never reach this one.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            started = time.monotonic()
            _wait_ready(process, url, headers, startup_timeout_s, log_path)
            progress.update(1)
            result: dict[str, Any] = {"backend": backend, "startup_seconds": round(time.monotonic() - started, 1)}
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                inputs = [captions[0], {"image": _data_url(image)}]
                answer = _post(client, "/v1/embeddings", {"input": inputs}, log_path)
                served = [entry["embedding"] for entry in answer["data"]]
                local = unime.load(embedder_dir).encode([captions[0], image])
                result["embedding_dim"] = len(served[0])
                result["embedding_min_cosine_to_local"] = min(_cosine(s, v) for s, v in zip(served, local, strict=True))
                progress.update(1)
                query = {"image": _data_url(image)}
                answer = _post(client, "/v1/rerank", {"query": query, "documents": captions}, log_path)
                served_scores = {entry["index"]: entry["relevance_score"] for entry in answer["results"]}
                local_scores = unime.load(reranker_dir).predict([(image, caption) for caption in captions])
                order = [entry["index"] for entry in answer["results"]]
                result["rerank_order"] = order
                result["rerank_max_score_difference"] = max(
                    abs(served_scores[i] - float(local_scores[i])) for i in range(len(captions))
                )
                result["rerank_sorted"] = all(
                    served_scores[a] >= served_scores[b] for a, b in zip(order, order[1:], strict=False)
                )
                progress.update(1)
        finally:
            code = _stop(process)
            progress.update(1)
            progress.close()
    result["exit_code"] = code
    problems = []
    if result["embedding_min_cosine_to_local"] < 0.999:
        problems.append(f"served embeddings differ from local ones (cosine {result['embedding_min_cosine_to_local']})")
    if result["rerank_max_score_difference"] > 1e-3 or not result["rerank_sorted"]:
        problems.append(f"served rerank scores differ from local ones or are not sorted: {answer['results']}")
    if code != 0:
        problems.append(f"the server exited with {code} after SIGTERM")
    if problems:
        raise UnimeError("serve check: " + "; ".join(problems) + f"\n{_tail(log_path)}")
    return result


def _wait_ready(process, url: str, headers: dict, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UnimeError(f"serve check: the server exited with {process.returncode}\n{_tail(log_path)}")
        try:
            if httpx.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise UnimeError(f"serve check: no answer from {url}/health within {timeout:.0f} s\n{_tail(log_path)}")


def _post(client, route: str, body: dict, log_path: Path) -> dict:
    response = client.post(route, json=body)
    if response.status_code != 200:
        raise UnimeError(f"serve check: {route} answered {response.status_code}: {response.text}\n{_tail(log_path)}")
    return response.json()


def _stop(process, timeout: float = 60) -> int:
    """SIGTERM (graceful: in-flight requests finish), then SIGKILL only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _tail(log_path: Path, chars: int = 4000) -> str:
    try:
        return "server log (end):\n" + log_path.read_text()[-chars:]
    except OSError:
        return ""
