#!/usr/bin/env bash
# Sets up (if needed), then runs every check CI runs: stubs fresh, buf lint/breaking, ruff,
# mypy, hadolint, the image replayed in a Debian root (scripts/image/check.py), the test suite, and
# a few-second benchmark smoke run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated stubs are fresh"
python scripts/gen_protos.py --check

echo "== buf lint"
buf lint
# Breaking changes against main (the merge base); says so, and why, when it cannot compare.
bash scripts/buf_breaking.sh

echo "== ruff"
ruff check service clients modal_vllm tests bench scripts

echo "== mypy (strict: service, clients)"
mypy service clients

echo "== hadolint"
hadolint Dockerfile

# No Docker engine here: the Dockerfile is replayed in a debootstrap root, the service started in it
# and asked one Chat (about 30 s once the root is cached; says SKIPPED, and why, without root).
echo "== image"
python scripts/image/check.py

echo "== pytest"
python -m pytest -q -p no:cacheprovider "$@"
