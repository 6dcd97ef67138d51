"""Frozen-feature extraction: exact features, files and manifest, overwrite refusal, rank sharding + merge."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from exaonepath_core.data.downstream.datasets import get_dataset
from exaonepath_core.evaluation.features import (
    FEATURE_FILES,
    extract_feature_shard,
    extract_features,
    load_features,
    merge_feature_shards,
    shard_indices,
)
from exaonepath_core.models.backbones import load_backbone, make_transform


@pytest.fixture(scope="module")
def small_setup(shared_data):
    dataset = get_dataset("pcam_subset", shared_data / "patches" / "pcam_subset", "valid").subset(30, seed=0)
    model, info = load_backbone({"kind": "timm", "model_name": "resnet18", "input_size": 64, "resize": 64,
                                 "seed": 0})
    return dataset, model, info, make_transform(info)


def test_extract_features_writes_exact_features_and_manifest(small_setup, tmp_path):
    dataset, model, info, transform = small_setup
    out = extract_features(model, transform, dataset, tmp_path / "feats", batch_size=7, progress=False,
                           backbone_info=info)
    X, y, ids, manifest = load_features(out)
    assert X.dtype == np.float32 and X.shape == (30, 512)
    np.testing.assert_array_equal(y, dataset.labels)
    assert ids == dataset.sample_ids
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    with torch.inference_mode():
        direct = model(transform(images)).numpy()
    np.testing.assert_allclose(X, direct, rtol=1e-4, atol=1e-5)  # batch size 7 vs 30: same numbers
    assert manifest["n"] == 30 and manifest["dim"] == 512 and manifest["world_size"] == 1
    assert manifest["dataset"] == "pcam_subset" and manifest["split"] == "valid"
    assert manifest["backbone"]["name"] == "timm-resnet18-random"
    assert manifest["preprocessing"]["resize"] == 64 and manifest["preprocessing"]["macenko"] is False
    assert manifest["class_names"] == ["normal", "metastatic"] and manifest["n_nonfinite_rows"] == 0
    assert manifest["dataset_info"]["class_counts"] == {"normal": 15, "metastatic": 15}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats"]  # no temporary leftovers
    json.loads((out / "manifest.json").read_text())


def test_manifest_of_a_torch_subset_names_the_wrapped_dataset(small_setup, tmp_path):
    dataset, model, info, transform = small_setup
    view = torch.utils.data.Subset(dataset, list(range(0, 30, 3)))
    out = extract_features(model, transform, view, tmp_path / "sub", progress=False, backbone_info=info)
    manifest = load_features(out)[3]
    assert (manifest["dataset"], manifest["split"], manifest["n"]) == ("pcam_subset", "valid", 10)
    assert manifest["dataset_info"]["subset_size"] == 10 and manifest["dataset_info"]["full_size"] == 30
    assert manifest["class_names"] == ["normal", "metastatic"]


def test_refuses_to_overwrite_unless_asked(small_setup, tmp_path):
    dataset, model, _info, transform = small_setup
    out = extract_features(model, transform, dataset, tmp_path / "f", progress=False)
    first = np.load(out / "features.npy")
    (out / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="already holds features; pass overwrite=True"):
        extract_features(model, transform, dataset, out, progress=False)
    assert (out / "marker").is_file()
    extract_features(model, transform, dataset, out, progress=False, overwrite=True, batch_size=16)
    assert not (out / "marker").exists()
    np.testing.assert_allclose(np.load(out / "features.npy"), first, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_rank_shards_merge_to_the_single_process_result(small_setup, tmp_path):
    dataset, model, _info, transform = small_setup
    single = extract_features(model, transform, dataset, tmp_path / "single", progress=False)
    world = 3
    assert [len(shard_indices(30, r, world)) for r in range(world)] == [10, 10, 10]
    np.testing.assert_array_equal(np.concatenate([shard_indices(31, r, 4) for r in range(4)]), np.arange(31))
    out = tmp_path / "sharded"
    for rank in (2, 0):  # ranks finish in any order
        extract_feature_shard(model, transform, dataset, out, rank, world, batch_size=4, progress=False)
    with pytest.raises(FileNotFoundError, match="rank-00001 missing"):
        merge_feature_shards(out, world, {"dataset": "pcam_subset"})
    extract_feature_shard(model, transform, dataset, out, 1, world, batch_size=4, progress=False)
    merge_feature_shards(out, world, {"dataset": "pcam_subset", "split": "valid"})
    Xs, ys, ids_s, manifest_s = load_features(out)
    X1, y1, ids_1, _ = load_features(single)
    np.testing.assert_allclose(Xs, X1, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ys, y1)
    assert ids_s == ids_1 and manifest_s["world_size"] == 3 and manifest_s["n"] == 30
    assert not (tmp_path / "sharded.parts").exists()


def test_load_features_rejects_incomplete_folders(small_setup, tmp_path):
    dataset, model, _info, transform = small_setup
    out = extract_features(model, transform, dataset.subset(6), tmp_path / "f", progress=False)
    (out / "sample_ids.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="inconsistent sizes"):
        load_features(out)
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing manifest.json"):
        load_features(out)


def test_feature_folder_follows_the_umask(small_setup, tmp_path):
    """Lab colleagues can read features: the folder is not left 0700 as tempfile.mkdtemp makes it."""
    import stat

    dataset, model, _info, transform = small_setup
    old = os.umask(0o022)
    try:
        out = extract_features(model, transform, dataset, tmp_path / "shared", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE((out / name).stat().st_mode) for name in FEATURE_FILES} == {0o644}


def test_an_odd_sized_patch_is_an_error_naming_its_sample_id(small_setup, shared_data, tmp_path):
    """No silent resize in the collate: the error names the odd sample(s) and their size."""
    import shutil

    from PIL import Image

    from exaonepath_core.evaluation.features import _collate_uint8

    _dataset, model, _info, transform = small_setup
    root = tmp_path / "crc"
    shutil.copytree(shared_data / "patches" / "crc_val_he_7k_subset", root)
    victim = sorted((root / "MUS").glob("*.png"))[1]
    Image.open(victim).crop((0, 0, 100, 100)).save(victim)
    dataset = get_dataset("crc_subset", root, "all", strict=True)
    odd_id = f"MUS/{victim.name}"
    with pytest.raises(ValueError) as info:
        extract_features(model, transform, dataset, tmp_path / "f", batch_size=8, progress=False)
    message = str(info.value)
    assert f"1 of 8 patches of one batch differ in shape from the batch's common (224, 224, 3): {odd_id} (100, 100)" \
        in message and "check --deep" in message
    assert not (tmp_path / "f").exists()  # nothing half-written left behind
    items = [(np.zeros((4, 4, 3), np.uint8), 0, f"id{k}") for k in range(13)]
    items += [(np.zeros((5, 4, 3), np.uint8), 1, f"odd{k}") for k in range(12)]
    with pytest.raises(ValueError, match=r"12 of 25 patches .*common \(4, 4, 3\): odd0 \(5, 4\), .*odd9 \(5, 4\) "
                                         r"\(\+2 more\)"):
        _collate_uint8(items)
    images, labels, ids = _collate_uint8(items[:13])
    assert images.shape == (13, 4, 4, 3) and labels.sum() == 0 and ids[12] == "id12"
