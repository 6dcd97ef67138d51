#!/usr/bin/env bash
# The GPU check kit (docs/DEVICE_CHECKS.md): run ON THE GPU MACHINE as one call of the device tool,
#   command: bash tools/device_check.sh    carry: [".whl", ".device_data"]    timeout_s: 540
# after tools/prepare_device_check.sh has filled .whl/ and .device_data/ on the CPU machine.
#
# Installs the carried wheels into $DEVICE_CHECK_SITE (default /tmp/site), prints versions and nvidia-smi, then
# runs each part under its own `timeout` (and a total budget, DEVICE_CHECK_BUDGET_S, default 420 s) so that one
# failure or hang cannot eat the rest; it goes on past failures. Parts, most wanted numbers first:
#   macenko_bench        benchmarks/macenko.py on the staged real tiles   -> macenko_<dev>.json
#   macenko_scaling      Macenko throughput on the device at 117..4096 patches, device-resident and with copies
#   pytest               tests/test_cuda.py                               -> pytest_<dev>.xml
#   dino_step_nocompile  benchmarks/dino_step.py --no-compile             -> dino_step_<dev>_nocompile.json
#   dino_step_compile    benchmarks/dino_step.py (torch.compile)          -> dino_step_<dev>.json
#   train_store, train   python -m exaonepath_core.pretrain.training, ~50 steps    -> train_<dev>_summary.json, _log.jsonl
# Everything printed is also in $OUT/device_check.log; device_check_summary.json gathers the status of every
# part and the key numbers. At most 8 files land in $OUT (the tool returns 8). Exit status 0 even when a part
# failed (the table says FAILED); 2 when the kit cannot start (no staged data, no GPU).
#
# Rerun only some parts: DEVICE_CHECK_ONLY="dino_step_compile train_store train" bash tools/device_check.sh
# CPU dry run (no GPU): PYTHON=.venv/bin/python OUT=/tmp/devcheck DEVICE_CHECK_ALLOW_CPU=1 bash tools/device_check.sh
# runs every part with small CPU stand-ins (--quick benchmarks, a 3-step tiny training run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO_ROOT/device_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
WORK=${DEVICE_CHECK_WORK:-/tmp/device_check_work}
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-420}
STAGE=$REPO_ROOT/.device_data
WHEELS=$REPO_ROOT/.whl
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 EXAONEPATH_DEVICE_DATA=$STAGE

# ------------------------------------------------------------------------------------------------ helpers
T0=$SECONDS
PARTS_TSV=$WORK/parts.tsv

run_part() {  # NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of the budget), record status
    local name=$1 limit=$2 left rc status start
    shift 2
    if [ -n "${DEVICE_CHECK_ONLY:-}" ] && [[ " $DEVICE_CHECK_ONLY " != *" $name "* ]]; then
        echo "=== [$name] not selected (DEVICE_CHECK_ONLY=$DEVICE_CHECK_ONLY)"
        printf '%s\tNOT_SELECTED\t0\t%s\n' "$name" "$limit" >>"$PARTS_TSV"
        return 0
    fi
    left=$((BUDGET_S - (SECONDS - T0)))
    if ((left < 30)); then
        echo "=== [$name] SKIPPED: only ${left}s of the ${BUDGET_S}s budget left"
        printf '%s\tSKIPPED\t0\t%s\n' "$name" "$limit" >>"$PARTS_TSV"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo
    echo "=== [$name] start $(date -u +%H:%M:%S) (limit ${limit}s, budget left ${left}s): $*"
    start=$SECONDS
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED(rc=$rc)" ;;
    esac
    echo "=== [$name] $status after $((SECONDS - start))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >>"$PARTS_TSV"
    return 0
}

install_wheels() {  # the device tool's recipe: pure wheels into a target folder put first on PYTHONPATH
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "WARNING: no wheels in $WHEELS (torchstain is missing on the GPU machine: macenko_bench will fail);" \
             "run tools/prepare_device_check.sh and carry .whl"
        return 0
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "ERROR: pip install of the carried wheels failed"; return 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed into $SITE: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
}

