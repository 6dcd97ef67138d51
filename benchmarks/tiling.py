"""Tiles/s of our tiler (tissue mask + grid + reading every tile at the target mpp) vs a plain read_region loop.

Two slide groups, reported separately because a slide's fixed cost (open, mask, coords file) matters only on
small slides:
  * `cmu`: the real CMU SVS and its pyramidal TIFF (42 tiles each at 0.5 um/px, 224 px), linked several
    times under new names to make a cohort;
  * `synthetic_<N>px`: two synthetic pyramidal slides of N x N px at 0.5 um/px (`exaonepath_core.data.synthetic`,
    about 1,700 tiles each at N = 12288), generated once into a cache folder (`--cache`, about 2 minutes on
    2 loaded cores) and reused.

Both sides read the same tiles (taken from one untimed run of our tiler) with the same kind of pool: W spawned
worker processes, one slide per task (a pool over slides). Pools are started and warmed before the clock
starts. Ours = `tile_slide` on an open `Slide` + `read_tiles(..., slide=)` over every kept tile, one open
handle per slide; the QC figure is off unless `--qc` (the JSON says `qc_figure_included`). The baseline is
`OpenSlide(path)` + `read_region` + the RGB numpy conversion any consumer needs. Each repetition measures
baseline and ours back to back, alternating which goes first; rates are medians over repetitions.

Memory: each group's slides are also tiled and read in a fresh process whose peak RSS is reported
(`memory_check`): a 12k px slide must cost about what a 2k px one does (bounded-memory design).

    .venv/bin/python benchmarks/tiling.py --quick --json /tmp/tiling.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
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

    # import cost paid before timing, like the baseline's openslide
    import exaonepath_core.data.tiling.dataset
    import exaonepath_core.data.tiling.slide  # noqa: F401

    time.sleep(0.3)  # keep this worker busy so the other warm-up tasks reach the other workers
    return os.getpid()


def _ours(args: tuple[str, str, dict]) -> int:
    from exaonepath_core.data.tiling.coords import load_tile_set
    from exaonepath_core.data.tiling.dataset import read_tiles
    from exaonepath_core.data.tiling.params import TilingParams
    from exaonepath_core.data.tiling.slide import tile_slide
    from exaonepath_core.io.slides import open_slide

    slide_path, out_dir, params = args
    n = 0
    with open_slide(slide_path) as slide:
        rec = tile_slide(slide, out_dir, TilingParams.from_dict(params))
        for batch in read_tiles(load_tile_set(rec["coords_path"]), batch_size=64, slide=slide):
            n += len(batch)
    return n


def _baseline(args: tuple[str, list, int, int]) -> int:
    import numpy as np
    import openslide

    slide_path, coords, level, size = args
    with openslide.OpenSlide(slide_path) as slide:
        for x, y in coords:
            np.asarray(slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB"))
    return len(coords)


def _own_peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (Linux), else ru_maxrss. A spawned child's ru_maxrss starts at its
    parent's RSS at fork time, so after the parent drew a QC figure it measured the parent, not the tiler."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_of_tiling(args: tuple[str, str, dict]) -> dict:
    """Run in a fresh process: tile one slide and read every tile; that process's peak RSS."""
    n = _ours(args)
    return {"n_tiles": n, "peak_rss_mb": round(_own_peak_rss_mb(), 1)}


def _timed_map(pool: ProcessPoolExecutor, fn, tasks: list) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(pool.map(fn, tasks))
    return n, time.perf_counter() - start


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _synthetic_slides(cache: Path, size_px: int) -> list[Path]:
    from exaonepath_core.data.synthetic.spec import CohortSpec
    from exaonepath_core.data.synthetic.writer import generate_cohort

    folder = cache / f"synthetic_{size_px}px"
    start = time.perf_counter()
    manifest = generate_cohort(folder, CohortSpec(n_sites=1, slides_per_site=2, slide_size_px=size_px, seed=0),
                               progress=False)
    seconds = time.perf_counter() - start
    if seconds > 5:
        print(f"generated 2 synthetic {size_px} px slides in {seconds:.0f} s (cached in {folder})")
    return [Path(p) for p in manifest["path"]]


