#!/usr/bin/env bash
# Prepare the one-call GPU check (docs/DEVICE_CHECKS.md). Run HERE, on the CPU machine, before the device call:
#   bash tools/prepare_device_check.sh
# 1. downloads into .whl/ the pure-Python wheels the GPU machine lacks (torchstain; timm at the project's pin),
# 2. stages small real data into .device_data/ (CMU 224 px tiles as .npy, so the GPU machine needs no OpenSlide;
#    the TIA toolbox stain pair and golden output; a CPU Macenko fingerprint of the tiles computed here),
# 3. checks that what travels (working tree + carried folders) stays far under the 64 MiB limit,
# 4. prints the exact `run` call.
# Idempotent: wheels and staged files that are already there and up to date are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}   # needs numpy, torch, openslide, pillow (the project venv)
PIP_PYTHON=${PIP_PYTHON:-python3}               # any python with pip; only downloads wheels
DATA=${EXAONEPATH_TEST_DATA:-$REPO_ROOT/../shared/data}
WHEEL_DIR=.whl
STAGE_DIR=.device_data
TORCHSTAIN_VERSION=1.4.1
# timm travels at the version pyproject.toml pins, so the GPU run builds the same backbones as the tests here
TIMM_VERSION=$(sed -n 's/^ *"timm==\([^"]*\)".*/\1/p' pyproject.toml | head -1)
LIMIT_MIB=64
WARN_MIB=40

die() { echo "prepare_device_check: ERROR: $*" >&2; exit 1; }

[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || die "python not found: $PYTHON (set PYTHON=...)"
[ -f "$DATA/README.md" ] || die "real test data not found at $DATA (set EXAONEPATH_TEST_DATA to the shared/data folder)"
[ -n "$TIMM_VERSION" ] || die "could not read the timm pin from pyproject.toml"
for ignored in "$WHEEL_DIR/" "$STAGE_DIR/"; do
    git check-ignore -q "$ignored" || die "$ignored is not git-ignored: add it to .gitignore (it must travel as carry)"
done

# ---------------------------------------------------------------- 1. wheels (the README recipe of the device tool)
mkdir -p "$WHEEL_DIR"
fetch_wheel() {  # NAME VERSION: one version of each package in .whl/ (two would stop the install there)
    local name=$1 version=$2 file_prefix
    file_prefix=$(echo "$name" | tr '-' '_')
    if compgen -G "$WHEEL_DIR/${file_prefix}-${version}-*.whl" >/dev/null; then
        echo "wheel: $name==$version already in $WHEEL_DIR/"
    else
        "$PIP_PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEEL_DIR" "$name==$version" \
            || die "pip download $name==$version failed"
        echo "wheel: downloaded $name==$version"
    fi
    local other
    for other in "$WHEEL_DIR/${file_prefix}"-*.whl; do
        case "$other" in "$WHEEL_DIR/${file_prefix}-${version}-"*) ;; *) echo "wheel: removing other version $other"; rm -f "$other" ;; esac
    done
}
fetch_wheel torchstain "$TORCHSTAIN_VERSION"
fetch_wheel timm "$TIMM_VERSION"

# ---------------------------------------------------------------- 2. staged real data
mkdir -p "$STAGE_DIR"
"$PYTHON" - "$DATA" "$STAGE_DIR" <<'PY'
"""Stage the real inputs of the GPU checks; rebuild only what is missing or stale (sha256 in manifest.json)."""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