main() {
    rm -rf "$WORK" && mkdir -p "$WORK" || { echo "ERROR: cannot create $WORK"; return 2; }
    : >"$PARTS_TSV"
    echo "device_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) ($(uname -m)); repo $REPO_ROOT;" \
         "git $(git rev-parse --short HEAD 2>/dev/null || echo 'n/a (no .git travelled)'); budget ${BUDGET_S}s"
    if [ ! -f "$STAGE/manifest.json" ] || [ ! -f "$STAGE/cmu_tiles_224.npy" ]; then
        echo "ERROR: $STAGE is missing or incomplete: run tools/prepare_device_check.sh first (on the CPU" \
             "machine) and pass carry: [\".whl\", \".device_data\"] to the run call"
        return 2
    fi
    install_wheels || return 2

    # -------------------------------------------------------------------------------------------- environment
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" - "$STAGE" "$SITE" "$WORK/env.json" <<'PY' || return 2
"""Versions, where the carried packages import from, staged data integrity, and a timm backbone smoke test."""
import hashlib
import importlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

stage, site, env_json = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
import torch

env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
       "torch_cuda": torch.version.cuda}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(
        props.total_memory / 2**30, 1), gpu_multiprocessors=props.multi_processor_count)
# module -> distribution (torchstain 1.4.1's module still says __version__ 1.3.0: ask the installed metadata)
for name, dist in (("torchvision", "torchvision"), ("timm", "timm"), ("numpy", "numpy"), ("numba", "numba"),
                   ("torchstain", "torchstain"), ("yaml", "pyyaml"), ("pandas", "pandas"), ("PIL", "pillow"),
                   ("triton", "triton")):
    try:
        module = importlib.import_module(name)
        where = Path(module.__file__).resolve()
        carried = site.resolve() in where.parents
        version = importlib.metadata.version(dist)  # sys.path order: the carried copy's metadata when carried
        env[name] = f"{version}{' (carried, ' + str(where.parent) + ')' if carried else ''}"
    except Exception as err:  # report every missing package, not only the first
        env[name] = f"MISSING ({type(err).__name__}: {err})"
manifest = json.loads((stage / "manifest.json").read_text())
bad = [name for name, digest in manifest["files"].items()
       if not (stage / name).is_file() or hashlib.sha256((stage / name).read_bytes()).hexdigest() != digest]
env["staged_files_ok"] = not bad
for key, value in env.items():
    print(f"  {key}: {value}")
env_json.write_text(json.dumps(env, indent=2) + "\n")
if bad:
    sys.exit(f"ERROR: staged files missing or changed in transit: {bad} (rerun tools/prepare_device_check.sh)")
PY
    if ! "$PYTHON" -c "from exaonepath_core.models.backbones import create_backbone; create_backbone('vit_tiny_patch16_224', 32, 8)"; then
        if compgen -G "$SITE/timm" >/dev/null; then
            echo "WARNING: the carried timm does not work here; falling back to this machine's timm"
            rm -rf "$SITE"/timm "$SITE"/timm-*.dist-info
            "$PYTHON" -c "from exaonepath_core.models.backbones import create_backbone; create_backbone('vit_tiny_patch16_224', 32, 8)" \
                || { echo "ERROR: no working timm"; return 2; }
        else
            echo "ERROR: timm does not build the backbone here"
            return 2
        fi
    fi
    local cuda
    cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
    if [ "$cuda" = 1 ]; then
        DEV=cuda QUICK=()
    elif [ "${DEVICE_CHECK_ALLOW_CPU:-0}" = 1 ]; then
        echo "NOTE: no CUDA device: CPU DRY RUN with small stand-ins (DEVICE_CHECK_ALLOW_CPU=1); numbers mean nothing"
        DEV=cpu QUICK=(--quick)
    else
        echo "ERROR: torch sees no CUDA device (set DEVICE_CHECK_ALLOW_CPU=1 for a CPU dry run)"
        return 2
    fi

    # -------------------------------------------------------------------------------------------- parts
    run_part macenko_bench 120 "$PYTHON" benchmarks/macenko.py --device "$DEV" --tiles "$STAGE/cmu_tiles_224.npy" \
        --json "$OUT/macenko_$DEV.json" "${QUICK[@]}"
    run_part macenko_scaling 90 "$PYTHON" - "$DEV" "$STAGE/cmu_tiles_224.npy" "$WORK/macenko_scaling.json" <<'PY'
"""Macenko throughput of the torch backend on the device as the batch grows (the benchmark has 117 patches).

device_resident: patches already on the device, output buffer reused (what a GPU pipeline that decodes on the
GPU sees); with_copies: pinned host -> device -> host around each call (what a CPU data loader feeding the GPU
sees). The real tiles are repeated to reach the larger counts.
"""
import json
import statistics
import sys
import time

import numpy as np
import torch

from exaonepath_core.data.stain.macenko import macenko_normalize_batch

device, tiles_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
tiles = np.load(tiles_path)
cuda = device == "cuda"
counts, repeats = ([117, 1024, 4096], 5) if cuda else ([16, 64], 2)


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


