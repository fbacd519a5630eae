# The two commands of the README. Each one creates .venv and installs what it needs first (scripts/setup.sh,
# a no-op once the install is current).
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint bench docs docs-build

setup:
	bash scripts/setup.sh

# The main job on the embedded default: synthetic data, stage 1, mining, stage 2, reranker, evaluation, serving
# and a report (runs/quickstart/report.md); running it again resumes where it stopped.
demo: setup
	OMP_NUM_THREADS=1 .venv/bin/unime quickstart

# Everything this machine can run: lint, the docs site in strict mode (a broken link, a page missing from the
# navigation or an API page that fails to render stops it), then the whole test suite, which runs every Python
# block of README.md and docs/ (tests/test_docs.py).
test: setup lint docs-build
	$(PY) -m pytest

# The development loop: the unit tests only, no server, engine, training run or other process (markers slow, vllm
# and gpu left out), in a random order like `make test`.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow and not vllm and not gpu"

# The site goes to site/ (git-ignored).
docs-build: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet

# The docs site served locally, rebuilt on every change: http://127.0.0.1:8000
docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/encode.py
