"""Throughput of our batched Macenko vs torchstain (one patch per call) on the same real 224 px CMU tiles.

Usage: .venv/bin/python benchmarks/macenko.py [--quick] [--json PATH] [--device cpu|cuda] [--chunk-size N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from exaonepath_core.stain import MacenkoReference, macenko_normalize_batch

TILE = 224


def load_cmu_tiles(data_root: Path) -> np.ndarray:
    """Every 224 px tile of the full grid over CMU-1-Small-Region.svs (117 tiles, tissue and background)."""
    import openslide

    with openslide.OpenSlide(str(data_root / "wsi" / "CMU-1-Small-Region.svs")) as slide:
        width, height = slide.dimensions
        coords = [(x, y) for y in range(0, height - TILE + 1, TILE) for x in range(0, width - TILE + 1, TILE)]
        return np.stack([np.asarray(slide.read_region(xy, 0, (TILE, TILE)).convert("RGB")) for xy in coords])


def time_torchstain(tiles: np.ndarray, repeats: int) -> tuple[float, int]:
    """Patches/s of torchstain's torch Macenko, one patch per call as its API takes them; and its failures."""
    import torchstain

    normalizer = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    chw = [torch.from_numpy(tile.copy()).permute(2, 0, 1) for tile in tiles]
    best, failures = float("inf"), 0
    for _ in range(repeats):
        failures = 0
        start = time.perf_counter()
        for image in chw:
            try:
                normalizer.normalize(image, stains=False)
            except (IndexError, RuntimeError):
                failures += 1
        best = min(best, time.perf_counter() - start)
    return len(tiles) / best, failures


def time_ours(tiles: np.ndarray, repeats: int, device: str, chunk_size: int | None) -> tuple[float, int]:
    """Patches/s of macenko_normalize_batch over the whole set (host to device copy included); and fallbacks."""
    batch = torch.from_numpy(tiles)
    reference = MacenkoReference.default()
    macenko_normalize_batch(batch[:4].to(device), reference, chunk_size=chunk_size)  # warm-up
    best, fallbacks = float("inf"), 0
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out, fallback = macenko_normalize_batch(batch.to(device), reference, chunk_size=chunk_size)
        out = out.cpu()
        best = min(best, time.perf_counter() - start)
        fallbacks = int(fallback.sum())
    return len(tiles) / best, fallbacks


def main() -> None:
    """Run torchstain and ours on the same tiles in one process and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one timing repeat instead of three")
    parser.add_argument("--json", type=Path, help="write the numbers here (atomic)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO_ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    tiles = load_cmu_tiles(args.data)
    ts_rate, ts_failures = time_torchstain(tiles, repeats)
    ours_rate, ours_failures = time_ours(tiles, repeats, args.device, args.chunk_size)
    result = {
        "n_patches": len(tiles),
        "patch_size": TILE,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "chunk_size": args.chunk_size,
        "torchstain_patches_per_s": round(ts_rate, 1),
        "ours_patches_per_s": round(ours_rate, 1),
        "ratio": round(ours_rate / ts_rate, 2),
        "torchstain_failures": ts_failures,
        "ours_failures": ours_failures,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{len(tiles)} CMU tiles {TILE}px on {result['device']} ({result['torch_threads']} threads): "
          f"torchstain {ts_rate:.1f}/s ({ts_failures} raised), ours {ours_rate:.1f}/s "
          f"({ours_failures} fallbacks), ratio {result['ratio']:.2f}x, peak RSS {result['peak_rss_mb']} MB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
