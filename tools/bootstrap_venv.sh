#!/usr/bin/env bash
# Create or reuse a venv and install the project only when its dependency spec changed.
# Sourced by run_all.sh and run_tests.sh; sets VENV and VENV_PY. A second run costs a hash and a file read
# (and, with EXAONEPATH_SYSTEM_SITE_PACKAGES=1, two short Python starts that list the environment's torch).
#   default                             .venv with the exact, hashed set in requirements.lock
#   EXAONEPATH_VENV=PATH                another venv folder
#   EXAONEPATH_SYSTEM_SITE_PACKAGES=1   a venv that sees the environment's own torch (conda, module, container):
#                                       the lock less torch/torchvision/CUDA wheels, then the range check
#                                       (PYTHON=the environment's python; a venv's site-packages are reached too)
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
ENV_TORCH=""
if [ "$SYSTEM_SITE" = "1" ]; then
    # A venv made from a venv sees the BASE interpreter's site only, not the parent venv's (where its torch is):
    # a .pth file adds the parent's (removed again when PYTHON is a base/conda/module interpreter).
    "$PYTHON_BIN" "$ROOT/tools/requirement_sets.py" parent-site \
        "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
    # the environment's torch stack is part of what was checked: a module/conda update re-runs the range check
    STACK_RC=0
    ENV_TORCH="$("$VENV/bin/python" "$ROOT/tools/requirement_sets.py" torch-stack)" || STACK_RC=$?
    if [ "$STACK_RC" -ne 0 ] && [ "$STACK_RC" -ne 3 ]; then
        echo "[bootstrap] listing the environment's torch with $VENV/bin/python failed (exit $STACK_RC, above)" >&2
        exit 1
    elif [ "$STACK_RC" -eq 3 ]; then
        echo "[bootstrap] EXAONEPATH_SYSTEM_SITE_PACKAGES=1 keeps the environment's own torch, but $VENV/bin/python" \
             "sees none (PYTHON=$PYTHON_BIN). Load the module / activate the env that has torch and set PYTHON" \
             "to its python, or drop EXAONEPATH_SYSTEM_SITE_PACKAGES to install the lock's torch." >&2
        exit 2
    fi
fi
WANT="$( (cat "$ROOT/pyproject.toml" "$LOCK" "$ROOT/tools/bootstrap_venv.sh" "$ROOT/tools/requirement_sets.py"
          echo "$INSTALL_MODE $SYSTEM_SITE $ENV_TORCH") | sha256sum | cut -d' ' -f1)"
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
    # the editable build's leftover: with the repo root on sys.path (python -m from here) its copy of the
    # metadata would be found before the installed one, and go stale when pyproject.toml changes
    rm -rf "$ROOT/exaonepath_core.egg-info"
    if [ "$SYSTEM_SITE" = "1" ]; then
        AFTER="$("$VENV/bin/python" "$ROOT/tools/requirement_sets.py" torch-stack || true)"
        if [ "$AFTER" != "$ENV_TORCH" ]; then
            echo "[bootstrap] the install changed the torch stack the environment provides (before / after):" >&2
            printf '%s\n---\n%s\n' "$ENV_TORCH" "$AFTER" >&2
            exit 1
        fi
        echo "[bootstrap] keeping the environment's own $(echo "$ENV_TORCH" | grep '^torch==')"
        CHECK=0
        "$VENV/bin/python" -m exaonepath_core.io.env_check || CHECK=$?
        if [ "$CHECK" -eq 2 ] && [ "${EXAONEPATH_ALLOW_UNTESTED:-0}" != "1" ]; then
            echo "[bootstrap] the environment's packages above fall outside the tested ranges; fix them, or set" \
                 "EXAONEPATH_ALLOW_UNTESTED=1 to run anyway" >&2
            exit 2
        elif [ "$CHECK" -ne 0 ] && [ "$CHECK" -ne 2 ]; then
            echo "[bootstrap] python -m exaonepath_core.io.env_check failed (exit $CHECK, reason above)" >&2
            exit 1
        fi
    fi
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name exaonepath --display-name "Python (exaonepath)" >/dev/null
    echo "$WANT" > "$STAMP"
    echo "[bootstrap] environment ready"
fi
VENV_PY="$VENV/bin/python"
export VENV VENV_PY