rows = []
for n in counts:
    host = torch.from_numpy(np.resize(tiles, (n, *tiles.shape[1:])))
    host = host.pin_memory() if cuda else host
    on_device = host.to(device)
    out = torch.empty_like(on_device)
    host_out = torch.empty_like(host).pin_memory() if cuda else torch.empty_like(host)
    for chunk_size in ([None, 1024] if n >= 1024 and cuda else [None]):
        macenko_normalize_batch(on_device, chunk_size=chunk_size, backend="torch", out=out)  # warm-up
        resident, copies = [], []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            _, fallback = macenko_normalize_batch(on_device, chunk_size=chunk_size, backend="torch", out=out)
            sync()
            resident.append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            normalized, _ = macenko_normalize_batch(host.to(device, non_blocking=True), chunk_size=chunk_size,
                                                    backend="torch", out=out)
            host_out.copy_(normalized, non_blocking=True)
            sync()
            copies.append(n / (time.perf_counter() - start))
        row = {"n_patches": n, "chunk_size": chunk_size or "default", "n_fallback": int(fallback.sum()),
               "device_resident_patches_per_s": round(statistics.median(resident), 1),
               "with_copies_patches_per_s": round(statistics.median(copies), 1)}
        rows.append(row)
        print(row, flush=True)
result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "backend": "torch", "repeats": repeats,
          "rows": rows,
          "peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None}
with open(out_path, "w") as handle:
    json.dump(result, handle, indent=2)
PY
    run_part pytest 150 "$PYTHON" -m pytest tests/test_cuda.py -q -ra -p no:cacheprovider -o addopts= \
        --durations=10 --junitxml="$OUT/pytest_$DEV.xml"
    run_part dino_step_nocompile 150 "$PYTHON" benchmarks/dino_step.py --device "$DEV" --no-compile \
        --json "$OUT/dino_step_${DEV}_nocompile.json" "${QUICK[@]}"
    run_part dino_step_compile 240 "$PYTHON" benchmarks/dino_step.py --device "$DEV" \
        --json "$OUT/dino_step_$DEV.json" "${QUICK[@]}"
    run_part train_store 60 "$PYTHON" - "$DEV" "$STAGE" "$WORK" <<'PY'
"""A small raw patch store of real H&E (117 CMU tiles + 2 x 16 crops of 1000 px regions, 224 px) and the
pretraining config of the check run: the paper's ViT-B/16 recipe on CUDA (2 x 224 + 8 x 96 crops, out_dim 65536,
bf16, fused AdamW, torch.compile, Macenko on the fly on the GPU), 50 steps; a tiny 3-step model on CPU."""
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from exaonepath_core.data.patch_store import PatchStoreWriter

device, stage, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
size = 224
writer = PatchStoreWriter(work / "store_raw", size, "raw")
cmu = np.load(stage / "cmu_tiles_224.npy")
cmu_coords = np.load(stage / "cmu_tiles_224_coords.npy")
writer.write_slide("CMU-1-Small-Region", cmu_coords, [cmu])
for slide_id, png in (("TCGA-HE-7130", "tiatoolbox_TCGA-HE-7130-01Z-00-DX1.png"),
                      ("tiatoolbox-target", "tiatoolbox_target_image.png")):
    image = np.asarray(Image.open(stage / png).convert("RGB"))
    coords = np.array([(x, y) for y in range(0, 4 * size, size) for x in range(0, 4 * size, size)], dtype=np.int64)
    writer.write_slide(slide_id, coords, [np.stack([image[y:y + size, x:x + size] for x, y in coords])])
index = writer.finalize()
common = {"data_root": str(work / "store_raw"), "output_dir": str(work / "train_run"), "input_arm": "macenko",
          "normalize_on_the_fly": True, "progress_bar": False, "saveckp_freq": 1000, "seed": 0}
if device == "cuda":
    # drop_path 0 and batch 64 as benchmarks/dino_step.py, so its compiled backbone graphs can come from the cache
    cfg = {**common, "arch": "vit_base_patch16_224", "patch_size": 16, "global_crop_size": 224,
           "local_crop_size": 96, "n_local_crops": 8, "out_dim": 65536, "drop_path_rate": 0.0,
           "batch_size_per_gpu": 64, "epochs": 25, "warmup_epochs": 2, "max_steps": 50, "num_workers": 4,
           "device": "cuda", "use_amp": True, "fused_adamw": True, "compile": True, "log_every": 1}
else:
    cfg = {**common, "arch": "vit_tiny_patch16_224", "patch_size": 8, "global_crop_size": 32, "local_crop_size": 16,
           "n_local_crops": 2, "out_dim": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 16,
           "batch_size_per_gpu": 8, "epochs": 1, "warmup_epochs": 0, "max_steps": 3, "num_workers": 0,
           "device": "cpu", "compile": False}
