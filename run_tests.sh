#!/usr/bin/env bash
# The test suite: bootstrap .venv, then pytest (arguments pass through, e.g. ./run_tests.sh -m slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/bootstrap_venv.sh
exec "$VENV_PY" -m pytest "$@"
