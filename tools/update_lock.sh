#!/usr/bin/env bash
# Regenerate requirements.lock, the exact hashed set ./run_all.sh and ./run_tests.sh install:
#   tools/update_lock.sh             re-resolve pyproject.toml's ranges keeping the current lock's versions
#                                    (after adding a dependency or changing a range)
#   tools/update_lock.sh --upgrade   the newest versions the ranges allow
# pip resolves the set in a scratch venv (EXAONEPATH_LOCK_VENV, default .venv-lock-tools), tools/lock_hashes.py
# adds every file's sha256 from PyPI's index. Run it on Linux x86_64 with CPython 3.11 (the CI machines), then
# ./run_tests.sh (installs the new set) and commit pyproject.toml, environment.yml and requirements.lock together.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOCK_VENV="${EXAONEPATH_LOCK_VENV:-$ROOT/.venv-lock-tools}"
CONSTRAINT=()
if [ "${1:-}" = "--upgrade" ]; then
    shift
elif [ -f requirements.lock ]; then
    # constraints files take no hashes: the pins alone
    grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' requirements.lock | sed 's/ *\\$//' > "$ROOT/.lock-constraints.tmp"
    CONSTRAINT=(-c "$ROOT/.lock-constraints.tmp")
fi
rm -rf "$LOCK_VENV"
"${PYTHON:-python3}" -m venv "$LOCK_VENV"
"$LOCK_VENV/bin/python" -m pip install -q "${CONSTRAINT[@]}" -e "$ROOT[dev,tensorboard]" "$@"
"$LOCK_VENV/bin/python" -m pip freeze --all --exclude-editable > "$LOCK_VENV/freeze.txt"
rm -f "$ROOT/.lock-constraints.tmp"
"$LOCK_VENV/bin/python" tools/lock_hashes.py "$LOCK_VENV/freeze.txt" requirements.lock
