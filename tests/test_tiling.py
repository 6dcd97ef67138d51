"""Tiling stage: mask on pen-marked thumbnails, grid geometry, the CMU slide, bad input, ledger, shards, reads."""
from __future__ import annotations

import dataclasses
import pickle

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from exaonepath_core.data.tiling.cli import main
from exaonepath_core.data.tiling.coords import load_tile_set
from exaonepath_core.data.tiling.dataset import TileDataset, load_tile_sets, read_tiles
from exaonepath_core.data.tiling.grid import grid_coordinates, tissue_fractions
from exaonepath_core.data.tiling.params import TilingParams, tile_geometry
from exaonepath_core.data.tiling.run import shard_slides, tile_cohort
from exaonepath_core.data.tiling.slide import tile_slide
from exaonepath_core.data.tiling.tissue import otsu_threshold, pen_mark_mask, rgb_to_hsv, tissue_mask

PARAMS_FAST = TilingParams(qc_figure=False)


@pytest.fixture(scope="module")
def wsi(shared_data):
    return shared_data / "wsi"


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, shared_data):
    """Bad inputs of every kind the issue lists, plus one good slide; written once per module."""
    d = tmp_path_factory.mktemp("bad")
    data = (shared_data / "wsi" / "CMU-1-Small-Region.svs").read_bytes()
    (d / "truncated.svs").write_bytes(data[: len(data) * 2 // 3])
    (d / "notes.svs").write_text("not a slide\n")
    tifffile.imwrite(d / "nores.tiff", _tissue_like(512), tile=(64, 64), photometric="rgb")
    tifffile.imwrite(d / "blank.tiff", np.full((1024, 1024, 3), 250, np.uint8), tile=(256, 256),
                     photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    tifffile.imwrite(d / "tiny.tiff", _tissue_like(128), tile=(64, 64), photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return d


def _tissue_like(size: int) -> np.ndarray:
    """Pink/purple H&E-like pixels with texture (saturation about 0.4)."""
    rng = np.random.default_rng(0)
    base = np.array([200, 120, 180], np.float32)
    return np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def _reference_pen_pixels(rgb: np.ndarray) -> np.ndarray:
    """Ink by plain RGB rules (histolab-style), independent of the HSV bands the mask uses."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    red = (r > 150) & (g < 80) & (b < 90)
    green = (g > r + 25) & (g > 70)
    blue = (b > r + 60) & (b > g + 20)
    return red | green | blue


# --- parameters and grid ---------------------------------------------------------------------------------------
def test_params_folder_name_and_validation():
    assert TilingParams().folder_name() == "0.50mpp_224px_0px_overlap"
    assert TilingParams(target_mpp=1.0, tile_size=96, overlap=16).folder_name() == "1.00mpp_96px_16px_overlap"
    with pytest.raises(ValueError, match="overlap"):
        TilingParams(tile_size=96, overlap=96)
    with pytest.raises(ValueError, match="unknown"):
        TilingParams.from_dict({"tile_sise": 3})
    assert TilingParams.from_dict(TilingParams(tile_size=96).to_dict()) == TilingParams(tile_size=96)


def test_grid_geometry():
    assert tile_geometry(0.25, 0.5, 224) == (448, 448)
    assert tile_geometry(0.5, 1.0, 96, overlap=32) == (192, 128)
    grid = grid_coordinates((1000, 700), 0.5, 0.5, 224)
    assert grid.dtype == np.int64 and grid.shape == (4 * 3, 2)
    assert grid[:, 0].max() + 224 <= 1000 and grid[:, 1].max() + 224 <= 700
    assert (grid[1] - grid[0]).tolist() == [224, 0]  # row-major: x moves fastest
    overlapped = grid_coordinates((1000, 700), 0.5, 0.5, 224, overlap=112)
    assert len(overlapped) == 7 * 5
    empty = grid_coordinates((100, 5000), 0.5, 0.5, 224)
    assert empty.shape == (0, 2) and empty.dtype == np.int64


def test_tissue_fractions_exact_against_upsampled_mask():
    rng = np.random.default_rng(1)
    mask = rng.random((30, 40)) > 0.6
    dims = (40 * 8, 30 * 8)  # each mask pixel is 8x8 level-0 pixels
    coords = rng.integers(0, 250, size=(200, 2))
    coords[:, 1] = np.minimum(coords[:, 1], 240 - 50)
    got = tissue_fractions(mask, dims, coords, 50)
    full = np.kron(mask, np.ones((8, 8), bool))
    want = np.array([full[y : y + 50, x : x + 50].mean() for x, y in coords])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert tissue_fractions(mask, dims, np.zeros((0, 2), np.int64), 50).shape == (0,)


def test_otsu_and_hsv():
    rng = np.random.default_rng(2)
    sample = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.5, 0.05, 3000)]).clip(0, 1)
    threshold = otsu_threshold(sample)
    # Brute force: the threshold maximizing the between-class variance of the raw sample.
    cands = np.linspace(0.05, 0.65, 61)  # inside the sample range: both classes non-empty
    between = [(sample <= t).mean() * (sample > t).mean() * (sample[sample <= t].mean() - sample[sample > t].mean()) ** 2
               for t in cands]
    assert abs(threshold - cands[int(np.argmax(between))]) < 0.02
    assert ((sample > threshold) == (np.arange(8000) >= 5000)).mean() > 0.99
    h, s, _ = rgb_to_hsv(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], np.uint8))
    np.testing.assert_allclose(h[0], [0, 120, 240, 0], atol=1e-3)
    np.testing.assert_allclose(s[0], [1, 1, 1, 0], atol=1e-6)


# --- tissue mask on real pen-marked thumbnails -------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["histolab_tcga-red-pen.png", "histolab_tcga-green-pen.png", "histolab_wsi-blue-pen.png",
             "histolab_diagnostic-slide-thumb-rgb.png"],
)
def test_mask_excludes_pen_keeps_tissue(shared_data, name):
    rgb = np.asarray(Image.open(shared_data / "thumbnails" / name).convert("RGB"))
    mask = tissue_mask(rgb)
    pen = _reference_pen_pixels(rgb)
    assert pen.sum() > 100, "fixture should contain ink"
    assert (mask & pen).sum() / pen.sum() < 0.02  # observed 0.0 on all four
    _, sat, _ = rgb_to_hsv(rgb)
    assert mask.mean() > 0.15  # tissue remains (observed 0.24-0.55)
    assert sat[mask].mean() > sat[~mask & ~pen].mean()  # kept pixels are the stained ones


def test_mask_lung_tile_and_blank(shared_data):
    rgb = np.asarray(Image.open(shared_data / "thumbnails" / "histolab_tcga-lung-rgb.png").convert("RGB"))
    mask = tissue_mask(rgb)
    assert 0.5 < mask.mean() < 0.9  # observed 0.67: tissue with white alveolar gaps
    assert pen_mark_mask(rgb).mean() < 0.01  # no ink on this tile
    assert not tissue_mask(np.full((200, 300, 3), 245, np.uint8)).any()
    noisy_white = np.clip(245 + np.random.default_rng(3).normal(0, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(noisy_white).any()


# --- the real CMU slide ------------------------------------------------------------------------------------
def test_cmu_slide_tiles_sit_on_tissue(wsi, tmp_path):
    rec = tile_slide(wsi / "CMU-1-Small-Region.svs", tmp_path, TilingParams())
    assert rec["status"] == "ok" and 30 <= rec["n_tiles"] <= 70  # observed 42 at 0.5 um/px, 224 px, >= 50 %
    assert (tmp_path / "qc" / "CMU-1-Small-Region.png").stat().st_size > 10_000
    ts = load_tile_set(rec["coords_path"])
    assert (ts.tile_size, ts.level0_patch_size, ts.read_level, ts.read_size) == (224, 224, 0, 224)
    assert ts.source_mpp == pytest.approx(0.499) and (ts.tissue_fraction >= 0.5).all()
    with h5py.File(rec["coords_path"]) as f:
        for key in ("slide_path", "level0_patch_size", "source_mpp", "target_mpp", "tile_size", "overlap",
                    "read_level", "read_scale"):
            assert key in f.attrs
    tiles = np.concatenate(list(read_tiles(ts, batch_size=16)))
    assert tiles.shape == (len(ts), 224, 224, 3) and tiles.dtype == np.uint8
    # Background: whole grid tiles the mask calls empty.
    grid = grid_coordinates((2220, 2967), 0.499, 0.5, 224)
    from exaonepath_core.io.slides import open_slide

    with open_slide(wsi / "CMU-1-Small-Region.svs") as s:
        thumb = s.thumbnail(400)
        frac = tissue_fractions(tissue_mask(thumb), s.dimensions, grid, 224)
        background = [s.read_rgb(int(x), int(y), 0, 224, 224) for x, y in grid[frac == 0][:10]]
    sat_tiles = rgb_to_hsv(tiles)[1].mean()
    sat_bg = rgb_to_hsv(np.stack(background))[1].mean()
    assert sat_tiles > sat_bg + 0.1  # observed about 0.33 vs 0.04


def test_svs_and_pyramid_give_same_grid_and_pixels(wsi, tmp_path):
    a = load_tile_set(tile_slide(wsi / "CMU-1-Small-Region.svs", tmp_path, PARAMS_FAST)["coords_path"])
    b = load_tile_set(
        tile_slide(wsi / "CMU-1-Small-Region_pyramid_generic.tiff", tmp_path, PARAMS_FAST)["coords_path"]
    )
    shared = {tuple(c) for c in a.coords} & {tuple(c) for c in b.coords}
    assert len(shared) >= 0.85 * max(len(a), len(b))  # masks from two thumbnails (observed 40 of 42 shared)
    pick = np.array(sorted(shared)[:8])
    ia = [int(np.flatnonzero((a.coords == p).all(1))[0]) for p in pick]
    ib = [int(np.flatnonzero((b.coords == p).all(1))[0]) for p in pick]
    ta = next(read_tiles(a, ia)).astype(np.int16)
    tb = next(read_tiles(b, ib)).astype(np.int16)
    assert np.abs(ta - tb).mean() < 10.0  # JPEG re-encoding tolerance (observed about 6)


def test_smoke_profile_reads_downsampled_tiles(wsi, tmp_path):
    """1.0 um/px, 96 px from a 0.499 um/px scan: read 192 px at level 0 and shrink, exactly 96 px out."""
    params = TilingParams(target_mpp=1.0, tile_size=96, qc_figure=False)
    rec = tile_slide(wsi / "CMU-1-Small-Region_pyramid_generic.tiff", tmp_path, params)
    ts = load_tile_set(rec["coords_path"])
    assert ts.level0_patch_size == 192 and ts.read_level == 0 and ts.read_size == 192
    assert 35 <= len(ts) <= 90  # observed 53 (42 at 224 px x (224/192)^2 = 57 expected)
    batches = list(read_tiles(ts, indices=np.arange(10), batch_size=4))
    assert [b.shape for b in batches] == [(4, 96, 96, 3), (4, 96, 96, 3), (2, 96, 96, 3)]
    ds = TileDataset([ts])
    tile, slide_id, x, y = ds[3]
    assert slide_id == ts.slide_id and (x, y) == tuple(int(v) for v in ts.coords[3])
    np.testing.assert_array_equal(tile, batches[0][3])
    # A level-1 read for 2 um/px tiles (downsample 4.002 ~ 1.997 um/px): no resize needed.
    rec2 = tile_slide(wsi / "CMU-1-Small-Region_pyramid_generic.tiff", tmp_path / "l1",
                      TilingParams(target_mpp=2.0, tile_size=64, min_tissue_fraction=0.2, qc_figure=False))
    ts2 = load_tile_set(rec2["coords_path"])
    assert ts2.read_level == 1 and ts2.read_size == 64 and len(ts2) > 0
    assert next(read_tiles(ts2)).shape[1:] == (64, 64, 3)


# --- cohort, bad input, ledger, shards ---------------------------------------------------------------------
def test_cohort_bad_inputs_ledger_and_rerun(bad_dir, wsi, tmp_path):
    slides = sorted(bad_dir.iterdir()) + [wsi / "CMU-1-Small-Region_pyramid_generic.tiff"]
    out = tmp_path / TilingParams().folder_name()
    rows = tile_cohort(slides, out, PARAMS_FAST, progress=False).set_index("slide_id")
    assert set(rows.index) == {"truncated", "notes", "nores", "blank", "tiny", "CMU-1-Small-Region_pyramid_generic"}
    failed = rows[rows.status == "failed"]
    assert set(failed.index) == {"truncated", "notes", "nores"}
    assert rows.loc["nores", "reason"].startswith("no mpp")
    assert "not a slide" in rows.loc["notes", "reason"] or "corrupt" in rows.loc["notes", "reason"]
    assert rows.loc["blank", "status"] == "ok" and rows.loc["blank", "n_tiles"] == 0
    assert "no tissue" in rows.loc["blank", "reason"]
    assert rows.loc["tiny", "status"] == "ok" and "smaller than one tile" in rows.loc["tiny", "reason"]
    with h5py.File(out / "coords" / "blank.h5") as f:
        assert f["coords"].shape == (0, 2) and f["coords"].dtype == np.int64
    assert list(read_tiles(load_tile_set(out / "coords" / "blank.h5"))) == []
    summary = pd.read_csv(out / "summary.csv").iloc[0]
    n_ok_tiles = int(rows.loc["CMU-1-Small-Region_pyramid_generic", "n_tiles"])
    assert (summary.slides, summary.ok, summary.failed, summary.tiles) == (6, 3, 3, n_ok_tiles)
    ledger = pd.read_csv(out / "ledger.csv")
    assert list(ledger.columns) == ["slide_id", "slide_path", "status", "reason", "n_tiles", "seconds"]
    assert len(ledger) == 6

    # Rerun: nothing is redone (ledger records untouched), failed stay failed without force.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "ledger").iterdir()}
    rows2 = tile_cohort(slides, out, PARAMS_FAST, mpp_overrides={"nores": 0.5}, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "ledger").iterdir()} == stamps
    assert (rows2.set_index("slide_id").loc["nores", "status"]) == "failed"
    # force retries the failed ones; with an override the mpp-less slide now tiles.
    rows3 = tile_cohort(slides, out, PARAMS_FAST, force=True, mpp_overrides={"nores": 0.5}, progress=False)
    rows3 = rows3.set_index("slide_id")
    assert rows3.loc["nores", "status"] == "ok" and rows3.loc["nores", "n_tiles"] > 0
    assert rows3.loc["truncated", "status"] == "failed"
    assert pd.read_csv(out / "summary.csv").iloc[0].failed == 2
    # Other parameters in the same folder are refused.
    with pytest.raises(ValueError, match="other parameters"):
        tile_cohort(slides, out, TilingParams(tile_size=96), progress=False)
    assert len(load_tile_sets(out)) == 4  # ok slides only (blank, tiny, nores, CMU pyramid)


def test_shards_are_disjoint_and_complete(tmp_path):
    paths = [tmp_path / f"s{i:02d}.svs" for i in range(11)]
    shards = [shard_slides(list(reversed(paths)), (i, 3)) for i in range(3)]
    assert sorted(p for s in shards for p in s) == sorted(paths)
    assert sum(len(s) for s in shards) == 11 and [len(s) for s in shards] == [4, 4, 3]
    assert shard_slides(paths, (1, 3)) == shards[1]  # input order does not matter
    with pytest.raises(ValueError):
        shard_slides(paths, (3, 3))


def test_worker_pool_matches_serial(bad_dir, wsi, tmp_path):
    slides = [wsi / "CMU-1-Small-Region_pyramid_generic.tiff", bad_dir / "notes.svs", bad_dir / "blank.tiff"]
    serial = tile_cohort(slides, tmp_path / "serial", PARAMS_FAST, workers=1, progress=False)
    pooled = tile_cohort(slides, tmp_path / "pool", PARAMS_FAST, workers=2, progress=False)
    cols = ["slide_id", "status", "n_tiles"]
    pd.testing.assert_frame_equal(serial[cols], pooled[cols])
    a = load_tile_set(tmp_path / "serial" / "coords" / "CMU-1-Small-Region_pyramid_generic.h5")
    b = load_tile_set(tmp_path / "pool" / "coords" / "CMU-1-Small-Region_pyramid_generic.h5")
    np.testing.assert_array_equal(a.coords, b.coords)


def test_cli_exit_one_with_failures_help_and_warnings(bad_dir, tmp_path, capsys):
    listing = tmp_path / "slides.txt"
    listing.write_text(f"# two slides\n{bad_dir / 'notes.svs'}\n{bad_dir / 'blank.tiff'}\n")
    code = main(["--slides", str(listing), "--out", str(tmp_path / "tiles"), "--target-mpp", "1.0",
                 "--tile-size", "96", "--no-progress", "--no-qc"])
    printed = capsys.readouterr().out
    assert code == 1  # a failed slide; the other one was still tiled and the table printed
    assert "FAILED notes" in printed and "0 tiles blank" in printed
    assert "all slides: 2 slides, 1 ok, 1 failed" in printed and "summary.csv (whole folder)" in printed
    assert (tmp_path / "tiles" / "1.00mpp_96px_0px_overlap" / "summary.csv").is_file()
    # Only good slides: exit 0. 0.25 um/px on a 0.5 um/px scan is an upsample, printed, not only in the ledger.
    code = main(["--slides", str(bad_dir / "blank.tiff"), "--out", str(tmp_path / "up"), "--target-mpp", "0.25",
                 "--tile-size", "96", "--no-progress", "--no-qc"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "WARNING upsampled blank: " in printed and "sharper than the scan (0.5): upsampled" in printed
    # Shards are 0-based: 2/2 is refused with the last valid one named.
    with pytest.raises(SystemExit) as info:
        main(["--slides", str(listing), "--out", str(tmp_path), "--shard", "2/2"])
    assert info.value.code == 2
    assert "0-based" in capsys.readouterr().err and "the last of 2 is 1/2" in str(info.value.__context__)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for expected in ("(default 0.5)", "(default 224)", "--overlap", "(default 0)", "(default 1)",
                     "i counted from 0", "Exit status", "1 when any slide failed"):
        assert expected in text, expected


def _small_tissue_tiff(path, mpp_x: float = 0.5, mpp_y: float | None = None, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.roll(_tissue_like(512), seed * 7, axis=1)  # different pixels per file, same tissue everywhere
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", resolutionunit="CENTIMETER",
                     resolution=(1e4 / mpp_x, 1e4 / (mpp_y or mpp_x)))
    return path


def test_duplicate_ids_across_two_shards_fail_in_both(tmp_path, capsys):
    """a/x.tiff and b/x.tiff share the id x: both shards report both paths failed; nothing overwrites."""
    root = tmp_path / "slides"
    ax = _small_tissue_tiff(root / "a" / "x.tiff", seed=1)
    bx = _small_tissue_tiff(root / "b" / "x.tif", seed=2)
    for i, name in enumerate(("w", "y", "z")):
        _small_tissue_tiff(root / f"{name}.tiff", seed=3 + i)
    args = ["--slides", str(root), "--out", str(tmp_path / "tiles"), "--target-mpp", "1.0", "--tile-size", "96",
            "--no-progress", "--no-qc"]
    out = tmp_path / "tiles" / "1.00mpp_96px_0px_overlap"
    seen = []
    for shard in ("0/2", "1/2"):
        assert main([*args, "--shard", shard]) == 1
        printed = capsys.readouterr().out
        assert f"shard {shard} (0-based)" in printed and "whole folder: every shard so far" in printed
        assert f"FAILED x ({ax}): duplicate slide id 'x' shared by 2 files ({ax}, {bx})" in printed
        assert f"FAILED x ({bx}): duplicate slide id" in printed
        seen.append(printed)
    # Shard 0 tiles w and y (round robin over the unique ids w, y, z), shard 1 tiles z; both report x twice.
    assert "shard 0/2 (0-based): 4 slides, 2 ok, 2 failed" in seen[0]
    assert "shard 1/2 (0-based): 3 slides, 1 ok, 2 failed" in seen[1]
    assert not (out / "coords" / "x.h5").exists()
    ledger = pd.read_csv(out / "ledger.csv")
    dup = ledger[ledger.slide_id == "x"]
    assert sorted(dup.slide_path) == sorted([str(ax), str(bx)]) and (dup.status == "failed").all()
    assert dup.reason.str.contains(str(ax), regex=False).all() and dup.reason.str.contains(str(bx), regex=False).all()
    summary = pd.read_csv(out / "summary.csv").iloc[0]
    assert (summary.slides, summary.ok, summary.failed) == (5, 3, 2)
    ok_tiles = ledger.loc[ledger.status == "ok", "n_tiles"]
    assert summary.tiles == ok_tiles.sum() and (ok_tiles >= 1).all()  # at most 2 x 2 tiles per 512 px slide
    # Renaming the second file away: x is retried without --force and tiles from the one file left.
    bx.rename(bx.with_name("x2.tif"))
    assert main([*args, "--shard", "0/1"]) == 0
    capsys.readouterr()
    ts = load_tile_set(out / "coords" / "x.h5")
    x_row = pd.read_csv(out / "ledger.csv").set_index("slide_id").loc["x"]
    assert ts.slide_path == str(ax.resolve()) and x_row.slide_path == str(ax) and len(ts) == x_row.n_tiles >= 1
    summary = pd.read_csv(out / "summary.csv").iloc[0]
    assert (summary.slides, summary.ok, summary.failed) == (5, 5, 0)


def test_anisotropic_slide_fails_with_reason_or_warns(tmp_path):
    """mpp 0.5 x 0.25 fails naming both values; 0.5 x 0.51 tiles at their mean with the warning in the ledger."""
    far = _small_tissue_tiff(tmp_path / "far.tiff", 0.5, 0.25)
    near = _small_tissue_tiff(tmp_path / "near.tiff", 0.5, 0.51)
    params = TilingParams(target_mpp=1.0, tile_size=96, qc_figure=False)
    with pytest.warns(UserWarning, match="anisotropic"):
        rows = tile_cohort([far, near], tmp_path / "out", params, progress=False).set_index("slide_id")
    assert rows.loc["far", "status"] == "failed"
    assert "mpp-x 0.5 vs mpp-y 0.25" in rows.loc["far", "reason"] and "--mpp-override" in rows.loc["far", "reason"]
    assert rows.loc["near", "status"] == "ok" and "anisotropic pixels" in rows.loc["near", "reason"]
    ts = load_tile_set(tmp_path / "out" / "coords" / "near.h5")
    assert ts.source_mpp == pytest.approx(0.505) and ts.level0_patch_size == round(96 * 1.0 / 0.505)


def test_no_tile_reaching_the_threshold_names_the_best_fraction(tmp_path):
    """A tissue island that covers part of every tile: 0 tiles, and the reason gives the largest fraction."""
    import re

    rgb = np.full((512, 512, 3), 245, np.uint8)
    rgb[240:400, 240:400] = _tissue_like(160)  # an 80 um square holding no whole 96 um (192 px) tile
    path = tmp_path / "island.tiff"
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", resolutionunit="CENTIMETER",
                     resolution=(2e4, 2e4))
    params = TilingParams(target_mpp=1.0, tile_size=96, min_tissue_fraction=0.99, min_object_um2=1000.0,
                          qc_figure=False)
    rec = tile_slide(path, tmp_path / "out", params)
    assert rec["n_tiles"] == 0
    best = re.search(r"no tile reaches min_tissue_fraction=0.99 \(max (\d\.\d\d) over 4 grid tiles\)", rec["reason"])
    assert best is not None, rec["reason"]
    assert 0.3 < float(best.group(1)) < 0.9  # the tile at (192, 192) holds 144 x 144 of its 192 x 192 px: 0.56


def test_ledger_records_round_trip_and_unreadable_ones_are_skipped(tmp_path):
    from exaonepath_core.io import ledger

    record = {"slide_id": "a", "slide_path": "/x/a.svs", "status": "ok", "reason": "", "n_tiles": 3, "seconds": 0.5}
    ledger.write_record(tmp_path, "a", record)
    assert ledger.read_record(ledger.record_path(tmp_path, "a")) == record
    (tmp_path / "b.json").write_text('{"slide_id": "b", "sta')  # torn by a writer of an older version
    (tmp_path / "c.json").write_text("{}")
    assert ledger.read_records(tmp_path) == [record]
    assert ledger.read_record(tmp_path / "missing.json") is None
    with pytest.raises(ValueError, match="'ok' or 'failed'"):
        ledger.write_record(tmp_path, "d", {**record, "slide_id": "d", "status": "done"})
    assert not (tmp_path / "d.json").exists()


def test_tiling_outputs_follow_the_umask(bad_dir, tmp_path):
    """Coords, QC figure, ledger records and tables get 0666 & ~umask (0644 under 022), folders 0755."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "tiles"
        tile_cohort([bad_dir / "blank.tiff", _small_tissue_tiff(tmp_path / "t.tiff")], out,
                    TilingParams(target_mpp=1.0, tile_size=96), progress=False)
        files = [out / "coords" / "t.h5", out / "qc" / "t.png", out / "ledger" / "t.json", out / "ledger.csv",
                 out / "summary.csv", out / "params.json"]
        assert {str(f.relative_to(out)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
            str(f.relative_to(out)): "0o644" for f in files
        }
        for folder in (out, out / "coords", out / "qc", out / "ledger"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        assert not [p for p in out.rglob(".*")]  # no temp files left behind
        os.umask(0o027)
        tile_slide(bad_dir / "blank.tiff", tmp_path / "strict", TilingParams(target_mpp=1.0, tile_size=96))
        assert stat.S_IMODE((tmp_path / "strict" / "coords" / "blank.h5").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "strict" / "qc" / "blank.png").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_tile_dataset_pickles_and_works_in_dataloader(wsi, tmp_path):
    import torch.utils.data

    rec = tile_slide(wsi / "CMU-1-Small-Region_pyramid_generic.tiff", tmp_path,
                     TilingParams(target_mpp=1.0, tile_size=96, qc_figure=False))
    ts = load_tile_set(rec["coords_path"])
    ds = TileDataset([ts, ts], max_open_slides=1)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == 2 * len(ts)
    first = ds[0][0]
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[len(ts)][0], first)  # second copy of the slide, same tile
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(8)), batch_size=4, num_workers=2)
    batches = list(loader)
    assert batches[0][0].shape == (4, 96, 96, 3) and batches[0][0].dtype == torch.uint8
    np.testing.assert_array_equal(batches[0][0][0].numpy(), first)
    ds.close()


def test_median_filter_uint8_equals_scipy():
    from scipy import ndimage

    from exaonepath_core.data.tiling.tissue import median_filter_uint8

    rng = np.random.default_rng(3)
    for size in (1, 2, 3, 4, 5, 7):
        for shape in ((1, 1), (5, 3), (37, 61)):
            img = rng.integers(0, 256, shape, dtype=np.uint8)
            np.testing.assert_array_equal(median_filter_uint8(img, size),
                                          ndimage.median_filter(img, size=size, mode="nearest"))


def test_open_slide_passed_through_tiling_and_reading(wsi, tmp_path):
    """One handle for mask and reads gives the same coords and pixels as the path-based calls."""
    from exaonepath_core.io.slides import open_slide

    path = wsi / "CMU-1-Small-Region_pyramid_generic.tiff"
    by_path = load_tile_set(tile_slide(path, tmp_path / "a", PARAMS_FAST)["coords_path"])
    with open_slide(path) as slide:
        rec = tile_slide(slide, tmp_path / "b", PARAMS_FAST)
        by_handle = load_tile_set(rec["coords_path"])
        tiles = np.concatenate(list(read_tiles(by_handle, batch_size=16, slide=slide)))
        with pytest.raises(ValueError, match="mpp_override"):
            tile_slide(slide, tmp_path / "c", PARAMS_FAST, mpp_override=0.5)
    assert rec["n_tiles"] == len(by_path) > 30
    np.testing.assert_array_equal(by_handle.coords, by_path.coords)
    np.testing.assert_array_equal(tiles, np.concatenate(list(read_tiles(by_path, batch_size=16))))
    with open_slide(wsi / "CMU-1-Small-Region.svs") as other, pytest.raises(ValueError, match="not the tile set"):
        next(read_tiles(by_handle, slide=other))


_RSS_SCRIPT = """
import resource, sys
from exaonepath_core.data.tiling.coords import load_tile_set
from exaonepath_core.data.tiling.dataset import read_tiles
from exaonepath_core.data.tiling.params import TilingParams
from exaonepath_core.data.tiling.slide import tile_slide
rec = tile_slide(sys.argv[1], sys.argv[2], TilingParams(qc_figure=False))
n = sum(len(b) for b in read_tiles(load_tile_set(rec["coords_path"]), batch_size=64))
# VmHWM is this process's own peak; ru_maxrss of an exec'd child starts at the parent's size (pytest's here)
hwm = [int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(n, hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _write_uniform_pyramid(path, size: int) -> None:
    """A JPEG pyramidal TIFF (levels 1, 4, 16) of one tissue-like tile repeated: cheap to write at any size."""
    tile = _tissue_like(256)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for ds in (1, 4, 16):
            side = size // ds
            n = (-(-side // 256)) ** 2  # tiles covering the level (edge tiles are cropped)
            tif.write((tile for _ in range(n)), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256),
                      photometric="rgb", compression="jpeg", resolution=(2e4 / ds, 2e4 / ds),
                      resolutionunit="CENTIMETER")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_slide_size(tmp_path):
    """Tiling and reading a 12k px slide (2,900 tiles) peaks at about the memory of a 6k px one (729 tiles).

    OpenSlide sees one level in these files, so the mask's thumbnail is read from level 0 in strips of
    THUMBNAIL_STRIP_PIXELS (16M px): both slides are larger than one strip, the case where memory must stay
    flat (a slide smaller than one strip costs less). Peaks are VmHWM of the child itself: its ru_maxrss
    would start at pytest's size and hide any growth.
    """
    import subprocess
    import sys

    results = {}
    for size in (6144, 12288):
        path = tmp_path / f"uniform_{size}.tiff"
        _write_uniform_pyramid(path, size)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / f"out{size}")],
                             check=True, capture_output=True, text=True).stdout.split()
        results[size] = (int(out[0]), float(out[1]))
    (n_small, rss_small), (n_large, rss_large) = results[6144], results[12288]
    assert n_small == (6144 // 224) ** 2 and n_large == (12288 // 224) ** 2  # uniform tissue: every grid tile
    assert rss_large < rss_small + 50, results  # MB; observed within a few MB of each other


# --- tile pixels against an independent read; overlap fractions; exact-fit grids ----------------------------
def _independent_tile(osr, x: int, y: int, level0_mpp: float, target_mpp: float, tile_size: int) -> tuple:
    """The tile at level-0 (x, y) by plain OpenSlide + torch: (tile uint8, level, read size, level-0 patch).

    The level (coarsest with mpp <= target x 1.01), the read size and the filter (anti-aliased bilinear, what
    Pillow's BILINEAR does when shrinking, as `read_one_tile` documents) are worked out here, not by the code.
    """
    import torch

    patch = round(tile_size * target_mpp / level0_mpp)
    level = max(lv for lv, ds in enumerate(osr.level_downsamples) if level0_mpp * ds <= target_mpp * 1.01)
    size = round(patch / osr.level_downsamples[level])
    region = np.array(osr.read_region((x, y), level, (size, size)).convert("RGB"))
    if size == tile_size:
        return region, level, size, patch
    chw = torch.from_numpy(region).permute(2, 0, 1)[None].float()
    small = torch.nn.functional.interpolate(chw, size=(tile_size, tile_size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(), level, size, patch


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize(
    "name, target_mpp, tile_size, want_level, resampled",
    [
        ("CMU-1-Small-Region.svs", 1.0, 96, 0, True),  # smoke profile: 192 px at level 0 shrunk to 96
        ("CMU-1-Small-Region_pyramid_generic.tiff", 3.0, 64, 1, True),  # 96 px at level 1 shrunk to 64
        ("CMU-1-Small-Region.svs", 0.5, 224, 0, False),  # level 0's own mpp (0.499 within 1 %)
        ("CMU-1-Small-Region_pyramid_generic.tiff", 2.0, 64, 1, False),  # level 1's own mpp (1.997)
    ],
)
def test_tile_pixels_match_an_independent_openslide_read(wsi, tmp_path, name, target_mpp, tile_size, want_level,
                                                         resampled):
    """Stored tiles equal read_region at the right level and size + an anti-aliased bilinear resize."""
    import openslide

    path = wsi / name
    params = TilingParams(target_mpp=target_mpp, tile_size=tile_size, min_tissue_fraction=0.2, qc_figure=False)
    ts = load_tile_set(tile_slide(path, tmp_path, params)["coords_path"])
    with openslide.OpenSlide(str(path)) as osr:
        level0_mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
        width, height = osr.dimensions
        # Six tiles spread over the set, off the diagonal so that x and y cannot stand in for each other.
        off_diagonal = np.flatnonzero(ts.coords[:, 0] != ts.coords[:, 1])
        assert len(off_diagonal) >= 6
        picks = off_diagonal[np.linspace(0, len(off_diagonal) - 1, 6).round().astype(int)]
        tiles = next(read_tiles(ts, picks))
        for tile, (x, y) in zip(tiles, ts.coords[picks].tolist()):
            want, level, size, patch = _independent_tile(osr, x, y, level0_mpp, target_mpp, tile_size)
            assert (ts.read_level, ts.read_size, ts.level0_patch_size) == (level, size, patch) and level == want_level
            assert (size != tile_size) == resampled
            # torch vs Pillow anti-aliased bilinear: observed MAD <= 0.17 grey levels (0 when not resampled);
            # reading (y, x) instead gives 33-210, a tile half a patch to the right 34-92.
            assert _mad(tile, want) < 1.0, (x, y)
            if resampled:  # Pillow itself on the same independent read: identical pixels (observed MAD 0)
                region = osr.read_region((x, y), level, (size, size)).convert("RGB")
                assert _mad(tile, np.asarray(region.resize((tile_size, tile_size), Image.Resampling.BILINEAR))) < 0.5
            # The stored (x, y) are level-0 coordinates of the patch's top-left: level 0 over the same box,
            # shrunk to the tile, shows the same tissue (observed MAD 0 for level-0 reads, 2.5-11.5 from level 1,
            # whose JPEG tiles were encoded separately), and the box half a patch along does not (34-92).
            assert x + patch <= width and y + patch <= height
            level0 = np.asarray(osr.read_region((x, y), 0, (patch, patch)).convert("RGB")
                                .resize((tile_size, tile_size), Image.Resampling.BILINEAR))
            shifted = np.asarray(osr.read_region((x + patch // 2, y), 0, (patch, patch)).convert("RGB")
                                 .resize((tile_size, tile_size), Image.Resampling.BILINEAR))
            assert _mad(tile, level0) < 16.0 and _mad(tile, shifted) > 2 * _mad(tile, level0) + 10, (x, y)
    with h5py.File(ts.coords_path) as f:
        step = int(f.attrs["level0_step"])
    assert step == patch and (ts.coords % step == 0).all()  # no overlap: the grid is multiples of the patch


def _box_overlap_fraction(x: int, y: int, size: int, rect: tuple[int, int, int, int]) -> float:
    """Share of the size x size box at (x, y) inside rect = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = rect
    return max(0, min(x + size, x1) - max(x, x0)) * max(0, min(y + size, y1) - max(y, y0)) / (size * size)


def test_overlapped_tiles_measure_tissue_over_the_whole_patch(tmp_path):
    """96 px tiles, 48 px overlap, over a tissue rectangle: each tile's fraction is of its 96 px patch, not its step."""
    rect = (512, 512, 1024, 1536)  # level-0 px; edges on the 16 px grid of the 8 um/px mask, away from the border
    rgb = np.full((2048, 2048, 3), 245, np.uint8)
    rgb[rect[1] : rect[3], rect[0] : rect[2]] = _tissue_like(1024)[:, :512]
    path = tmp_path / "rect.tiff"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    params = TilingParams(target_mpp=0.5, tile_size=96, overlap=48, min_tissue_fraction=0.0, qc_figure=False)
    rec = tile_slide(path, tmp_path / "out", params)
    ts = load_tile_set(rec["coords_path"])
    with h5py.File(rec["coords_path"]) as f:
        patch, step = int(f.attrs["level0_patch_size"]), int(f.attrs["level0_step"])
        assert float(f.attrs["mask_tissue_fraction"]) == pytest.approx(0.125, abs=0.002)  # observed 0.1243
    assert (patch, step) == (96, 48)
    over_patch = np.array([_box_overlap_fraction(x, y, patch, rect) for x, y in ts.coords.tolist()])
    over_step = np.array([_box_overlap_fraction(x, y, step, rect) for x, y in ts.coords.tolist()])
    # The mask rounds the rectangle's corners (median filter): leave out tiles within 2 mask px of a corner.
    corners = [(cx, cy) for cx in (rect[0], rect[2]) for cy in (rect[1], rect[3])]
    clear = np.array([not any(x - 32 < cx < x + patch + 32 and y - 32 < cy < y + patch + 32 for cx, cy in corners)
                      for x, y in ts.coords.tolist()])
    assert clear.sum() > 200 and len(ts) > 250  # observed 269 of 297 tiles
    # The design separates the two measures: observed 50 clear tiles differ by > 0.2 (up to 0.5).
    assert (np.abs(over_patch - over_step)[clear] > 0.2).sum() >= 30
    np.testing.assert_allclose(ts.tissue_fraction[clear], over_patch[clear], atol=0.01)  # observed error 2e-8
    np.testing.assert_allclose(ts.tissue_fraction, over_patch, atol=0.1)  # corners: observed 0.083


@pytest.mark.parametrize(
    "source_mpp, target_mpp, tile_size, overlap, patch, step",
    [(0.5, 0.5, 96, 0, 96, 96), (0.5, 0.5, 96, 32, 96, 64), (0.25, 0.5, 96, 16, 192, 160)],
)
def test_exact_fit_grid_keeps_the_last_column_and_row(source_mpp, target_mpp, tile_size, overlap, patch, step):
    """Every whole tile inside the slide: a side of k * step + patch gives k + 1 tiles, one pixel less gives k."""
    assert tile_geometry(source_mpp, target_mpp, tile_size, overlap) == (patch, step)
    for k_x, k_y in ((4, 2), (1, 5)):
        for dx, dy, cols, rows in ((0, 0, k_x + 1, k_y + 1), (-1, 0, k_x, k_y + 1), (0, -1, k_x + 1, k_y),
                                   (1, step - 1, k_x + 1, k_y + 1)):
            width, height = k_x * step + patch + dx, k_y * step + patch + dy
            grid = grid_coordinates((width, height), source_mpp, target_mpp, tile_size, overlap)
            assert len(grid) == cols * rows, (width, height)
            assert np.unique(grid[:, 0]).tolist() == [i * step for i in range(cols)]
            assert np.unique(grid[:, 1]).tolist() == [j * step for j in range(rows)]
            if (dx, dy) == (0, 0):  # the last tile ends exactly on the slide's edge
                assert grid[-1].tolist() == [width - patch, height - patch]
    # A side of exactly one patch holds one tile; one pixel less holds none.
    assert len(grid_coordinates((patch, patch), source_mpp, target_mpp, tile_size, overlap)) == 1
    assert len(grid_coordinates((patch - 1, patch), source_mpp, target_mpp, tile_size, overlap)) == 0


def test_exact_fit_slide_tiles_every_column_and_row(tmp_path):
    """Through tile_slide: a 416 x 352 px slide (5 and 4 steps of 64 + a 96 px patch) has 6 x 5 grid tiles."""
    path = tmp_path / "fit.tiff"
    tifffile.imwrite(path, _tissue_like(512)[:352, :416], tile=(64, 64), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    params = TilingParams(target_mpp=0.5, tile_size=96, overlap=32, min_tissue_fraction=0.0, qc_figure=False)
    rec = tile_slide(path, tmp_path / "out", params)
    with h5py.File(rec["coords_path"]) as f:
        assert int(f.attrs["n_grid_tiles"]) == 6 * 5
    ts = load_tile_set(rec["coords_path"])
    assert ts.coords[:, 0].max() == 416 - 96 and ts.coords[:, 1].max() == 352 - 96
    last = next(read_tiles(ts, [int(np.argmax(ts.coords.sum(1)))]))[0]
    np.testing.assert_array_equal(last, _tissue_like(512)[352 - 96 : 352, 416 - 96 : 416])  # the corner pixels


def test_verify_tiles_fails_a_slide_with_corrupt_tile_data_at_tiling_time(wsi, tmp_path):
    """Zeroed bytes inside the SVS's JPEG tiles: the header and thumbnail still read, so without verification
    the slide tiles as ok and only its tile reads fail later (stage 02); with it, it fails here with a reason."""
    broken = tmp_path / "slides" / "zeroed.svs"
    broken.parent.mkdir()
    data = bytearray((wsi / "CMU-1-Small-Region.svs").read_bytes())
    data[400_000:900_000] = bytes(500_000)
    broken.write_bytes(bytes(data))
    params = TilingParams(target_mpp=1.0, tile_size=96, qc_figure=False)
    plain = tile_cohort([broken], tmp_path / "plain", params, progress=False).set_index("slide_id")
    assert plain.loc["zeroed", "status"] == "ok" and plain.loc["zeroed", "n_tiles"] > 0
    checked = tile_cohort([broken], tmp_path / "checked", dataclasses.replace(params, verify_tiles=True),
                          progress=False).set_index("slide_id")
    assert checked.loc["zeroed", "status"] == "failed", checked.loc["zeroed"].to_dict()
    print("verify_tiles reason:", checked.loc["zeroed", "reason"])
    assert not (tmp_path / "checked" / "coords" / "zeroed.h5").exists()
    # the command line: exit 1 naming the slide and the read error
    code = main(["--slides", str(broken.parent), "--out", str(tmp_path / "cli"), "--target-mpp", "1.0",
                 "--tile-size", "96", "--no-qc", "--no-progress", "--verify-tiles"])
    assert code == 1
