#!/usr/bin/env bash
# Sets up (if needed) and runs the service. With no provider configured it serves the embedded
# llama.cpp model on GRPC_LISTEN_ADDRESS (default 127.0.0.1:50051).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m service
