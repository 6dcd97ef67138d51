#!/usr/bin/env bash
# The test suite: bootstrap .venv, lint with ruff (rules pinned in pyproject.toml), then pytest
# (arguments pass through to pytest, e.g. ./run_tests.sh -m slow).
#   ./run_tests.sh --lowest [PYTEST ARGS]   the same in .venv-lowest, with every range's lower bound installed
#                                           (run it whenever a range in pyproject.toml changes)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ "${1:-}" = "--lowest" ]; then
    shift
    export EXAONEPATH_INSTALL=lowest
    export EXAONEPATH_VENV="${EXAONEPATH_VENV:-$PWD/.venv-lowest}"
fi
source tools/bootstrap_venv.sh
# Lint before the tests: it takes about a second and a finding fails the run like a failing test would.
if "$VENV_PY" -m ruff check .; then
    :
else
    status=$?
    if [ "$status" -eq 1 ]; then
        echo "run_tests.sh: ruff check found lint findings (listed above); fix them before the tests run" \
             "('$VENV_PY -m ruff check --fix .' fixes the ones marked [*])." >&2
    else
        echo "run_tests.sh: ruff check could not run (exit $status, reason above: a bad [tool.ruff] setting," \
             "or ruff missing from the venv, which pip install -e '.[dev]' adds)." >&2
    fi
    exit 1
fi
exec "$VENV_PY" -m pytest "$@"
