#!/usr/bin/env bash
# The main job: bootstrap .venv, then run the pipeline's notebooks in order with papermill.
#   ./run_all.sh                      smoke profile end to end (uses a GPU when one is present)
#   ./run_all.sh --profile paper      the paper's recipe (needs the paths in configs/paper.yaml)
#   ./run_all.sh --only 03 | --from 04 | --force | --set pretrain.epochs=2
#   ./run_all.sh --sweep arms=raw,macenko,stain_augmentation
#   ./run_all.sh lab                  JupyterLab on notebooks/ and results/ in the project's venv (--allow-root as root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/bootstrap_venv.sh
if [ "${1:-}" = "lab" ]; then
    shift
    # Jupyter refuses to run as root without --allow-root, and root is the usual user in a container
    ROOT_FLAG=()
    if [ "$(id -u)" = "0" ]; then ROOT_FLAG=(--allow-root); fi
    exec "$VENV/bin/jupyter" lab --notebook-dir="$PWD" ${ROOT_FLAG[@]+"${ROOT_FLAG[@]}"} "$@"
fi
exec "$VENV_PY" -m exaonepath_core.run.pipeline "$@"
