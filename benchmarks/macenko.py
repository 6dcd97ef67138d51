"""Throughput of our batched Macenko vs torchstain (one patch per call) on the same real 224 px CMU tiles.

Usage: .venv/bin/python benchmarks/macenko.py [--quick] [--json PATH] [--device cpu|cuda] [--chunk-size N] [--threads N]
                                             [--tiles TILES.npy]
torchstain, ours with the default backend ("auto": the fused numba kernel on CPU, torch on CUDA) and ours with
the plain torch backend run interleaved in one process, several repeats; medians are reported with the load average.
`--tiles` reads the same tiles from a uint8 (N, H, W, 3) .npy (staged by tools/prepare_device_check.sh) instead of
the slide, so a machine without OpenSlide (the GPU machine) runs the benchmark.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from exaonepath_core.data.stain.macenko import macenko_normalize_batch
from exaonepath_core.data.stain.reference import MacenkoReference

TILE = 224


def load_cmu_tiles(data_root: Path) -> np.ndarray:
    """Every 224 px tile of the full grid over CMU-1-Small-Region.svs (117 tiles, tissue and background)."""
    import openslide

    path = data_root / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        raise SystemExit(f"benchmark data not found: {path} (set EXAONEPATH_TEST_DATA or --data to the shared/data "
                         "folder, or pass --tiles TILES.npy)")
    with openslide.OpenSlide(str(path)) as slide:
        width, height = slide.dimensions
        coords = [(x, y) for y in range(0, height - TILE + 1, TILE) for x in range(0, width - TILE + 1, TILE)]
        return np.stack([np.asarray(slide.read_region(xy, 0, (TILE, TILE)).convert("RGB")) for xy in coords])


def load_tiles_npy(path: Path) -> np.ndarray:
    """Tiles staged as a uint8 (N, H, W, 3) .npy (e.g. .device_data/cmu_tiles_224.npy); checks dtype and shape."""
    tiles = np.load(path)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3 or len(tiles) == 0:
        raise SystemExit(f"--tiles {path}: expected a non-empty uint8 (N, H, W, 3) array, got {tiles.dtype} "
                         f"{tiles.shape}")
    return np.ascontiguousarray(tiles)


def _load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared; timings need this context)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def time_torchstain(tiles: np.ndarray) -> tuple[float, int]:
    """Patches/s of one pass of torchstain's torch Macenko, one patch per call as its API takes them; failures."""
    import torchstain

    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    chw = [torch.from_numpy(tile.copy()).permute(2, 0, 1) for tile in tiles]
    failures = 0
    start = time.perf_counter()
    for image in chw:
        try:
            normalizer.normalize(image, stains=False)
        except (IndexError, RuntimeError):
            failures += 1
    return len(tiles) / (time.perf_counter() - start), failures


def time_ours(batches: list[torch.Tensor], device: str, chunk_size: int | None, backend: str = "auto",
              out: torch.Tensor | None = None) -> tuple[float, int]:
    """Patches/s of one pass of macenko_normalize_batch over each of `batches` (host-device copies included).

    `out` is an output buffer reused across passes, as a pipeline looping over batches does (the patch store);
    without it every pass also pays for faulting in a fresh output tensor (~5% of the numba backend's time).
    Several batches per timing make one timed block last about as long as torchstain's (a single 30 ms pass
    swings by +-20 % with the scheduler); they cycle through copies of the tiles larger than the CPU caches
    together, so no pass finds its input where the previous one left it, as a pipeline streaming new patches
    would not.
    """
    reference = MacenkoReference.default()
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        normalized, fallback = macenko_normalize_batch(batch.to(device), reference, chunk_size=chunk_size,
                                                       backend=backend, out=out)
        normalized = normalized.cpu()
    return sum(len(b) for b in batches) / (time.perf_counter() - start), int(fallback.sum())


