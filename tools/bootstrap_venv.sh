#!/usr/bin/env bash
# Create or reuse .venv and install the project only when its dependency spec changed.
# Sourced by run_all.sh and run_tests.sh; sets VENV_PY. A second run costs a hash and a file read.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EXAONEPATH_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
STAMP="$VENV/.exaonepath-install-stamp"

if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
    echo "[bootstrap] $PYTHON_BIN not found: install Python >= 3.10 (or set PYTHON=/path/to/python3)" >&2
    exit 2
fi
if ! "$PYTHON_BIN" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "[bootstrap] Python >= 3.10 is required, found $("$PYTHON_BIN" --version 2>&1)" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/tools/bootstrap_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    # A fresh install needs ~6.5 GB; pip's own "No space left on device" comes late and names no size.
    NEED_KB=$((7 * 1024 * 1024))
    FREE_KB="$(df -Pk "$VENV" 2>/dev/null | awk 'NR==2 {print $4}')"
    if [ -n "$FREE_KB" ] && [ "$FREE_KB" -lt "$NEED_KB" ] && ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1 \
        && [ "${EXAONEPATH_SKIP_DISK_CHECK:-0}" != "1" ]; then
        echo "[bootstrap] only $((FREE_KB / 1024 / 1024)) GiB free under $VENV; installing the stack (torch, timm, openslide ...) needs about 7 GiB." >&2
        echo "[bootstrap] free some space (or set EXAONEPATH_VENV to a larger disk, or EXAONEPATH_SKIP_DISK_CHECK=1 to try anyway)" >&2
        exit 1
    fi
    echo "[bootstrap] installing exaonepath_core and its pinned dependencies into $VENV (first run: a few minutes, ~6.5 GB)"
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$ROOT[dev]" > "$VENV/pip-install.log" 2>&1; then
        grep -v "is ignored: it is neither" "$VENV/pip-install.log" | tail -40 >&2
        echo "[bootstrap] pip install failed (full log: $VENV/pip-install.log)" >&2
        exit 1
    fi
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name exaonepath --display-name "Python (exaonepath)" >/dev/null
    echo "$WANT" > "$STAMP"
    echo "[bootstrap] environment ready"
fi
VENV_PY="$VENV/bin/python"
export VENV_PY
