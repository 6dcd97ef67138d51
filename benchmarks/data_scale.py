"""Pretraining data at the paper's scale: the shard store and the storeless source vs today's .npy store.

In one process, side by side (the machine's load hits both):
  * bytes per patch on disk, per encoding, on real tiles (the CC0 CMU slide tiled as stage 01 does: 0.5 um/px,
    224 px), written through the real shard writer (tar headers included) and the .npy writer;
  * a shard-store index for >= 35,000 slides and >= 10^7 patches (synthetic placement: every record points at
    a real JPEG tile of the CMU slide inside template shards, hard-linked under one name per shard), and
    today's .npy store (index.csv + one sparse .npy per slide, TCGA-length slide ids) at a smaller size,
    extrapolated per patch: index bytes per patch in RAM per rank, index open time;
  * peak open files while reading one patch of every slide in random order under `ulimit -n 256` (subprocess,
    RLIMIT_NOFILE, counting /proc/self/fd): bounded by the LRU for shards, one per slide for .npy;
  * samples/s per loader worker (one process): read + crc check + decode + DINO ViT-B/16 multi-crop parameters
    (`dino.MultiCropAugmentation.sample_params`, 2 x 224 + 8 x 96), uniform over the 10^7 patches; .npy alike;
  * storeless tile reads/s (`StorelessDataset`, LRU of open slides) vs bare `openslide.OpenSlide.read_region`
    over the same coordinates (rounds alternate which goes first);
  * each figure extrapolated to 285,153,903 patches / 34,795 slides (the paper's cohort).

    .venv/bin/python benchmarks/data_scale.py --quick --json /tmp/data_scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PAPER_PATCHES, PAPER_SLIDES = 285_153_903, 34_795
NPY_BYTES_PER_224_PATCH = 224 * 224 * 3


def _data_dir() -> Path:
    return Path(os.environ.get("EXAONEPATH_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def real_tiles(work: Path):
    """The CMU slide's stage-01 tile set (0.5 um/px, 224 px) and its tiles, uint8 (N, 224, 224, 3)."""
    from exaonepath_core.data.tiling.coords import load_tile_set
    from exaonepath_core.data.tiling.dataset import read_tiles
    from exaonepath_core.data.tiling.params import TilingParams
    from exaonepath_core.data.tiling.slide import tile_slide

    slide = _data_dir() / "wsi" / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        sys.exit(f"data_scale: real slide not found at {slide} (set EXAONEPATH_TEST_DATA to the shared/data folder)")
    tile_slide(slide, work / "tiles", TilingParams(qc_figure=False))
    tile_set = load_tile_set(work / "tiles" / "coords" / "CMU-1-Small-Region.h5")
    return tile_set, np.concatenate(list(read_tiles(tile_set)))


def bytes_per_patch(work: Path, tiles: np.ndarray) -> dict:
    """On-disk bytes per patch of each encoding (shard files incl. tar headers) and of the .npy store."""
    from exaonepath_core.data.patch_store import PatchStoreWriter
    from exaonepath_core.data.shard_store import ShardStoreWriter

    coords = np.stack([np.arange(len(tiles)) * 224, np.zeros(len(tiles))], axis=1).astype(np.int64)
    out = {}
    for name, kwargs in (("jpeg_q90_420", {"encoding": "jpeg", "quality": 90}),
                         ("jpeg_q80_444", {"encoding": "jpeg", "quality": 80, "subsampling": "4:4:4"}),
                         ("webp_q90", {"encoding": "webp", "quality": 90}), ("png", {"encoding": "png"})):
        root = work / f"enc_{name}"
        writer = ShardStoreWriter(root, 224, "raw", **kwargs)
        start = time.perf_counter()
        writer.write_slide("cmu", coords, [tiles])
        seconds = time.perf_counter() - start
        writer.close()
        size = sum(p.stat().st_size for p in (root / "shards").iterdir())
        out[name] = {"bytes_per_patch": round(size / len(tiles)), "encode_ms_per_patch": round(seconds / len(tiles) * 1e3, 2)}
    writer = PatchStoreWriter(work / "enc_npy", 224, "raw")
    writer.write_slide("cmu", coords, [tiles])
    out["npy"] = {"bytes_per_patch": round((work / "enc_npy" / "slides" / "cmu.npy").stat().st_size / len(tiles))}
    return out


