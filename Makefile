# The two commands of the README. Each one creates .venv and installs what it needs first (scripts/setup.sh,
# a no-op once the install is current).
PY := .venv/bin/python

.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

# The main job on the embedded default: synthetic data, stage 1, mining, stage 2, reranker, evaluation, serving
# and a report (runs/quickstart/report.md); running it again resumes where it stopped.
demo: setup
	OMP_NUM_THREADS=1 .venv/bin/unime quickstart

# Everything this machine can run: lint, then the whole test suite.
test: setup lint
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/encode.py