def _measure_group(name: str, cohort: list[Path], work: Path, params, workers_list: list[int], reps: int) -> dict:
    from exaonepath_core.data.tiling.coords import load_tile_set
    from exaonepath_core.data.tiling.slide import tile_slide

    reference = {}
    for p in cohort:
        ts = load_tile_set(tile_slide(p, work / name / "reference", params)["coords_path"])
        reference[str(p)] = ts
    n_tiles = sum(len(ts) for ts in reference.values())
    per_slide = sorted({len(ts) for ts in reference.values()})
    print(f"[{name}] {len(cohort)} slides, {n_tiles} tiles (per slide: {per_slide}) of {params.tile_size} px at "
          f"{params.target_mpp} um/px")
    base_tasks = [(str(p), reference[str(p)].coords.tolist(), reference[str(p)].read_level,
                   reference[str(p)].read_size) for p in cohort]
    ctx = multiprocessing.get_context("spawn")
    cases = []
    for workers in workers_list:
        rates: dict[str, list[float]] = {"ours": [], "baseline": []}
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            list(pool.map(_warm, range(workers * 2)))
            _timed_map(pool, _baseline, base_tasks)  # page cache and decoder warm-up, untimed
            for rep in range(reps):
                ours_tasks = [(str(p), str(work / name / f"ours_w{workers}_r{rep}"), params.to_dict()) for p in cohort]
                order = [("baseline", _baseline, base_tasks), ("ours", _ours, ours_tasks)]
                if rep % 2:
                    order.reverse()  # alternate which side runs first: load drifts over a run
                for side, fn, tasks in order:
                    n, seconds = _timed_map(pool, fn, tasks)
                    assert n == n_tiles, f"{side} read {n} tiles, expected {n_tiles}"
                    rates[side].append(n / seconds)
        ours, base = statistics.median(rates["ours"]), statistics.median(rates["baseline"])
        case = {
            "workers": workers,
            "ours_tiles_per_s": round(ours, 1),
            "baseline_tiles_per_s": round(base, 1),
            "ratio": round(ours / base, 3),
            "ratio_per_rep": [round(o / b, 3) for o, b in zip(rates["ours"], rates["baseline"])],
            "loadavg": _loadavg(),
        }
        cases.append(case)
        print(f"[{name}] workers={workers}: ours {ours:.0f} tiles/s | read_region+numpy {base:.0f} tiles/s | "
              f"ratio {case['ratio']:.2f} (per rep {case['ratio_per_rep']}) | loadavg {case['loadavg']}")
    group = {
        "n_slides": len(cohort),
        "n_tiles": n_tiles,
        "tiles_per_slide": per_slide,
        "workers": [c["workers"] for c in cases],
        "ours_tiles_per_s": [c["ours_tiles_per_s"] for c in cases],
        "baseline_tiles_per_s": [c["baseline_tiles_per_s"] for c in cases],
        "ratio": [c["ratio"] for c in cases],
        "cases": cases,
    }
    if len(cases) >= 2:
        group["ours_scaling"] = round(cases[-1]["ours_tiles_per_s"] / cases[0]["ours_tiles_per_s"], 3)
        group["baseline_scaling"] = round(cases[-1]["baseline_tiles_per_s"] / cases[0]["baseline_tiles_per_s"], 3)
        print(f"[{name}] scaling {cases[0]['workers']}->{cases[-1]['workers']} workers: ours "
              f"x{group['ours_scaling']:.2f}, baseline x{group['baseline_scaling']:.2f}")
    return group


