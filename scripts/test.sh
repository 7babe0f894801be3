#!/usr/bin/env bash
# Sets up (if needed), then runs every check CI runs: stubs fresh, buf lint/breaking, ruff,
# mypy, hadolint, the test suite, and a few-second benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated stubs are fresh"
python scripts/gen_protos.py --check

echo "== buf lint"
buf lint
# Breaking-change check against the previous commit (or HEAD when the proto has local edits).
against=""
if ! git diff --quiet HEAD -- protos 2>/dev/null; then
  against="HEAD"
elif git cat-file -e HEAD~1:protos/inference/v1/inference.proto 2>/dev/null; then
  against="HEAD~1"
fi
if [ -n "$against" ]; then
  echo "== buf breaking against $against"
  buf breaking --against ".git#ref=$against"
fi

echo "== ruff"
ruff check service clients modal_vllm tests bench scripts

echo "== mypy (strict: service, clients)"
mypy service clients

echo "== hadolint"
hadolint Dockerfile

echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
