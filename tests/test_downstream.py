"""Dataset adapters on tiny copies of each official layout, built in tmp from real patches of ../shared/data."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from exaonepath_core.data.downstream import base, check, cli, datasets, sources
from exaonepath_core.data.downstream.base import DatasetLayoutError
from exaonepath_core.data.downstream.check import available_datasets
from exaonepath_core.data.downstream.datasets import CRC_CLASSES, PAPER_ACCURACY, class_names, get_dataset
from exaonepath_core.data.downstream.sources import PrepareError


def _real_patches(shared_data: Path, n: int, label: int, split: str = "train") -> list[Path]:
    return sorted((shared_data / "patches" / "pcam_subset" / split / str(label)).glob("*.jpg"))[:n]


def _crc_tiles(shared_data: Path) -> dict[str, list[Path]]:
    root = shared_data / "patches" / "crc_val_he_7k_subset"
    return {c: sorted((root / c).glob("*.png")) for c in CRC_CLASSES if c != "BACK"}


def _copy_class_folders(files_by_folder: dict[str, list[Path]], base: Path) -> None:
    for folder, files in files_by_folder.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, base / folder / f.name)


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------------------- PCam
def _tiny_pcam(shared_data: Path, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    source_split = {"train": "train", "valid": "valid", "test": "test"}
    arrays = {}
    for split, src in source_split.items():
        files = [(p, 0) for p in _real_patches(shared_data, 5, 0, src)] + \
                [(p, 1) for p in _real_patches(shared_data, 3, 1, src)]
        x = np.stack([_rgb(p) for p, _ in files])
        y = np.array([label for _, label in files], dtype=np.uint8).reshape(-1, 1, 1, 1)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as handle:
            handle["x"] = x
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as handle:
            handle["y"] = y
        arrays[split] = (x, y.reshape(-1))
    return arrays


def test_pcam_h5_layout(shared_data, tmp_path):
    arrays = _tiny_pcam(shared_data, tmp_path)
    for split in ("train", "valid", "test"):
        dataset = get_dataset("pcam", tmp_path, split, strict=False)
        x, y = arrays[split]
        assert len(dataset) == 8 and dataset.class_counts() == {"normal": 5, "metastatic": 3}
        image, label, sample_id = dataset[6]
        assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
        np.testing.assert_array_equal(image, x[6])
        assert (label, sample_id) == (1, f"{split}/000006")
        np.testing.assert_array_equal(dataset.labels, y)
    assert get_dataset("pcam", tmp_path, "val", strict=False).split == "valid"
    assert class_names("pcam") == ("normal", "metastatic")
    with pytest.raises(DatasetLayoutError, match="pcam/train: 8 patches, expected 262144"):
        get_dataset("pcam", tmp_path, "train", strict=True)
    (tmp_path / "camelyonpatch_level_2_split_test_y.h5").rename(tmp_path / "camelyonpatch_level_2_split_test_y.h5.gz")
    with pytest.raises(DatasetLayoutError, match=r"missing file\(s\) camelyonpatch_level_2_split_test_y.h5 .*gunzip"):
        get_dataset("pcam", tmp_path, "test", strict=False)


# --------------------------------------------------------------------------------------------------- MHIST
def _tiny_mhist(shared_data: Path, root: Path) -> list[dict[str, str]]:
    (root / "images").mkdir(parents=True)
    tiles = _crc_tiles(shared_data)
    rows = []
    for i, path in enumerate(tiles["TUM"] + tiles["NORM"] + tiles["MUC"]):
        name = f"MHIST_{i:03d}.png"
        shutil.copy(path, root / "images" / name)
        rows.append({"Image Name": name, "Majority Vote Label": "SSA" if i % 3 == 0 else "HP",
                     "Number of Annotators who Selected SSA (Out of 7)": "4", "Partition": "test" if i % 4 == 0
                     else "train"})
    with open(root / "annotations.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_mhist_layout(shared_data, tmp_path):
    rows = _tiny_mhist(shared_data, tmp_path)
    train = get_dataset("mhist", tmp_path, "train", strict=False)
    test = get_dataset("mhist", tmp_path, "test", strict=False)
    assert len(train) + len(test) == len(rows) == 12 and len(test) == 3
    expected = {r["Image Name"]: int(r["Majority Vote Label"] == "SSA") for r in rows if r["Partition"] == "train"}
    assert dict(zip(train.sample_ids, train.labels.tolist())) == expected
    image, label, sample_id = train[0]
    assert image.shape == (224, 224, 3) and label == expected[sample_id]
    with pytest.raises(DatasetLayoutError, match=r"HP: found \d+, expected 1545"):
        get_dataset("mhist", tmp_path, "train", strict=True)
    (tmp_path / "images" / "MHIST_005.png").unlink()
    with pytest.raises(DatasetLayoutError, match="1 image\\(s\\) listed in annotations.csv missing .*MHIST_005.png"):
        get_dataset("mhist", tmp_path, "train", strict=False)
    (tmp_path / "annotations.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="missing annotations.csv"):
        get_dataset("mhist", tmp_path, "train", strict=False)


# ------------------------------------------------------------------------------------------------ CRC-100K
def _tiny_crc100k(shared_data: Path, root: Path) -> None:
    tiles = _crc_tiles(shared_data)
    background = sorted((shared_data / "patches" / "kather100k_samples").glob("*.tif"))
    for folder, take in (("NCT-CRC-HE-100K", slice(0, 3)), ("CRC-VAL-HE-7K", slice(3, 4))):
        files = {c: files[take] for c, files in tiles.items()}
        files["BACK"] = background[:1]
        _copy_class_folders(files, root / folder)


def test_crc100k_layout(shared_data, tmp_path):
    _tiny_crc100k(shared_data, tmp_path)
    train = get_dataset("crc100k", tmp_path, "train", strict=False)
    test = get_dataset("crc100k", tmp_path, "test", strict=False)
    assert train.class_names == ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    assert len(train) == 8 * 3 + 1 and len(test) == 8 + 1
    assert train.class_counts()["BACK"] == 1 and train.class_counts()["TUM"] == 3
    _image, label, sample_id = train[len(train) - 1]
    assert train.class_names[label] == "TUM" and sample_id.startswith("NCT-CRC-HE-100K/TUM/")
    back = next(i for i, lab in enumerate(train.labels) if lab == 1)
    assert train[back][0].shape == (224, 224, 3)  # a real .tif tile decodes
    with pytest.raises(DatasetLayoutError, match=r"TUM: found 1, expected 1233"):
        get_dataset("crc100k", tmp_path, "test", strict=True)
    (tmp_path / "CRC-VAL-HE-7K" / "notes.txt").write_text("x")
    (tmp_path / "CRC-VAL-HE-7K" / "Thumbs.db").write_text("x")
    (tmp_path / "CRC-VAL-HE-7K" / "ADI" / "Thumbs.db").write_text("x")
    with pytest.warns(UserWarning, match="ignored files"):
        reported = get_dataset("crc100k", tmp_path, "test", strict=False)
    # files beside the class folders are counted too, not silently passed over
    assert reported.skipped == {"not an image (.db)": 1, "file beside the class folders (.txt)": 1,
                                "file beside the class folders (.db)": 1} and len(reported) == 9
    assert reported.describe()["skipped_files"]["file beside the class folders (.db)"] == 1
    shutil.rmtree(tmp_path / "CRC-VAL-HE-7K" / "MUS")
    with pytest.raises(DatasetLayoutError, match=r"missing class folder\(s\) MUS in .*CRC-VAL-HE-7K"):
        get_dataset("crc100k", tmp_path, "test", strict=False)
    (tmp_path / "NCT-CRC-HE-100K" / "EXTRA").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"unexpected folder\(s\) EXTRA"):
        get_dataset("crc100k", tmp_path, "train", strict=False)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_unreadable_images_name_their_file_and_deep_check_lists_them(shared_data, tmp_path, capsys):
    _tiny_crc100k(shared_data, tmp_path)
    test_dir = tmp_path / "CRC-VAL-HE-7K"
    truncated = next((test_dir / "ADI").glob("*.png"))
    _truncate(truncated)
    garbage = test_dir / "DEB" / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    small = test_dir / "LYM" / "small.png"
    Image.open(next((test_dir / "MUC").glob("*.png"))).crop((0, 0, 100, 100)).save(small)
    root = str(tmp_path)
    # the default check reads no pixels: the layout is fine, so it stays "present" (fast)
    assert cli.main(["check", "--dataset", "crc100k", "--root", root, "--no-strict"]) == 0
    assert capsys.readouterr().out.strip() == "crc100k: present"

    dataset = get_dataset("crc100k", tmp_path, "test", strict=False)
    position = dataset.sample_ids.index(f"CRC-VAL-HE-7K/ADI/{truncated.name}")
    with pytest.raises(base.ImageReadError) as info:
        dataset[position]
    message = str(info.value)
    assert message.startswith(f"crc100k/test: cannot read sample CRC-VAL-HE-7K/ADI/{truncated.name} ({truncated})")
    assert "truncated" in message and isinstance(info.value, OSError)

    checks = check.check_images(dataset)
    assert checks.n_checked == len(dataset) == 11 and not checks.ok
    assert sorted(path for path, _ in checks.unreadable) == sorted([str(truncated), str(garbage)])
    assert checks.common_size == (224, 224, 3) and checks.n_odd_size == 1
    assert checks.size_counts == {(224, 224, 3): 8, (100, 100, 3): 1}
    assert checks.size_examples[(100, 100, 3)] == [str(small)]

    reports: dict = {}
    status = available_datasets({"crc100k": tmp_path}, strict=False, names=["crc100k"], deep=True, reports=reports)
    assert status["crc100k"] == "damaged: test: 2 of 11 image(s) unreadable, 1 of another size"
    assert [c.split for c in reports["crc100k"]] == ["train", "test"] and reports["crc100k"][0].ok
    assert cli.main(["check", "--dataset", "crc100k", "--root", root, "--no-strict", "--deep"]) == 1
    out = capsys.readouterr().out
    print(out)  # the report the user sees (pytest -s shows it)
    assert "crc100k/test: 11 image(s) decoded, 2 unreadable, 1 of another size than the common 224x224" in out
    assert f"unreadable: {truncated}: OSError: image file is truncated" in out
    assert f"unreadable: {garbage}: UnidentifiedImageError" in out
    assert f"size 100x100 (1 image(s)): {small}" in out
    assert "crc100k/train: 25 image(s) decoded, 0 unreadable, 0 of another size" in out


def test_sixteen_bit_images_are_refused_not_clipped(shared_data, tmp_path):
    _copy_class_folders({"MSS": _real_patches(shared_data, 2, 0), "MSIMUT": _real_patches(shared_data, 2, 1)},
                        tmp_path / "TRAIN")
    gray = np.asarray(Image.open(_real_patches(shared_data, 1, 0)[0]).convert("L"), dtype=np.uint16) * 257
    deep = tmp_path / "TRAIN" / "MSS" / "deep.png"
    Image.fromarray(gray).save(deep)  # a 16-bit grayscale PNG
    with Image.open(deep) as opened:
        assert opened.mode.startswith("I")  # Pillow reads it as I;16 (old versions: I)
    dataset = get_dataset("msi_crc", tmp_path, "train", strict=False)
    with pytest.raises(base.ImageReadError, match=r"msi_crc/train: cannot read sample TRAIN/MSS/deep.png .*"
                                                        r"more than 8 bits per sample.*convert it to 8-bit RGB"):
        dataset[dataset.sample_ids.index("TRAIN/MSS/deep.png")]
    checks = check.check_images(dataset)
    assert [path for path, _ in checks.unreadable] == [str(deep)] and checks.n_checked == 5


def test_case_differences_are_named(shared_data, tmp_path):
    _tiny_crc100k(shared_data, tmp_path)
    (tmp_path / "CRC-VAL-HE-7K" / "TUM").rename(tmp_path / "CRC-VAL-HE-7K" / "tum")
    with pytest.raises(DatasetLayoutError, match=r"missing class folder\(s\) TUM in .*; found 'tum' \(case differs\)"):
        get_dataset("crc100k", tmp_path, "test", strict=False)
    for split in ("TRAIN", "TEST"):
        _copy_class_folders({"MSS": _real_patches(shared_data, 1, 0), "MSIMUT": _real_patches(shared_data, 1, 1)},
                            tmp_path / "msi" / split.lower())
    with pytest.raises(DatasetLayoutError, match=r"missing folder .*TRAIN .*; found 'train' \(case differs\)"):
        get_dataset("msi_crc", tmp_path / "msi", "train", strict=False)


def test_pcam_garbage_h5_names_the_file(shared_data, tmp_path):
    _tiny_pcam(shared_data, tmp_path)
    x_path = tmp_path / "camelyonpatch_level_2_split_valid_x.h5"
    x_path.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(DatasetLayoutError, match=rf"pcam: cannot open {x_path} as HDF5 \(.*signature"):
        get_dataset("pcam", tmp_path, "valid", strict=False)
    status = available_datasets({"pcam": tmp_path}, strict=False, names=["pcam"])
    assert status["pcam"].startswith(f"unreadable: pcam: cannot open {x_path} as HDF5")
    # a dataset that opens but whose rows cannot be read names the file and the row
    dataset = get_dataset("pcam", tmp_path, "test", strict=False)
    _truncate(tmp_path / "camelyonpatch_level_2_split_test_x.h5", keep=0.3)
    with pytest.raises(base.ImageReadError, match=r"pcam/test: cannot read sample test/000007 "
                                                        r"\(.*camelyonpatch_level_2_split_test_x.h5 row 7\)"):
        dataset[7]


# ---------------------------------------------------------------------------------------------- TCGA-TILs
@pytest.mark.parametrize("nested", [False, True])
def test_til_layout(shared_data, tmp_path, nested):
    base = tmp_path / "images-tcga-tils" / "pancancer" if nested else tmp_path
    for split, src in (("train", "train"), ("val", "valid"), ("test", "test")):
        _copy_class_folders({"til-negative": _real_patches(shared_data, 3, 0, src),
                             "til-positive": _real_patches(shared_data, 2, 1, src)}, base / split)
    for split in ("train", "val", "test"):
        dataset = get_dataset("til", tmp_path, split, strict=True)  # no published counts pinned: layout only
        assert dataset.class_counts() == {"til-negative": 3, "til-positive": 2}
        assert dataset[4][1] == 1 and dataset[0][0].shape == (96, 96, 3)
    shutil.rmtree(base / "val" / "til-positive")
    with pytest.raises(DatasetLayoutError, match=r"missing class folder\(s\) til-positive"):
        get_dataset("til", tmp_path, "valid", strict=False)


# --------------------------------------------------------------------------------------------- MSI (Kather)
@pytest.mark.parametrize("name", ["msi_crc", "msi_stad"])
def test_msi_layout(shared_data, tmp_path, name):
    for split, src in (("TRAIN", "train"), ("TEST", "test")):
        _copy_class_folders({"MSS": _real_patches(shared_data, 4, 0, src),
                             "MSIMUT": _real_patches(shared_data, 2, 1, src)}, tmp_path / split)
    train = get_dataset(name, tmp_path, "train", strict=False)
    assert train.class_names == ("MSS", "MSIMUT")  # MSI is the positive class (label 1) for AUROC
    assert train.class_counts() == {"MSS": 4, "MSIMUT": 2}
    assert [train[i][1] for i in range(len(train))] == [0, 0, 0, 0, 1, 1]
    assert train.sample_ids[0].startswith("TRAIN/MSS/")
    shutil.rmtree(tmp_path / "TEST")
    with pytest.raises(DatasetLayoutError, match=r"missing folder .*TEST"):
        get_dataset(name, tmp_path, "test", strict=False)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        get_dataset(name, tmp_path, "valid", strict=False)


# ------------------------------------------------------------------------------------------ real subsets
def test_real_subsets_validate_with_published_counts(shared_data):
    pcam_root = shared_data / "patches" / "pcam_subset"
    sizes = {s: len(get_dataset("pcam_subset", pcam_root, s, strict=True)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 2000, "valid": 500, "test": 500}
    crc_root = shared_data / "patches" / "crc_val_he_7k_subset"
    everything = get_dataset("crc_subset", crc_root, "all", strict=True)
    train = get_dataset("crc_subset", crc_root, "train", strict=True)
    test = get_dataset("crc_subset", crc_root, "test", strict=True)
    assert len(everything) == 32 and len(train) == len(test) == 16
    assert not set(train.sample_ids) & set(test.sample_ids)
    assert sorted(train.sample_ids + test.sample_ids) == sorted(everything.sample_ids)
    status = available_datasets({"pcam_subset": pcam_root, "crc_subset": crc_root, "pcam": "/nonexistent/pcam"})
    assert status["pcam_subset"] == status["crc_subset"] == "present"
    assert status["pcam"].startswith("absent: pcam: root folder /nonexistent/pcam does not exist")
    assert status["mhist"] == "absent: no root configured"
    assert set(PAPER_ACCURACY) <= set(status)


def test_labels_csv_must_agree_with_folders(shared_data, tmp_path):
    source = shared_data / "patches" / "pcam_subset"
    shutil.copytree(source / "valid", tmp_path / "valid")
    shutil.copy(source / "labels.csv", tmp_path / "labels.csv")
    assert len(get_dataset("pcam_subset", tmp_path, "valid", strict=True)) == 500
    victim = min((tmp_path / "valid" / "1").glob("*.jpg"))
    victim.rename(tmp_path / "valid" / "0" / victim.name)
    with pytest.raises(DatasetLayoutError) as info:
        get_dataset("pcam_subset", tmp_path, "valid", strict=False)
    assert f"valid/1/{victim.name}" in str(info.value) and f"valid/0/{victim.name}" in str(info.value)


def test_subset_is_stratified(shared_data):
    dataset = get_dataset("pcam_subset", shared_data / "patches" / "pcam_subset", "train")
    small = dataset.subset(100, seed=1)
    assert len(small) == 100 and small.class_counts() == {"normal": 50, "metastatic": 50}
    assert set(small.sample_ids) <= set(dataset.sample_ids)
    np.testing.assert_array_equal(small[0][0], dataset[dataset.sample_ids.index(small.sample_ids[0])][0])


# ------------------------------------------------------------------------------------------------- prepare
def test_prepare_fails_cleanly_without_network(tmp_path, capsys):
    with pytest.raises(PrepareError) as info:
        sources.prepare("pcam", tmp_path / "pcam", timeout=2, zenodo_api="http://127.0.0.1:9/")
    message = str(info.value)
    assert "unreachable" in message and "camelyonpatch_level_2_split_train_x.h5.gz" in message
    assert "1571f514728f59376b705fc836ff4b63" in message  # the pinned md5 is documented
    assert cli.main(["prepare", "--dataset", "mhist", "--root", str(tmp_path / "mhist")]) == 2
    assert "data-use form" in capsys.readouterr().err
    assert cli.main(["check", "--dataset", "pcam", "--root", str(tmp_path)]) == 1


def test_prepare_recognises_a_present_dataset(shared_data, tmp_path):
    _tiny_crc100k(shared_data, tmp_path)
    # the tiny copy fails the strict published-count check, so prepare would try the network
    with pytest.raises(PrepareError, match="unreachable"):
        sources.prepare("crc100k", tmp_path, timeout=2, zenodo_api="http://127.0.0.1:9/")
    assert cli.main(["check", "--dataset", "crc100k", "--root", str(tmp_path), "--no-strict"]) == 0


def test_download_is_atomic_and_checks_md5(tmp_path):
    import hashlib

    source = tmp_path / "archive.bin"
    payload = bytes(range(256)) * 5000
    source.write_bytes(payload)
    target = tmp_path / "dl" / "archive.bin"
    sources._download(source.as_uri(), target, hashlib.md5(payload).hexdigest(), timeout=5)
    assert target.read_bytes() == payload
    with pytest.raises(sources.PrepareError, match="checksum mismatch"):
        sources._download(source.as_uri(), tmp_path / "dl" / "bad.bin", "0" * 32, timeout=5)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["archive.bin"]  # no partial file left


def test_gunzip_is_atomic(tmp_path):
    import gzip

    payload = bytes(range(256)) * 5000
    (tmp_path / "x.h5.gz").write_bytes(gzip.compress(payload))
    sources._extract(tmp_path / "x.h5.gz", tmp_path)
    assert (tmp_path / "x.h5").read_bytes() == payload
    (tmp_path / "bad.h5.gz").write_bytes(b"not a gzip stream")
    with pytest.raises(gzip.BadGzipFile):
        sources._extract(tmp_path / "bad.h5.gz", tmp_path)
    # no truncated bad.h5 (that a later layout check would report as a broken HDF5 file) and no temp file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5.gz", "x.h5", "x.h5.gz"]


def test_your_own_image_folders_load_as_a_folder_dataset(shared_data, tmp_path, capsys):
    """`folder_<task>`: classes from train/'s sub-folders (sorted), test/ must match, config and check accept it."""
    from exaonepath_core.config import ConfigError, load_config
    from exaonepath_core.stages.config_checks import load_checked_config

    source = shared_data / "patches" / "crc_val_he_7k_subset"
    root = tmp_path / "mine"
    for cls in ("TUM", "STR", "LYM"):
        files = sorted((source / cls).glob("*"))
        for split, part in (("train", files[0::2]), ("test", files[1::2])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, root / split / cls / f.name)
    (root / "train" / "notes.txt").write_text("beside the class folders: counted, not used")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # JupyterLab's, when someone browses the images: not a class
    train = datasets.get_dataset("folder_crc3", root, "train")
    test = datasets.get_dataset("folder_crc3", root, "test")
    assert train.class_names == test.class_names == ("LYM", "STR", "TUM")
    assert len(train) == len(test) == 6 and np.bincount(train.labels).tolist() == [2, 2, 2]
    image, label, sample_id = train[0]
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8 and label == 0
    assert sample_id.startswith("train/LYM/")
    assert datasets.dataset_class("folder_crc3").probe_splits == ("train", None, "test")
    # picklable (spawned DataLoader workers), subset index included
    import pickle

    subset = test.subset(4, seed=0)
    clone = pickle.loads(pickle.dumps(subset))
    assert clone.class_names == test.class_names and len(clone) == len(subset) < len(test)
    assert [clone[i][2] for i in range(len(clone))] == [subset[i][2] for i in range(len(subset))]
    cfg = load_config("smoke", {"data.downstream_roots": {"folder_crc3": str(root)}})
    assert cfg.data.downstream_roots == {"folder_crc3": str(root)}
    with pytest.raises(ConfigError, match="folder_<task>"):  # checked with the run's config (stages.config_checks)
        load_checked_config("smoke", {"data.downstream_roots": {"folder_": str(root)}})
    assert cli.main(["check", "--dataset", "folder_crc3", "--root", str(root)]) == 0
    shutil.rmtree(root / "test" / "STR")
    with pytest.raises(base.DatasetLayoutError, match="missing class folder"):
        datasets.get_dataset("folder_crc3", root, "test")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(base.DatasetLayoutError, match="one folder per class"):
        datasets.get_dataset("folder_crc3", tmp_path / "empty_root", "train")