def main() -> None:
    """Run torchstain and ours on the same tiles in one process, interleaved, and print the median ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 interleaved repeats instead of 7")
    parser.add_argument("--json", type=Path, help="write the numbers here (atomic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both (default: torch's choice; 1 is steadier on a loaded box)")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data")))
    parser.add_argument("--tiles", type=Path, default=None,
                        help="uint8 (N, H, W, 3) .npy of tiles to use instead of reading the CMU slide with OpenSlide")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    tiles = load_tiles_npy(args.tiles) if args.tiles else load_cmu_tiles(args.data)
    batch = torch.from_numpy(tiles)
    load_before = _load_average()
    time_torchstain(tiles[:4])  # warm-up all (the numba kernel loads from its cache or compiles here)
    macenko_normalize_batch(batch[:4].to(args.device))
    macenko_normalize_batch(batch[:4].to(args.device), backend="torch")
    # output buffers on the device, allocated once like a batch loop would (each backend its own)
    ours_out = torch.empty_like(batch, device=args.device)
    torch_out = torch.empty_like(batch, device=args.device)
    # passes per timed block so each lasts >= 0.25 s (one pass of ours on 117 tiles is ~30 ms on 2 cores), taken
    # in turn from copies of the tiles that together exceed the CPU caches (>= 64 MiB), so no pass finds its
    # input where the previous one left it; a fixed number of copies keeps host memory bounded on a fast GPU
    one_pass = len(batch) / time_ours([batch], args.device, args.chunk_size, out=ours_out)[0]
    one_pass_torch = len(batch) / time_ours([batch], args.device, args.chunk_size, backend="torch", out=torch_out)[0]
    copies = [batch.clone() for _ in range(max(2, math.ceil(2**26 / batch.numel())))]
    ours_passes = max(len(copies), math.ceil(0.25 / one_pass))
    torch_passes = max(len(copies), math.ceil(0.25 / one_pass_torch))
    ours_blocks = [copies[i % len(copies)] for i in range(ours_passes)]
    torch_blocks = [copies[i % len(copies)] for i in range(torch_passes)]
    ts_rates, ours_rates, torch_rates, ratios = [], [], [], []
    ts_failures = ours_failures = torch_failures = 0
    for _ in range(repeats):  # interleaved so that all see the same load
        ts_rate, ts_failures = time_torchstain(tiles)
        ours_rate, ours_failures = time_ours(ours_blocks, args.device, args.chunk_size, out=ours_out)
        torch_rate, torch_failures = time_ours(torch_blocks, args.device, args.chunk_size, backend="torch",
                                               out=torch_out)
        ts_rates.append(ts_rate)
        ours_rates.append(ours_rate)
        torch_rates.append(torch_rate)
        ratios.append(ours_rate / ts_rate)
    result = {
        "n_patches": len(tiles),
        "patch_size": int(tiles.shape[1]),
        "tiles_source": str(args.tiles) if args.tiles else "CMU-1-Small-Region.svs (OpenSlide, 224 px grid)",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "chunk_size": args.chunk_size,
        "repeats": repeats,
        "ours_passes_per_timing": ours_passes,
        "ours_torch_passes_per_timing": torch_passes,
        "ours_output_buffer_reused": True,
        "torchstain_patches_per_s": round(float(np.median(ts_rates)), 1),
        "ours_backend": "numba" if args.device == "cpu" else "torch",
        "ours_patches_per_s": round(float(np.median(ours_rates)), 1),
        "ours_torch_patches_per_s": round(float(np.median(torch_rates)), 1),
        "ratio": round(float(np.median(ratios)), 2),
        "ratio_torch_backend": round(float(np.median([t / s for t, s in zip(torch_rates, ts_rates)])), 2),
        "torchstain_runs": [round(r, 1) for r in ts_rates],
        "ours_runs": [round(r, 1) for r in ours_rates],
        "ours_torch_runs": [round(r, 1) for r in torch_rates],
        "torchstain_failures": ts_failures,
        "ours_failures": ours_failures,
        "ours_torch_failures": torch_failures,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{len(tiles)} CMU tiles {tiles.shape[1]}px on {result['device']} ({result['torch_threads']} threads, {repeats} "
          f"interleaved repeats, load {load_before} -> {result['load_average_after']}): medians torchstain "
          f"{result['torchstain_patches_per_s']}/s ({ts_failures} raised), ours ({result['ours_backend']}) "
          f"{result['ours_patches_per_s']}/s ({ours_failures} fallbacks), ratio {result['ratio']:.2f}x; ours torch "
          f"backend {result['ours_torch_patches_per_s']}/s ({torch_failures} fallbacks, "
          f"{result['ratio_torch_backend']:.2f}x); peak RSS {result['peak_rss_mb']} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
