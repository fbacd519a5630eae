"""vLLM's own OpenAI server on a unime model directory, as a subprocess (its engine inside the server process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from unime.vllm_compat import embedder_server_args

API_KEY = "eval-key-0123"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """Starts at construction (returns at once); `wait_ready` blocks until it answers; `stop` ends its group.

    The arguments come from `unime.vllm_compat.embedder_server_args` (pooling, normalisation, dtype, content
    format). The engine and its worker run inside the server process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `--distributed-executor-backend uni`): each extra process re-imports
    vLLM and torch, which took 45 s apiece on the loaded 2-core machine (start-up 200 s -> 80 s).
    """

    def __init__(self, model_dir: Path, folder: Path, server_args: Callable[..., list[str]] = embedder_server_args):
        """`server_args`: the `unime.vllm_compat` function giving the model's own arguments (an embedder's)."""
        self.model_dir = model_dir
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = server_args(model_dir, dtype="float32") + [
            "--enforce-eager", "--distributed-executor-backend", "uni", "--max-model-len", "2048",
            "--host", "127.0.0.1", "--port", str(self.port), "--api-key", API_KEY,
        ]  # fmt: skip
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CACHE_ROOT": str(folder / "cache"),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        }
        self.log_path = folder / "vllm.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log()}")
            try:
                headers = {"Authorization": f"Bearer {API_KEY}"}
                if httpx.get(f"{self.url}/v1/models", headers=headers, timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer within {timeout} s:\n{self.log()}")
            time.sleep(1)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