def _tcga_id(i: int) -> str:
    return f"TCGA-{i % 100:02d}-{i:06d}-01Z-00-DX1.{i * 2654435761 % 16 ** 12:012X}-8F5B-4A21-9C0E-{i:012d}"


def build_shard_index(root: Path, template: Path, n_slides: int, n_patches: int, n_shards: int) -> None:
    """A finalized shard store of n_patches over n_slides whose records point at real JPEG tiles of `template`."""
    from exaonepath_core.data.shard_store import INDEX_DTYPE
    from exaonepath_core.io import atomic

    template_rows = np.load(template / "records" / "cmu.npy")
    (root / "shards").mkdir(parents=True)
    template_shard = next((template / "shards").iterdir())
    names = [f"w{i:05d}.tar" for i in range(n_shards)]
    for name in names:  # one file name per shard (each opened with its own descriptor), one copy on disk
        os.link(template_shard, root / "shards" / name)
    per_slide = np.full(n_slides, n_patches // n_slides, dtype=np.int64)
    per_slide[: n_patches % n_slides] += 1
    first_row = np.concatenate([[0], np.cumsum(per_slide)])
    index = np.lib.format.open_memmap(root / "index.npy", mode="w+", dtype=INDEX_DTYPE, shape=(n_patches,))
    chunk = 1 << 20
    for start in range(0, n_patches, chunk):
        rows = np.arange(start, min(start + chunk, n_patches))
        slide = np.searchsorted(first_row, rows, side="right") - 1
        member = template_rows[rows % len(template_rows)]
        part = index[start:start + len(rows)]
        part["shard"] = slide * n_shards // n_slides  # a writer's slides fill its shards in order
        part["slide"], part["x"], part["y"] = slide, (rows - first_row[slide]) * 224, 0
        for field in ("offset", "length", "crc32"):
            part[field] = member[field]
    index.flush()
    del index
    manifest = json.loads((template / "manifest.json").read_text())
    atomic.write_json(root / "shards.json", names)
    atomic.write_json(root / "slides.json", {"slide_ids": [_tcga_id(i) for i in range(n_slides)],
                                              "first_row": first_row.tolist(), "n_rows": n_patches}, indent=0)
    atomic.write_json(root / "manifest.json", {**manifest, "counts": {"n_patches": n_patches, "n_slides_ok": n_slides}})


def build_npy_store(root: Path, n_slides: int, patches_per_slide: int) -> None:
    """Today's .npy store: one sparse uint8 .npy per slide (pixels do not matter here), ledger and index.csv."""
    import pandas as pd

    from exaonepath_core.data.patch_store import PatchStoreWriter, finalize_store

    PatchStoreWriter(root, 224, "raw")  # the manifest and the ledger header
    lines = []
    for i in range(n_slides):
        slide_id = _tcga_id(i)
        np.lib.format.open_memmap(root / "slides" / f"{slide_id}.npy", mode="w+", dtype=np.uint8,
                                  shape=(patches_per_slide, 224, 224, 3))
        pd.DataFrame({"x": np.arange(patches_per_slide) * 224, "y": 0, "fallback": 0}).to_csv(
            root / "slides" / f"{slide_id}.csv", index=False)
        lines.append(f"{slide_id},ok,,{patches_per_slide},0,0.0\n")
    with open(root / "ledger.csv", "a") as handle:  # one write instead of n_slides appends: setup only
        handle.writelines(lines)
    finalize_store(root)


def open_cost(opener) -> dict:
    """Seconds to open a dataset and the Python/numpy heap it keeps (tracemalloc), plus its peak while opening."""
    tracemalloc.start()
    start = time.perf_counter()
    dataset = opener()
    seconds = time.perf_counter() - start
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"dataset": dataset, "open_s": seconds, "heap_bytes": kept, "heap_peak_bytes": peak}


