#!/usr/bin/env bash
# Installs the LiteLLM proxy (the peer gateway the benchmark compares against) into its own venv,
# bench/.venv-litellm, so its many pinned dependencies never touch the service's venv.
#
# Usage: bash bench/setup_litellm.sh        (idempotent; ~1-2 minutes the first time)
#
# The pin is exact on purpose: 1.99.4 is the version measured before (REFERENCE.md: ~5.9 ms added
# per request, ~200 requests/s). Never 1.107.0.
set -euo pipefail
LITELLM_VERSION="1.99.4"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-litellm"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/litellm" ] && "$VENV/bin/python" -c "import litellm, sys; \
from importlib.metadata import version; sys.exit(version('litellm') != '$LITELLM_VERSION')" 2>/dev/null; then
  echo "litellm $LITELLM_VERSION already installed in $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "litellm[proxy]==$LITELLM_VERSION"
"$VENV/bin/litellm" --version >/dev/null 2>&1 || true
echo "installed litellm $LITELLM_VERSION in $VENV"