data, stage = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
TILE = 224
PNGS = ["tiatoolbox_source_image.png", "tiatoolbox_target_image.png", "tiatoolbox_norm_macenko.png",
        "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


manifest_path = stage / "manifest.json"
old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
old_files = old.get("files", {})
svs = data / "wsi" / "CMU-1-Small-Region.svs"
sources = {"CMU-1-Small-Region.svs": sha256(svs), **{name: sha256(data / "stain" / name) for name in PNGS}}


def up_to_date(name: str, source: str) -> bool:
    path = stage / name
    return (old.get("sources", {}).get(source) == sources[source] and path.is_file()
            and old_files.get(name) == sha256(path))


tiles_name, coords_name, fingerprint_name = "cmu_tiles_224.npy", "cmu_tiles_224_coords.npy", \
    "cmu_macenko_cpu_fingerprint.json"
if all(up_to_date(n, "CMU-1-Small-Region.svs") for n in (tiles_name, coords_name, fingerprint_name)):
    print(f"stage: {tiles_name}, {coords_name}, {fingerprint_name} up to date")
else:
    import openslide

    from exaonepath_core.data.stain.macenko import macenko_normalize_batch

    with openslide.OpenSlide(str(svs)) as slide:  # the same 224 px grid as tests/test_stain.py and the benchmark
        width, height = slide.dimensions
        coords = np.array([(x, y) for y in range(0, height - TILE + 1, TILE)
                           for x in range(0, width - TILE + 1, TILE)], dtype=np.int64)
        tiles = np.stack([np.asarray(slide.read_region((int(x), int(y)), 0, (TILE, TILE)).convert("RGB"))
                          for x, y in coords])
    write_atomic(stage / tiles_name, lambda p: np.save(open(p, "wb"), tiles))
    write_atomic(stage / coords_name, lambda p: np.save(open(p, "wb"), coords))
    # fingerprint of the CPU result here (the numba kernel, the CPU default): per-tile fallback flags
    # and per-channel means of the normalized output, to compare the GPU output against across machines
    backend = "numba"
    normalized, fallback = macenko_normalize_batch(torch.from_numpy(tiles), backend=backend)
    fingerprint = {
        "what": "Macenko (default reference) of cmu_tiles_224.npy on this CPU machine",
        "backend": backend, "torch": torch.__version__, "n_tiles": len(tiles),
        "fallback": fallback.numpy().astype(int).tolist(),
        "channel_means": normalized.numpy().reshape(len(tiles), -1, 3).mean(axis=1).round(4).tolist(),
    }
    write_atomic(stage / fingerprint_name, lambda p: p.write_text(json.dumps(fingerprint) + "\n"))
    print(f"stage: {tiles_name} {tiles.shape} ({tiles.nbytes / 2**20:.1f} MiB), {int(fallback.sum())} of "
          f"{len(tiles)} tiles fall back on CPU ({backend})")

for name in PNGS:
    if up_to_date(name, name):
        print(f"stage: {name} up to date")
    else:
        write_atomic(stage / name, lambda p, n=name: shutil.copyfile(data / "stain" / n, p))
        print(f"stage: copied {name}")

files = {path.name: sha256(path) for path in sorted(stage.iterdir())
         if path.is_file() and path.name != "manifest.json" and not path.name.startswith(".")}
manifest = {"what": "real inputs of tools/device_check.sh (GPU checks); made by tools/prepare_device_check.sh",
            "data_root": str(data), "sources": sources, "files": files}
if manifest != old:
    write_atomic(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
PY

# ---------------------------------------------------------------- 3. what travels
travel_bytes=$( { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null;
                  find "$WHEEL_DIR" "$STAGE_DIR" -type f -printf '%s\n'; } | awk '{s += $1} END {print s + 0}')
travel_mib=$(awk -v b="$travel_bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "travels: ${travel_mib} MiB (working tree + $WHEEL_DIR + $STAGE_DIR; limit ${LIMIT_MIB} MiB)"
awk -v b="$travel_bytes" -v lim="$LIMIT_MIB" 'BEGIN {exit !(b >= lim * 1048576)}' \
    && die "the tree that travels is ${travel_mib} MiB, over the ${LIMIT_MIB} MiB limit: remove large untracked files"
awk -v b="$travel_bytes" -v w="$WARN_MIB" 'BEGIN {exit !(b >= w * 1048576)}' \
    && echo "WARNING: ${travel_mib} MiB is close to the limit; look for large untracked files (git status)"

# ---------------------------------------------------------------- 4. the call to make
cat <<EOF

Ready. On a session that is lent a GPU, make exactly this one call of the device tool 'run':
  command:   bash tools/device_check.sh
  carry:     [".whl", ".device_data"]
  timeout_s: 540
(No kind needed: an H100 or an H200 both work; the result files name the device. About 5-7 minutes of device
time plus 1-2 minutes of machine start. Then give_back. Results: device_check_summary.json and the other files
the reply lists under files_at; see docs/DEVICE_CHECKS.md for how to read them.)
EOF
