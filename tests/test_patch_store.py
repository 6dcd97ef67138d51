"""Patch store: layout, resumability, sharding, refusal of mismatched roots, Dataset and DDP split."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from exaonepath_core.config import parse_shard
from exaonepath_core.data import normalize_store, store_layout
from exaonepath_core.data.normalize_store import normalize_slides
from exaonepath_core.data.patch_store import (
    PatchStoreDataset,
    PatchStoreWriter,
    rank_indices,
    read_ledger,
)
from exaonepath_core.data.stain.macenko import macenko_normalize_batch
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.data.store_layout import shard_slide_ids

PATCH = 8


def _tiles(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, PATCH, PATCH, 3), dtype=np.uint8)


def _source(slide_id: str, tiles: np.ndarray, batch: int = 3, fail_after: int | None = None):
    coords = np.stack([np.arange(len(tiles)) * PATCH, np.full(len(tiles), 5)], axis=1).astype(np.int64)

    def make_batches():
        for start in range(0, len(tiles), batch):
            if fail_after is not None and start >= fail_after:
                raise OSError(f"cannot read tile {start} of {slide_id}")
            yield tiles[start : start + batch]

    return slide_id, coords, make_batches


def test_write_read_roundtrip_and_index(tmp_path):
    slides = {"s1": _tiles(1, 7), "s0": _tiles(0, 5), "empty": _tiles(2, 0)}
    ledger = normalize_slides([_source(k, v) for k, v in slides.items()], tmp_path, "raw",
                              patch_size=PATCH, progress=False)
    assert sorted(ledger["slide_id"]) == ["empty", "s0", "s1"]
    assert (ledger["status"] == "ok").all() and ledger["n_patches"].sum() == 12
    assert {p.name for p in (tmp_path / "slides").iterdir()} == {
        f"{s}.{ext}" for s in slides for ext in ("npy", "csv")
    }  # no temp files left behind
    writer = PatchStoreWriter(tmp_path, PATCH, "raw")
    index = writer.finalize()
    assert list(index.columns) == ["patch_index", "slide_id", "x", "y", "fallback"]
    assert index["slide_id"].tolist() == ["s0"] * 5 + ["s1"] * 7  # sorted ids, the empty slide adds no rows
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["counts"]["n_patches"] == 12 and manifest["counts"]["n_slides_ok"] == 3
    dataset = PatchStoreDataset(tmp_path)
    assert len(dataset) == 12 and dataset.patch_size == PATCH
    expected = np.concatenate([slides["s0"], slides["s1"]])
    for i in range(len(dataset)):
        np.testing.assert_array_equal(dataset[i], expected[i])
    np.testing.assert_array_equal(dataset.coords[5:, 0], np.arange(7) * PATCH)
    only = PatchStoreDataset(tmp_path, slide_ids=["s1"])
    assert len(only) == 7 and (only.slide_ids == "s1").all()
    np.testing.assert_array_equal(only[-1], slides["s1"][-1])
    with pytest.raises(IndexError):
        only[7]
    with pytest.raises(KeyError, match="nope"):
        PatchStoreDataset(tmp_path, slide_ids=["nope"])


def test_dataloader_workers_read_the_same_patches(tmp_path):
    tiles = _tiles(3, 10)
    normalize_slides([_source("a", tiles)], tmp_path, "raw", patch_size=PATCH, progress=False)
    dataset = PatchStoreDataset(tmp_path)  # no finalize: the index is built from the ledger
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, shuffle=False)
    stacked = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(stacked, tiles)


def test_failed_slide_is_recorded_and_rerun_resumes(tmp_path):
    good, bad = _tiles(4, 6), _tiles(5, 6)
    sources = [_source("good", good), _source("bad", bad, fail_after=3)]
    ledger = normalize_slides(sources, tmp_path, "raw", patch_size=PATCH, progress=False).set_index("slide_id")
    assert ledger.loc["good", "status"] == "ok" and ledger.loc["bad", "status"] == "failed"
    assert "OSError: cannot read tile 3 of bad" in ledger.loc["bad", "reason"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "slides").iterdir())  # temp files removed
    assert not (tmp_path / "slides" / "bad.npy").exists()
    # second run: the good slide is skipped, the bad one (now readable) is written
    ledger2 = normalize_slides([_source("good", good), _source("bad", bad)], tmp_path, "raw",
                               patch_size=PATCH, progress=False).set_index("slide_id")
    assert bool(ledger2.loc["good", "skipped"]) and not bool(ledger2.loc["bad", "skipped"])
    assert (ledger2["status"] == "ok").all()
    assert len(read_ledger(tmp_path, latest_only=False)) == 3  # good ok, bad failed, bad ok
    np.testing.assert_array_equal(np.load(tmp_path / "slides" / "bad.npy"), bad)


def test_shards_write_disjoint_slides_into_one_root(tmp_path):
    slides = {f"slide{i:02d}": _tiles(10 + i, 2) for i in range(7)}
    parts = [shard_slide_ids(slides, (i, 3)) for i in range(3)]
    assert sorted(s for part in parts for s in part) == sorted(slides) and sum(len(p) for p in parts) == 7
    assert parse_shard("2/3") == (2, 3)
    with pytest.raises(ValueError):
        parse_shard("3/3")
    for i in range(3):
        ledger = normalize_slides([_source(k, v) for k, v in slides.items()], tmp_path, "raw",
                                  shard=(i, 3), patch_size=PATCH, progress=False)
        assert sorted(ledger["slide_id"]) == parts[i]
    index = PatchStoreWriter(tmp_path, PATCH, "raw").finalize()
    assert index["slide_id"].nunique() == 7 and len(index) == 14


def test_store_finalized_when_the_last_shard_finishes(tmp_path):
    """Shard 0 of 2 leaves index.csv absent and counts null; shard 1 completes the listing and finalizes."""
    slides = {f"s{i}": _tiles(20 + i, 2 + i) for i in range(5)}  # 2..6 patches: 20 in all
    sources = [_source(k, v) for k, v in slides.items()]
    first = normalize_slides(sources, tmp_path, "raw", shard=(0, 2), patch_size=PATCH, progress=False)
    assert first.attrs["store_finalized"] is False and not (tmp_path / "index.csv").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"] is None
    partial = PatchStoreDataset(tmp_path)  # readers index the ledger meanwhile
    assert len(partial) == first["n_patches"].sum() == 2 + 4 + 6  # s0, s2, s4
    second = normalize_slides(sources, tmp_path, "raw", shard=(1, 2), patch_size=PATCH, progress=False)
    assert second.attrs["store_finalized"] is True
    index = pd.read_csv(tmp_path / "index.csv")
    assert len(index) == 20 and index["patch_index"].tolist() == list(range(20))
    counts = json.loads((tmp_path / "manifest.json").read_text())["counts"]
    assert counts == {"n_slides_ok": 5, "n_slides_failed": 0, "failed_slides": [], "n_patches": 20,
                      "n_fallback": 0}
    dataset = PatchStoreDataset(tmp_path)
    np.testing.assert_array_equal(dataset[19], slides["s4"][-1])
    # A rerun that only skips keeps the (idempotent) finalization; a rewritten slide invalidates it first,
    # then the completed listing finalizes again with the new counts.
    again = normalize_slides(sources, tmp_path, "raw", patch_size=PATCH, progress=False)
    assert again["skipped"].all() and again.attrs["store_finalized"] and len(pd.read_csv(tmp_path / "index.csv")) == 20
    writer = PatchStoreWriter(tmp_path, PATCH, "raw")
    writer.write_slide("s0", np.zeros((1, 2), dtype=np.int64), [_tiles(99, 1)])
    assert not (tmp_path / "index.csv").exists() and read_manifest_counts(tmp_path) is None
    assert len(PatchStoreDataset(tmp_path)) == 19  # from the ledger, not the stale index
    bad = [_source("s0", slides["s0"]), *sources[1:], _source("s5", _tiles(30, 3), fail_after=0)]
    normalize_slides(bad, tmp_path, "raw", patch_size=PATCH, progress=False)
    counts = read_manifest_counts(tmp_path)
    assert counts["n_patches"] == 19 and counts["failed_slides"] == ["s5"] and counts["n_slides_ok"] == 5


def read_manifest_counts(root):
    return json.loads((root / "manifest.json").read_text())["counts"]


def test_macenko_warm_up_runs_once_before_the_first_slide(tmp_path, monkeypatch):
    """The JIT compile runs in one warm-up call, not inside the first slide's timing; none in raw mode."""
    calls = []
    real = normalize_store.warm_up_normalizer

    def counting(reference, device="cpu"):
        calls.append(len(read_ledger(tmp_path / "m")))  # ledger rows written before the warm-up
        return real(reference, device)

    monkeypatch.setattr(normalize_store, "warm_up_normalizer", counting)
    sources = [_source(f"s{i}", _tiles(40 + i, 3)) for i in range(3)]
    ledger = normalize_slides(sources, tmp_path / "m", "macenko", patch_size=PATCH, progress=False)
    assert calls == [0] and ledger.attrs["warmup_seconds"] > 0 and (ledger["status"] == "ok").all()
    normalize_slides(sources, tmp_path / "m", "macenko", patch_size=PATCH, progress=False)  # all skipped
    normalize_slides(sources, tmp_path / "r", "raw", patch_size=PATCH, progress=False)
    assert calls == [0]
    # The warm-up batch is tissue-coloured: the kernel's full path runs (no fallback), so all of it is compiled.
    _, fallback = macenko_normalize_batch(torch.from_numpy(normalize_store._warm_up_tiles()), MacenkoReference.default())
    assert fallback.tolist() == [False, False]


