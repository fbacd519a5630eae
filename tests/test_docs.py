"""Every Python block of README.md and docs/ runs, on tiny models, so the documentation cannot rot.

The blocks are collected by pytest-markdown-docs in a child pytest run (`--markdown-docs README.md docs`) whose
working folder holds what the blocks name: the quickstart's model directories (`runs/quickstart/stage2/final`,
`runs/quickstart/reranker/final`, tiny random models here) and a `photo.jpg`. The serving blocks talk to a
real `unime serve` of those directories; this module, loaded into the child run as a plugin, gives the blocks
its address and key as `url` and `KEY`. A block that is a command, not Python, is fenced as bash and not run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import unime
from tests.serve.server_process import API_KEY, start_server
from unime.data_synth.scenes import draw_scene, random_scene

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs"]
URL_VARIABLE = "UNIME_DOCS_SERVER_URL"
KEY_VARIABLE = "UNIME_DOCS_SERVER_KEY"
# What the documented `unime serve` command names the two models (docs/serving.md).
SERVED_NAMES = ["--served-model-name", "stage2", "--reranker-served-model-name", "reranker"]


def pytest_markdown_docs_globals() -> dict[str, str]:
    """The names the serving blocks use for the server they talk to (a hook of the child run)."""
    return {"url": os.environ[URL_VARIABLE], "KEY": os.environ[KEY_VARIABLE]}


def _workspace(root: Path) -> None:
    """What the blocks read: the quickstart's two model directories and a photo."""
    unime.save_tiny("qwen2_vl", root / "runs/quickstart/stage2/final", seed=0)
    unime.save_tiny("qwen2_vl", root / "runs/quickstart/reranker/final", seed=1, kind="reranker")
    draw_scene(random_scene(random.Random(0))).convert("RGB").save(root / "photo.jpg")


@pytest.mark.slow
def test_every_python_block_of_the_readme_and_the_docs_runs(tmp_path):
    _workspace(tmp_path)
    models = tmp_path / "runs/quickstart"
    server = start_server(
        [str(models / "stage2/final"), "--reranker", str(models / "reranker/final"), "--backend", "transformers"]
        + SERVED_NAMES,
        tmp_path / "serve.log",
        timeout=120,
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The child imports this module as its plugin (`-p tests.test_docs`).
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        URL_VARIABLE: server.url,
        KEY_VARIABLE: API_KEY,
    }
    try:
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "--markdown-docs", "-p", "tests.test_docs", "-p", "no:cacheprovider"]
            + ["-q", f"--rootdir={ROOT}", *map(str, DOCS)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-4000:]
    # A collection that missed blocks would pass too: every Python block must have run.
    assert f"{_python_blocks()} passed" in child.stdout, child.stdout[-4000:]


def _python_blocks() -> int:
    """How many Python blocks README.md and docs/ hold."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return sum(line.strip() in ("```python", "```py") for page in pages for line in page.read_text().splitlines())
