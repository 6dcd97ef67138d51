#!/usr/bin/env bash
# Create or reuse a venv and install the project only when its dependency spec changed.
# Sourced by run_all.sh and run_tests.sh; sets VENV and VENV_PY. A second run costs a hash and a file read.
#   default                             .venv with the exact, hashed set in requirements.lock
#   EXAONEPATH_VENV=PATH                another venv folder
#   EXAONEPATH_SYSTEM_SITE_PACKAGES=1   a venv that sees the environment's own torch (conda, module, container):
#                                       the lock less torch/torchvision/CUDA wheels, then the range check
#   EXAONEPATH_INSTALL=lowest           every range's lower bound (./run_tests.sh --lowest, .venv-lowest)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EXAONEPATH_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
STAMP="$VENV/.exaonepath-install-stamp"
LOCK="$ROOT/requirements.lock"
INSTALL_MODE="${EXAONEPATH_INSTALL:-lock}"
SYSTEM_SITE="${EXAONEPATH_SYSTEM_SITE_PACKAGES:-0}"

if [ "$INSTALL_MODE" != "lock" ] && [ "$INSTALL_MODE" != "lowest" ]; then
    echo "[bootstrap] EXAONEPATH_INSTALL must be 'lock' or 'lowest', got '$INSTALL_MODE'" >&2
    exit 2
fi
if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
    echo "[bootstrap] $PYTHON_BIN not found: install Python >= 3.11 (or set PYTHON=/path/to/python3)" >&2
    exit 2
fi
if ! "$PYTHON_BIN" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "[bootstrap] Python >= 3.11 is required, found $("$PYTHON_BIN" --version 2>&1)" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    if [ "$SYSTEM_SITE" = "1" ]; then
        echo "[bootstrap] creating $VENV on top of $("$PYTHON_BIN" -c 'import sys; print(sys.prefix)') (--system-site-packages)"
        "$PYTHON_BIN" -m venv --system-site-packages "$VENV"
    else
        echo "[bootstrap] creating $VENV"
        "$PYTHON_BIN" -m venv "$VENV"
    fi
elif [ "$SYSTEM_SITE" = "1" ] && ! grep -qi '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then
    echo "[bootstrap] EXAONEPATH_SYSTEM_SITE_PACKAGES=1 but $VENV exists without --system-site-packages;" \
         "remove it or name another folder with EXAONEPATH_VENV" >&2
    exit 2
fi
WANT="$( (cat "$ROOT/pyproject.toml" "$LOCK" "$ROOT/tools/bootstrap_venv.sh"; echo "$INSTALL_MODE $SYSTEM_SITE") \
         | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    # A fresh install needs ~6.5 GB; pip's own "No space left on device" comes late and names no size.
    NEED_KB=$((7 * 1024 * 1024))
    FREE_KB="$(df -Pk "$VENV" 2>/dev/null | awk 'NR==2 {print $4}')"
    if [ "$SYSTEM_SITE" != "1" ] && [ -n "$FREE_KB" ] && [ "$FREE_KB" -lt "$NEED_KB" ] \
        && ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1 && [ "${EXAONEPATH_SKIP_DISK_CHECK:-0}" != "1" ]; then
        echo "[bootstrap] only $((FREE_KB / 1024 / 1024)) GiB free under $VENV; installing the stack (torch, timm, openslide ...) needs about 7 GiB." >&2
        echo "[bootstrap] free some space (or set EXAONEPATH_VENV to a larger disk, or EXAONEPATH_SKIP_DISK_CHECK=1 to try anyway)" >&2
        exit 1
    fi
    PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
    REQS="$VENV/exaonepath-requirements.txt"
    # the lock holds setuptools, so the editable install needs no index; the lowest set may not
    EDITABLE=(--no-deps --no-build-isolation -e "$ROOT")
    if [ "$INSTALL_MODE" = "lowest" ]; then
        "$PYTHON_BIN" "$ROOT/tools/requirement_sets.py" lowest "$ROOT/pyproject.toml" "$REQS"
        echo "[bootstrap] installing the LOWEST tested versions of every range into $VENV"
        INSTALL=("${PIP[@]}" -r "$REQS")
        EDITABLE=(--no-deps -e "$ROOT")
    elif [ "$SYSTEM_SITE" = "1" ]; then
        "$PYTHON_BIN" "$ROOT/tools/requirement_sets.py" without-torch "$LOCK" "$REQS"
        echo "[bootstrap] installing requirements.lock (less the torch stack) into $VENV"
        # --no-deps: the lock is complete, and torch must come from the environment, not from PyPI
        INSTALL=("${PIP[@]}" --require-hashes --no-deps -r "$REQS")
    else
        echo "[bootstrap] installing requirements.lock (exact, hashed) into $VENV (first run: a few minutes, ~6.5 GB)"
        INSTALL=("${PIP[@]}" --require-hashes -r "$LOCK")
    fi
    # the package itself without dependencies: they are exactly the set installed just above
    if ! { "${INSTALL[@]}" && "${PIP[@]}" "${EDITABLE[@]}"; } > "$VENV/pip-install.log" 2>&1; then
        grep -v "is ignored: it is neither" "$VENV/pip-install.log" | tail -40 >&2
        echo "[bootstrap] pip install failed (full log: $VENV/pip-install.log)" >&2
        exit 1
    fi
    if [ "$SYSTEM_SITE" = "1" ] && ! "$VENV/bin/python" -m exaonepath_core.io.env_check \
        && [ "${EXAONEPATH_ALLOW_UNTESTED:-0}" != "1" ]; then
        echo "[bootstrap] the environment's packages above fall outside the tested ranges; fix them, or set" \
             "EXAONEPATH_ALLOW_UNTESTED=1 to run anyway" >&2
        exit 2
    fi
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name exaonepath --display-name "Python (exaonepath)" >/dev/null
    echo "$WANT" > "$STAMP"
    echo "[bootstrap] environment ready"
fi
VENV_PY="$VENV/bin/python"
export VENV VENV_PY