(work / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
print(f"store: {len(index)} real patches of {size} px in 3 slides; config {work / 'train.yaml'}: {cfg}")
PY
    if [ -f "$WORK/train.yaml" ]; then
        run_part train 200 "$PYTHON" -m exaonepath_core.pretrain.training --config "$WORK/train.yaml"
    else
        run_part train 1 false  # recorded as FAILED: the store part did not write a config
    fi
    cp "$WORK/train_run/summary.json" "$OUT/train_${DEV}_summary.json" 2>/dev/null || echo "no training summary.json"
    cp "$WORK/train_run/log.jsonl" "$OUT/train_${DEV}_log.jsonl" 2>/dev/null || echo "no training log.jsonl"

    # -------------------------------------------------------------------------------------------- summary
    "$PYTHON" - "$OUT" "$WORK" "$DEV" "$((SECONDS - T0))" <<'PY'
"""device_check_summary.json and the closing table: each part's status and the numbers the issues ask for."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, work, dev, total_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


parts = []
for line in (work / "parts.tsv").read_text().splitlines():
    name, status, seconds, limit = line.split("\t")
    parts.append({"part": name, "status": status, "seconds": int(seconds), "limit_s": int(limit)})
numbers = {}
macenko = load(out / f"macenko_{dev}.json")
if macenko:
    numbers["macenko_ours_patches_per_s"] = macenko.get("ours_patches_per_s")
    numbers["macenko_torchstain_patches_per_s"] = macenko.get("torchstain_patches_per_s")
    numbers["macenko_ratio_vs_torchstain"] = macenko.get("ratio")
    numbers["macenko_fallbacks"] = macenko.get("ours_failures")
scaling = load(work / "macenko_scaling.json")
if scaling:
    best = max(scaling["rows"], key=lambda r: r["device_resident_patches_per_s"])
    numbers["macenko_best_device_resident_patches_per_s"] = best["device_resident_patches_per_s"]
    numbers["macenko_best_at"] = f"{best['n_patches']} patches, chunk {best['chunk_size']}"
for tag, name in (("compile", f"dino_step_{dev}.json"), ("nocompile", f"dino_step_{dev}_nocompile.json")):
    step = load(out / name)
    if step and "skipped" in step:  # the facebookresearch/dino baseline folder did not travel with the checkout
        numbers[f"dino_{tag}_skipped"] = step["skipped"]
    elif step:
        numbers[f"dino_{tag}_ours_img_per_s"] = round(step["ours_img_per_s"], 1)
        numbers[f"dino_{tag}_reference_img_per_s"] = round(step["reference_img_per_s"], 1)
        numbers[f"dino_{tag}_ratio"] = round(step["ratio"], 2)
train = load(out / f"train_{dev}_summary.json")
if train:
    numbers.update(train_steps=train.get("steps"), train_first_loss=train.get("first_loss"),
                   train_final_loss=train.get("final_loss"), train_mean_img_per_s=train.get("mean_img_per_s"),
                   train_wall_s=train.get("wall_s"))
try:
    suite = ET.parse(out / f"pytest_{dev}.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    numbers["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    problems = [(case.get("name"), case.find("failure") if case.find("failure") is not None else case.find("error"))
                for case in suite.iter("testcase")]
    numbers["pytest_failed"] = [f"{name}: {problem.get('message', '')[:200]}" for name, problem in problems
                                if problem is not None]
except (OSError, ET.ParseError, AttributeError):
    numbers["pytest"] = None
failed = [p["part"] for p in parts if p["status"] not in ("PASS", "NOT_SELECTED")]
summary = {"device": dev, "environment": load(work / "env.json"), "total_s": total_s, "parts": parts,
           "failed_parts": failed, "numbers": numbers, "macenko_scaling": scaling,
           "goals": {"macenko_patches_per_s_on_h100": 10000, "dino_step_ratio_on_h100": 1.5}}
tmp = out / ".device_check_summary.json.tmp"
tmp.write_text(json.dumps(summary, indent=2) + "\n")
tmp.replace(out / "device_check_summary.json")
print("\n==================== device_check summary ====================")
print(f"{'part':<22}{'status':<16}{'seconds':>8}{'limit':>8}")
for p in parts:
    print(f"{p['part']:<22}{p['status']:<16}{p['seconds']:>8}{p['limit_s']:>8}")
print("numbers:")
for key, value in numbers.items():
    print(f"  {key}: {value}")
print(f"total {total_s}s; " + (f"FAILED or SKIPPED: {', '.join(failed)}" if failed else "all parts passed"))
PY
    ls -la "$OUT"
    return 0
}

main 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
