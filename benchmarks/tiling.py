"""Tiles/s of our tiler (tissue mask + grid + reading every tile at the target mpp) vs a plain read_region loop.

Both sides read the same tiles of the same slides (the real CMU SVS and its pyramidal TIFF, linked several
times under new names to make a cohort) with the same kind of pool: W spawned worker processes, one slide per
task. Pools are started and warmed (modules imported) before the clock starts, because pool start-up is a fixed
cost per run, not per tile. The baseline is `OpenSlide.read_region` followed by the RGB numpy conversion any
consumer needs (`baseline_tiles_per_s`); the bare read_region figure is reported as `baseline_raw_tiles_per_s`.
QC figures are off in the timed tiler (they are one PNG per slide, reported separately as `qc_seconds_per_slide`).

    .venv/bin/python benchmarks/tiling.py --quick --json /tmp/tiling.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _warm(_: int) -> int:
    import openslide  # noqa: F401

    import exaonepath_core.tiling  # noqa: F401  (import cost paid before timing, like the baseline's openslide)

    time.sleep(0.3)  # keep this worker busy so the other warm-up tasks reach the other workers
    return os.getpid()


def _ours(args: tuple[str, str, dict]) -> int:
    from exaonepath_core.tiling import TilingParams, load_tile_set, read_tiles, tile_slide

    slide_path, out_dir, params = args
    rec = tile_slide(slide_path, out_dir, TilingParams.from_dict(params))
    n = 0
    for batch in read_tiles(load_tile_set(rec["coords_path"]), batch_size=64):
        n += len(batch)
    return n


def _baseline(args: tuple[str, list, int, bool]) -> int:
    import numpy as np
    import openslide

    slide_path, coords, size, to_numpy = args
    with openslide.OpenSlide(slide_path) as slide:
        for x, y in coords:
            region = slide.read_region((int(x), int(y)), 0, (size, size))
            if to_numpy:
                np.asarray(region.convert("RGB"))
    return len(coords)


def _timed_map(pool: ProcessPoolExecutor, fn, tasks: list) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(pool.map(fn, tasks))
    return n, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cohort, one repetition")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from exaonepath_core.tiling import TilingParams, load_tile_set, tile_slide

    sources = [args.data / "wsi" / "CMU-1-Small-Region.svs", args.data / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        print(f"benchmark data not found: {missing} (set EXAONEPATH_TEST_DATA)", file=sys.stderr)
        return 2
    copies = 2 if args.quick else 6
    reps = 1 if args.quick else 3
    params = TilingParams(target_mpp=0.5, tile_size=224, qc_figure=False)
    work = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    cohort = []
    for c in range(copies):
        for src in sources:
            link = work / "slides" / f"{src.stem}_copy{c}{src.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src)
            cohort.append(link)
    # The baseline reads exactly the tiles our tiler keeps: take them from one untimed run.
    coords = {}
    for p in cohort:
        rec = tile_slide(p, work / "reference", params)
        coords[str(p)] = load_tile_set(rec["coords_path"]).coords.tolist()
    start = time.perf_counter()
    tile_slide(sources[0], work / "qc", TilingParams(target_mpp=0.5, tile_size=224, qc_figure=True))
    qc_seconds = time.perf_counter() - start
    n_tiles = sum(len(c) for c in coords.values())
    print(f"cohort: {len(cohort)} slides (2 real slides x {copies} links), {n_tiles} tiles of 224 px at 0.5 um/px")

    cases = []
    ctx = multiprocessing.get_context("spawn")
    for workers in args.workers:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            list(pool.map(_warm, range(workers * 2)))
            base_tasks = [(str(p), coords[str(p)], 224, True) for p in cohort]
            raw_tasks = [(str(p), coords[str(p)], 224, False) for p in cohort]
            _timed_map(pool, _baseline, base_tasks)  # page cache and decoder warm-up, untimed
            best = {"ours": 0.0, "baseline": 0.0, "raw": 0.0}
            for rep in range(reps):
                out = work / f"ours_w{workers}_r{rep}"
                ours_tasks = [(str(p), str(out), params.to_dict()) for p in cohort]
                for name, fn, tasks in (("baseline", _baseline, base_tasks), ("ours", _ours, ours_tasks),
                                        ("raw", _baseline, raw_tasks)):
                    n, seconds = _timed_map(pool, fn, tasks)
                    assert n == n_tiles, f"{name} read {n} tiles, expected {n_tiles}"
                    best[name] = max(best[name], n / seconds)
        case = {
            "workers": workers,
            "ours_tiles_per_s": round(best["ours"], 1),
            "baseline_tiles_per_s": round(best["baseline"], 1),
            "baseline_raw_tiles_per_s": round(best["raw"], 1),
            "ratio": round(best["ours"] / best["baseline"], 3),
        }
        cases.append(case)
        print(f"workers={workers}: ours {case['ours_tiles_per_s']:.0f} tiles/s | read_region+numpy "
              f"{case['baseline_tiles_per_s']:.0f} tiles/s | ratio {case['ratio']:.2f} | bare read_region "
              f"{case['baseline_raw_tiles_per_s']:.0f} tiles/s")
    result = {
        "workers": [c["workers"] for c in cases],
        "ours_tiles_per_s": [c["ours_tiles_per_s"] for c in cases],
        "baseline_tiles_per_s": [c["baseline_tiles_per_s"] for c in cases],
        "baseline_raw_tiles_per_s": [c["baseline_raw_tiles_per_s"] for c in cases],
        "ratio": [c["ratio"] for c in cases],
        "cases": cases,
        "n_slides": len(cohort),
        "n_tiles": n_tiles,
        "repetitions": reps,
        "qc_seconds_per_slide": round(qc_seconds, 3),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "quick": args.quick,
    }
    if len(cases) >= 2:
        result["ours_scaling"] = round(cases[-1]["ours_tiles_per_s"] / cases[0]["ours_tiles_per_s"], 3)
        result["baseline_scaling"] = round(cases[-1]["baseline_tiles_per_s"] / cases[0]["baseline_tiles_per_s"], 3)
        print(f"scaling {cases[0]['workers']}->{cases[-1]['workers']} workers: ours x{result['ours_scaling']:.2f}, "
              f"baseline x{result['baseline_scaling']:.2f}")
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS (parent) {result['peak_rss_mb']} MB; load average {result['load_average_1min']:.1f} on "
          f"{os.cpu_count()} cores")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
