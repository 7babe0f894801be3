#!/usr/bin/env bash
# Sets up (only if .venv is missing or the lock changed; see scripts/setup.sh) and runs the service.
# With no provider configured it serves the embedded llama.cpp model on GRPC_LISTEN_ADDRESS
# (default 127.0.0.1:50051). Once set up, a restart touches no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m service