def _memory_check(slides: dict[str, Path], work: Path, params) -> dict:
    """Peak RSS of a fresh process tiling and reading one slide of each size."""
    ctx = multiprocessing.get_context("spawn")
    result = {}
    for name, path in slides.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            result[name] = pool.submit(_peak_rss_of_tiling, (str(path), str(work / "memory" / name),
                                                             params.to_dict())).result()
        print(f"[memory] {name}: {result[name]['n_tiles']} tiles, peak RSS of the tiling process "
              f"{result[name]['peak_rss_mb']:.0f} MB")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer CMU links and one repetition")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "exaonepath_bench_tiling",
                        help="folder for the generated synthetic slides (reused between runs)")
    parser.add_argument("--synthetic-size", type=int, default=12288, help="synthetic slide side in px (0: none)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 1 quick, 3 otherwise)")
    parser.add_argument("--qc", action="store_true", help="include the QC figure in our timed tiler")
    args = parser.parse_args()

    from exaonepath_core.data.tiling.params import TilingParams

    sources = [args.data / "wsi" / "CMU-1-Small-Region.svs", args.data / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        print(f"benchmark data not found: {missing} (set EXAONEPATH_TEST_DATA)", file=sys.stderr)
        return 2
    copies = 2 if args.quick else 4
    reps = args.reps or (1 if args.quick else 3)
    params = TilingParams(target_mpp=0.5, tile_size=224, qc_figure=args.qc)
    loadavg_start = _loadavg()
    print(f"loadavg at start: {loadavg_start} ({os.cpu_count()} cores); QC figure "
          f"{'included' if args.qc else 'not included'} in our timing")
    work = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    try:
        return _run(args, sources, work, copies, reps, params, loadavg_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # symlinks, coords files and QC figures of every run


def _run(args: argparse.Namespace, sources: list[Path], work: Path, copies: int, reps: int, params,
         loadavg_start: str) -> int:
    """Measure every group in the scratch folder `work` (removed by the caller) and print / save the results."""
    from exaonepath_core.data.tiling.params import TilingParams
    from exaonepath_core.data.tiling.slide import tile_slide

    cmu = []
    for c in range(copies):
        for src in sources:
            link = work / "slides" / f"{src.stem}_copy{c}{src.suffix}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src)
            cmu.append(link)
    groups_slides = {"cmu": cmu}
    if args.synthetic_size:
        groups_slides[f"synthetic_{args.synthetic_size}px"] = _synthetic_slides(args.cache, args.synthetic_size)

    start = time.perf_counter()
    tile_slide(sources[0], work / "qc", TilingParams(target_mpp=0.5, tile_size=224, qc_figure=True))
    qc_seconds = time.perf_counter() - start

    groups = {name: _measure_group(name, slides, work, params, args.workers, reps)
              for name, slides in groups_slides.items()}
    memory = _memory_check({name: slides[0] for name, slides in groups_slides.items()}, work,
                           TilingParams(target_mpp=0.5, tile_size=224, qc_figure=False))
    rss = [m["peak_rss_mb"] for m in memory.values()]
    memory_ratio = round(max(rss) / min(rss), 3)
    print(f"[memory] largest / smallest slide peak RSS: x{memory_ratio:.2f}")

    primary = list(groups)[-1]  # the largest slides: fixed per-slide costs amortized as in a real cohort
    result = {
        "primary_group": primary,
        "workers": groups[primary]["workers"],
        "ours_tiles_per_s": groups[primary]["ours_tiles_per_s"],
        "baseline_tiles_per_s": groups[primary]["baseline_tiles_per_s"],
        "ratio": groups[primary]["ratio"],
        "groups": groups,
        "memory_check": {"per_group": memory, "largest_over_smallest_rss": memory_ratio},
        "repetitions": reps,
        "statistic": "median over repetitions",
        "qc_figure_included": bool(args.qc),
        "qc_seconds_per_slide": round(qc_seconds, 3),
        "cpu_count": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": _loadavg(),
        "quick": args.quick,
    }
    for key in ("ours_scaling", "baseline_scaling"):
        if key in groups[primary]:
            result[key] = groups[primary][key]
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS (parent) {result['peak_rss_mb']} MB; loadavg at end {result['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
