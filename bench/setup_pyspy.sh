#!/usr/bin/env bash
# Installs py-spy (the sampling profiler behind `bench.run --profile`) into its own venv,
# bench/.venv-pyspy: a tool for the benchmark, not a dependency of the service.
#
# Usage: bash bench/setup_pyspy.sh        (idempotent; a few seconds: py-spy ships as a wheel)
set -euo pipefail
PYSPY_VERSION="0.4.3"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-pyspy"
if [ -x "$VENV/bin/py-spy" ] && [ "$("$VENV/bin/py-spy" --version)" = "py-spy $PYSPY_VERSION" ]; then
  echo "py-spy $PYSPY_VERSION already installed in $VENV"
  exit 0
fi
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "py-spy==$PYSPY_VERSION"
echo "installed py-spy $PYSPY_VERSION in $VENV"
