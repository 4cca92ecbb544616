#!/usr/bin/env bash
# The test suite from nothing: a fresh virtualenv, the package with its dev extras, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k sampling`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-test}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
exec "$VENV/bin/python" -m pytest "$@"