def test_store_files_follow_the_umask(tmp_path):
    """Store files get 0666 & ~umask (0644 under 022), folders 0777 & ~umask; atomic helpers likewise."""
    import os
    import stat

    from exaonepath_core.io import atomic

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(0o022)
    try:
        assert atomic.current_umask() == 0o022
        normalize_slides([_source("a", _tiles(1, 3))], tmp_path / "store", "raw", patch_size=PATCH,
                         progress=False)
        store = tmp_path / "store"
        files = ["manifest.json", "ledger.csv", "index.csv", "slides/a.npy", "slides/a.csv"]
        assert {f: oct(mode(store / f)) for f in files} == {f: "0o644" for f in files}
        assert mode(store) == mode(store / "slides") == 0o755
        with atomic.atomic_dir(tmp_path / "features") as tmp:
            (tmp / "part.txt").write_text("x")
        assert mode(tmp_path / "features") == 0o755 and mode(tmp_path / "features" / "part.txt") == 0o644
        with pytest.raises(FileExistsError, match="overwrite=True"), atomic.atomic_dir(tmp_path / "features"):
            pass
        with atomic.atomic_dir(tmp_path / "features", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("y")
        assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["new.txt"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or trash folders left
        os.umask(0o027)
        assert atomic.current_umask() == 0o027
        with atomic.atomic_open(tmp_path / "strict.txt", "w") as handle:
            handle.write("z")
        assert atomic.create_once(tmp_path / "once.csv", b"h\n") and not atomic.create_once(tmp_path / "once.csv", b"x")
        assert (tmp_path / "once.csv").read_bytes() == b"h\n"
        with atomic.atomic_dir(tmp_path / "strict_dir") as tmp:
            pass
        assert (mode(tmp_path / "strict.txt"), mode(tmp_path / "once.csv"), mode(tmp_path / "strict_dir")) == (
            0o640, 0o640, 0o750)
    finally:
        os.umask(old)


def test_refuses_mismatched_root_unless_forced(tmp_path):
    PatchStoreWriter(tmp_path, PATCH, "raw")
    with pytest.raises(ValueError, match="patch_size"):
        PatchStoreWriter(tmp_path, PATCH * 2, "raw")
    with pytest.raises(ValueError, match="mode"):
        PatchStoreWriter(tmp_path, PATCH, "macenko", MacenkoReference.default())
    PatchStoreWriter(tmp_path, PATCH, "macenko", MacenkoReference.default(), force=True)
    assert json.loads((tmp_path / "manifest.json").read_text())["mode"] == "macenko"
    other = MacenkoReference(MacenkoReference.default().stain_matrix, [1.0, 1.0])
    with pytest.raises(ValueError, match="reference"):
        PatchStoreWriter(tmp_path, PATCH, "macenko", other)


def test_write_slide_rejects_wrong_counts_and_shapes(tmp_path):
    writer = PatchStoreWriter(tmp_path, PATCH, "raw")
    coords = np.zeros((4, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="got 3 patches for 4"):
        writer.write_slide("a", coords, [_tiles(0, 3)])
    with pytest.raises(ValueError, match="more patches"):
        writer.write_slide("a", coords, [_tiles(0, 5)])
    with pytest.raises(ValueError, match="uint8"):
        writer.write_slide("a", coords, [_tiles(0, 4).astype(np.float32)])
    with pytest.raises(ValueError, match="safe file name"):
        writer.write_slide("../x", coords, [_tiles(0, 4)])
    with pytest.raises(ValueError, match="fallback"):
        writer.write_slide("a", coords, [_tiles(0, 4)], fallback=[np.zeros(3, bool)])
    assert not writer.has_slide("a") and list((tmp_path / "slides").iterdir()) == []


def test_macenko_mode_matches_direct_normalization(tmp_path, shared_data):
    from PIL import Image

    image = np.asarray(Image.open(shared_data / "stain" / "tiatoolbox_source_image.png").convert("RGB"))
    tiles = np.stack([image[y : y + 64, x : x + 64] for y in (0, 64, 128) for x in (0, 64, 128)])
    white = np.full((2, 64, 64, 3), 250, dtype=np.uint8)  # background: must fall back, not fail
    tiles = np.concatenate([tiles, white])
    coords = np.stack([np.arange(len(tiles)), np.zeros(len(tiles))], axis=1).astype(np.int64)

    def batches():
        yield tiles[:4]
        yield tiles[4:]

    ledger = normalize_slides([("tia", coords, batches)], tmp_path, "macenko", batch_size=3, progress=False)
    assert ledger.loc[0, "status"] == "ok" and ledger.loc[0, "n_fallback"] == 2
    expected, fallback = macenko_normalize_batch(torch.from_numpy(tiles), MacenkoReference.default())
    assert fallback.tolist() == [False] * 9 + [True] * 2
    stored = np.load(tmp_path / "slides" / "tia.npy")
    np.testing.assert_array_equal(stored, expected.numpy())
    table = pd.read_csv(tmp_path / "slides" / "tia.csv")
    assert table["fallback"].tolist() == [0] * 9 + [1] * 2
    assert np.abs(stored[:9].astype(int) - tiles[:9]).mean() > 1  # normalization changed the tissue tiles


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (2, 4), (0, 2)])
def test_rank_indices_match_distributed_sampler(n, world):
    from torch.utils.data.distributed import DistributedSampler

    parts = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        ours = rank_indices(n, rank, world, seed=7, epoch=3)
        assert ours.tolist() == list(sampler)
        parts.append(ours)
    if n:
        assert sorted(set(np.concatenate(parts).tolist())) == list(range(n))
        assert len({len(p) for p in parts}) == 1
    assert not np.array_equal(rank_indices(50, 0, 2, 7, 0), rank_indices(50, 0, 2, 7, 1))


def test_store_records_its_macenko_parameters_and_refuses_others(tmp_path):
    rng = np.random.default_rng(0)
    base = np.array([[200, 120, 180], [130, 60, 150], [230, 170, 200]], dtype=np.float64)
    tiles = np.clip(base[rng.integers(0, 3, (4, 32, 32))] * rng.uniform(0.8, 1.0, (4, 32, 32, 1)), 0, 255)
    tiles = tiles.astype(np.uint8)
    coords = np.array([[0, 0], [32, 0], [0, 32], [32, 32]])
    source = [("s1", coords, lambda: iter([tiles]))]
    default = normalize_store.normalize_slides(source, tmp_path / "a", "macenko", progress=False)
    assert store_layout.read_manifest(tmp_path / "a")["macenko_params"] == {"Io": 240.0, "alpha": 1.0, "beta": 0.15}
    strict = normalize_store.normalize_slides(source, tmp_path / "b", "macenko", progress=False,
                                          macenko_params={"beta": 0.6})
    assert store_layout.read_manifest(tmp_path / "b")["macenko_params"]["beta"] == 0.6
    assert int(default.n_patches.sum()) == int(strict.n_patches.sum()) == 4
    # the parameters reach the kernel: a stricter optical-density threshold changes the output
    a = PatchStoreDataset(tmp_path / "a")
    b = PatchStoreDataset(tmp_path / "b")
    assert not np.array_equal(np.stack([a[i] for i in range(4)]), np.stack([b[i] for i in range(4)]))
    with pytest.raises(RuntimeError, match="macenko_params: store has .*'beta': 0.15.*asked for .*'beta': 0.6"):
        normalize_store.normalize_slides(source, tmp_path / "a", "macenko", progress=False, macenko_params={"beta": 0.6})
    with pytest.raises(ValueError, match="macenko_params takes"):
        normalize_store.normalize_slides(source, tmp_path / "c", "macenko", progress=False, macenko_params={"gamma": 1})