_FD_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from exaonepath_core.data.shard_dataset import open_patch_dataset
    root, kind, bound = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dataset = open_patch_dataset(root, max_open_files=bound)
    starts = np.asarray(json.load(open(os.path.join(root, "slides.json")))["first_row"]) if kind == "shards" else None
    if starts is None:
        names, first = np.unique(dataset.slide_ids, return_index=True)
        starts = np.append(np.sort(first), len(dataset))
    base = len(os.listdir("/proc/self/fd"))
    peak, done, error = 0, 0, ""
    rng = np.random.default_rng(0)
    for slide in rng.permutation(len(starts) - 1):  # one random patch of every slide, slides in random order
        index = int(rng.integers(starts[slide], starts[slide + 1]))
        try:
            dataset.encoded(index) if kind == "shards" else dataset[index]
        except OSError as err:
            error = f"{type(err).__name__}: {err}"[:200]
            break
        done += 1
        if done % 64 == 0 or done < 512:
            peak = max(peak, len(os.listdir("/proc/self/fd")) - base)
    print(json.dumps({"peak_open_files": peak, "slides_read": done, "slides": len(starts) - 1, "error": error}))
""")


def open_files_under_ulimit(root: Path, kind: str, bound: int) -> dict:
    """Peak open files (above the process's baseline) while reading one patch of every slide, ulimit -n 256."""
    run = subprocess.run([sys.executable, "-c", _FD_CHILD, str(root), kind, str(bound)], check=False,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"open-files child failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def loader_rate(dataset, n: int, seed: int, with_params: bool = True) -> tuple[float, float]:
    """(samples per wall second, per CPU second) of one process: item read (+ decode) and the ViT-B/16 multi-crop
    parameters, uniform indices. The CPU-second rate is what one worker core gives on a machine not shared."""
    import torch

    from exaonepath_core.pretrain import dino, training

    augmentation = dino.MultiCropAugmentation(global_size=224, local_size=96, n_local=8)
    crops = training.MultiCropDataset(dataset, augmentation if with_params else None, seed=seed)
    indices = np.random.default_rng(seed).integers(0, len(dataset), size=n)
    torch.set_num_threads(1)  # one loader worker = one core
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in indices:
        crops[(0, int(index))]
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu_start)


def params_ms_per_sample(n: int) -> float:
    """CPU ms per sample of the ViT-B/16 multi-crop parameters alone (seed, generator, `sample_params`), no read."""
    import torch

    from exaonepath_core.pretrain import dino

    augmentation = dino.MultiCropAugmentation(global_size=224, local_size=96, n_local=8)
    start = time.process_time()
    for index in range(n):
        augmentation.sample_params(224, 224, torch.Generator().manual_seed(dino.sample_seed(9, 0, index)))
    return (time.process_time() - start) / n * 1e3


def storeless_vs_read_region(work: Path, tile_set, n_slides: int, reads: int, rounds: int) -> dict:
    """Tile reads/s of the storeless dataset vs bare OpenSlide read_region over the same coordinates."""
    import openslide

    from exaonepath_core.data import storeless
    from exaonepath_core.data.tiling.coords import TileSet
    from exaonepath_core.io.slides import slide_id_from_path

    sets = []
    for i in range(n_slides):  # one slide under several names: distinct handles, as distinct slides would be
        path = work / "wsi" / f"slide-{i:03d}.svs"
        path.parent.mkdir(exist_ok=True)
        os.symlink(Path(tile_set.slide_path).resolve(), path)
        sets.append(TileSet(**{**tile_set.__dict__, "slide_id": slide_id_from_path(path), "slide_path": str(path)}))
    storeless.write_storeless_index(sets, work / "storeless")
    dataset = storeless.StorelessDataset(work / "storeless")
    index = np.load(work / "storeless" / "index.npy")
    paths = json.loads((work / "storeless" / "slides.json").read_text())["slide_path"]
    order = np.random.default_rng(1).integers(0, len(dataset), size=reads)
    level, size = tile_set.read_level, tile_set.read_size
    handles: dict[int, openslide.OpenSlide] = {}

    def ours() -> float:
        start = time.perf_counter()
        for i in order:
            dataset[int(i)]
        return reads / (time.perf_counter() - start)

    def bare() -> float:
        start = time.perf_counter()
        for i in order:
            slide, x, y = (int(v) for v in index[i])
            handle = handles.get(slide) or handles.setdefault(slide, openslide.OpenSlide(paths[slide]))
            np.asarray(handle.read_region((x, y), level, (size, size)).convert("RGB"))
        return reads / (time.perf_counter() - start)

    ours(), bare()  # warm: handles opened, caches filled
    ours_rates, bare_rates = [], []
    for r in range(rounds):
        for name in (("ours", "bare") if r % 2 == 0 else ("bare", "ours")):
            (ours_rates if name == "ours" else bare_rates).append(ours() if name == "ours" else bare())
    dataset.close()
    for handle in handles.values():
        handle.close()
    ours_rate, bare_rate = float(np.median(ours_rates)), float(np.median(bare_rates))
    return {"storeless_reads_per_s": round(ours_rate, 1), "read_region_reads_per_s": round(bare_rate, 1),
            "ratio": round(ours_rate / bare_rate, 3), "read_size": size, "tile_size": tile_set.tile_size,
            "rounds": rounds, "reads_per_round": reads}


def extrapolate(result: dict) -> dict:
    """Each figure of `result` at the paper's 285,153,903 patches / 34,795 slides."""
    npy = result["npy_store"]
    return {
        "n_patches": PAPER_PATCHES, "n_slides": PAPER_SLIDES,
        "store_tb": round(result["store_bytes_per_patch"] * PAPER_PATCHES / 1e12, 2),
        "index_gb_per_node": round(result["index_bytes_per_patch"] * PAPER_PATCHES / 1e9, 2),
        "index_private_mb_per_rank": round(result["index_private_bytes_per_slide"] * PAPER_SLIDES / 1e6, 1),
        # slides.json parse dominates the open; the memmap itself is O(1)
        "index_open_s": round(result["index_open_s"] / result["n_slides"] * PAPER_SLIDES, 2),
        "open_files_per_worker": result["open_files_bound"],
        "worker_hours_per_pass": round(PAPER_PATCHES / result["loader_samples_per_s_per_worker"] / 3600, 1),
        "storeless_coordinate_index_gb": round(12 * PAPER_PATCHES / 1e9, 2),
        "npy_store": {"store_tb": round(npy["store_bytes_per_patch"] * PAPER_PATCHES / 1e12, 1),
                      "index_gb_per_rank": round(npy["index_bytes_per_patch"] * PAPER_PATCHES / 1e9, 1),
                      "index_peak_gb_per_rank": round(npy["index_peak_bytes_per_patch"] * PAPER_PATCHES / 1e9, 1),
                      # linear per patch: an upper bound (the per-slide file checks are counted per patch too)
                      "index_open_s": round(npy["index_open_s"] / npy["n_patches"] * PAPER_PATCHES, 0),
                      "open_files_per_worker": PAPER_SLIDES},
    }


def goals(result: dict) -> dict:
    """The issue's goals, each True when met."""
    run = result["open_files_run"]
    return {
        "store_bytes_per_patch_le_25kb": result["store_bytes_per_patch"] <= 25_000,
        "index_bytes_per_patch_le_32": result["index_bytes_per_patch"] <= 32.0,
        "open_files_within_bound": run["peak_open_files"] <= result["open_files_bound"] and not run["error"],
        "loader_ge_1000_per_s_per_worker": result["loader_samples_per_s_per_worker"] >= 1000,
        "storeless_ge_0.8x_read_region": result["storeless_ratio_vs_read_region"] >= 0.8,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size (< ~60 s): fewer samples and a smaller .npy store")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    q = args.quick
    n_slides, n_patches, n_shards = 35_000, 10_000_000, 400
    # enough patches per slide that the per-patch costs (index.csv parse, per-patch strings) dominate the open
    npy_slides, npy_per_slide = (600, 500) if q else (5_000, 400)
    samples, bound = (1_500 if q else 10_000), 64
    work = args.work or Path(tempfile.mkdtemp(prefix="data_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, work, q, n_slides, n_patches, n_shards, npy_slides, npy_per_slide, samples, bound)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, q: bool, n_slides: int, n_patches: int, n_shards: int, npy_slides: int,
         npy_per_slide: int, samples: int, bound: int) -> int:
    from exaonepath_core.data.patch_store import PatchStoreDataset
    from exaonepath_core.data.shard_dataset import ShardStoreDataset

    t0 = time.perf_counter()
    tile_set, tiles = real_tiles(work)
    encodings = bytes_per_patch(work, tiles)
    print(f"real tiles: {len(tiles)} CMU tissue tiles of 224 px")
    for name, row in encodings.items():
        print(f"  {name:13s} {row['bytes_per_patch']:>8,d} B/patch  {row.get('encode_ms_per_patch', '')}")

    start = time.perf_counter()
    build_shard_index(work / "shards_big", work / "enc_jpeg_q90_420", n_slides, n_patches, n_shards)
    print(f"shard store: index of {n_patches:,d} patches / {n_slides:,d} slides / {n_shards} shards built in "
          f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    build_npy_store(work / "npy", npy_slides, npy_per_slide)
    npy_patches = npy_slides * npy_per_slide
    print(f".npy store: {npy_patches:,d} patches / {npy_slides:,d} slides built in {time.perf_counter() - start:.1f} s")

    shard_open = open_cost(lambda: ShardStoreDataset(work / "shards_big", max_open_files=bound))
    shards = shard_open.pop("dataset")
    index_file_bytes = (work / "shards_big" / "index.npy").stat().st_size
    npy_open = open_cost(lambda: PatchStoreDataset(work / "npy"))
    npy = npy_open.pop("dataset")
    print(f"index open: shards {shard_open['open_s']:.2f} s ({index_file_bytes / n_patches:.1f} B/patch mapped, "
          f"shared; {shard_open['heap_bytes'] / n_slides:.0f} B/slide private) | .npy {npy_open['open_s']:.2f} s "
          f"({npy_open['heap_bytes'] / npy_patches:.0f} B/patch private, peak {npy_open['heap_peak_bytes'] / npy_patches:.0f})")

    fd_shards = open_files_under_ulimit(work / "shards_big", "shards", bound)
    fd_npy = open_files_under_ulimit(work / "npy", "npy", bound)
    print(f"open files, one patch of every slide, ulimit -n 256: shards peak {fd_shards['peak_open_files']} "
          f"(bound {bound}, {fd_shards['slides_read']}/{fd_shards['slides']} slides) | .npy peak "
          f"{fd_npy['peak_open_files']} ({fd_npy['slides_read']}/{fd_npy['slides']} slides) {fd_npy['error']}")

    rates = {"shards": [], "npy": []}
    for r in range(3):  # interleaved, so load on the shared machine hits both
        for name in (("shards", "npy") if r % 2 == 0 else ("npy", "shards")):
            rates[name].append(loader_rate(shards if name == "shards" else npy, samples // 3, seed=r))
    (shard_wall, shard_rate), (npy_wall, npy_rate) = (np.median(np.array(rates[k]), axis=0) for k in ("shards", "npy"))
    _, decode_rate = loader_rate(shards, samples // 3, seed=9, with_params=False)
    _, params_rate = loader_rate(npy, samples // 3, seed=9)  # .npy reads of sparse pages cost ~nothing: params alone
    params_ms = params_ms_per_sample(samples)  # the parameters with no read at all (.npy page faults are not free)
    print(f"multi-crop params alone: {params_ms:.3f} CPU ms per sample")
    print(f"loader, 1 worker, decode + ViT-B/16 multi-crop params: shards {shard_rate:,.0f} samples per CPU second "
          f"({shard_wall:,.0f}/s wall on this shared machine) | .npy {npy_rate:,.0f} per CPU second ({npy_wall:,.0f}/s "
          f"wall; sparse files: no disk read); shard read + decode alone {decode_rate:,.0f} per CPU second")

    storeless = storeless_vs_read_region(work, tile_set, n_slides=8, reads=200 if q else 1_000, rounds=3 if q else 5)
    print(f"storeless: {storeless['storeless_reads_per_s']:,.0f} tiles/s vs bare read_region "
          f"{storeless['read_region_reads_per_s']:,.0f} tiles/s = {storeless['ratio']:.2f}x")

    store_bpp = encodings["jpeg_q90_420"]["bytes_per_patch"]
    result = {
        "quick": q, "n_slides": n_slides, "n_patches": n_patches, "n_shards": n_shards, "real_tiles": len(tiles),
        "encodings": encodings, "store_bytes_per_patch": store_bpp, "default_encoding": "jpeg q90 4:2:0",
        "index_bytes_per_patch": round(index_file_bytes / n_patches, 2),  # the .npy header over 10^7 rows: +0.00001
        "index_private_bytes_per_slide": shard_open["heap_bytes"] / n_slides,
        "index_open_s": round(shard_open["open_s"], 4),
        "peak_open_files": fd_shards["peak_open_files"], "open_files_bound": bound,
        "open_files_run": fd_shards, "loader_samples_per_s_per_worker": round(float(shard_rate), 1),
        "loader_samples_per_wall_s": round(float(shard_wall), 1),
        "decode_samples_per_cpu_s": round(float(decode_rate), 1),
        "multicrop_params_samples_per_cpu_s": round(float(params_rate), 1),
        "multicrop_params_ms_per_sample": round(params_ms, 4),
        "storeless_ratio_vs_read_region": storeless["ratio"], "storeless": storeless,
        "npy_store": {"n_slides": npy_slides, "n_patches": npy_patches,
                      "store_bytes_per_patch": encodings["npy"]["bytes_per_patch"],
                      "index_bytes_per_patch": round(npy_open["heap_bytes"] / npy_patches, 1),
                      "index_peak_bytes_per_patch": round(npy_open["heap_peak_bytes"] / npy_patches, 1),
                      "index_open_s": round(npy_open["open_s"], 3), "peak_open_files": fd_npy["peak_open_files"],
                      "open_files_run": fd_npy, "loader_samples_per_s_per_worker": round(float(npy_rate), 1),
                      "loader_samples_per_wall_s": round(float(npy_wall), 1)},
    }
    result["extrapolated"], result["goals"] = extrapolate(result), goals(result)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    e = result["extrapolated"]
    print(f"at {PAPER_PATCHES:,d} patches / {PAPER_SLIDES:,d} slides: store {e['store_tb']} TB vs .npy "
          f"{e['npy_store']['store_tb']} TB; index {e['index_gb_per_node']} GB per node (shared) + "
          f"{e['index_private_mb_per_rank']} MB per rank vs .npy {e['npy_store']['index_gb_per_rank']} GB per rank; "
          f"open {e['index_open_s']} s vs {e['npy_store']['index_open_s']:.0f} s; open files {bound} vs {PAPER_SLIDES}")
    print(f"goals: {result['goals']}; peak RSS {result['peak_rss_mb']} MB; {result['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
