"""The paper's six downstream datasets in their official on-disk layouts, plus the small real subsets on disk.

Every adapter validates its layout when constructed: split folders/files, class names and order, and (with
`strict=True`, for the real datasets) the published split sizes and per-class counts. A broken layout raises
`DatasetLayoutError` whose message names exactly what is missing. Items are `(uint8 HWC array, label, sample_id)`;
an image that cannot be decoded raises `ImageReadError` naming the dataset, split, sample id and file.

`python -m exaonepath_core.data.downstream check --dataset NAME --root DIR [--deep]` validates the layout (fast, no
decoding); `--deep` also decodes every image once and lists the unreadable ones and those whose size differs
from the dataset's common size (feature batches need one size), exiting non-zero when there is any.

`python -m exaonepath_core.data.downstream prepare --dataset NAME --root DIR` documents each official source and
downloads it when the network is reachable (it fails cleanly with instructions when it is not).
"""
from __future__ import annotations

import argparse
import csv
import difflib
import functools
import hashlib
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch.utils.data

from exaonepath_core.io import atomic

PAPER_ACCURACY = {"pcam": .901, "mhist": .818, "crc100k": .946, "til": .939, "msi_crc": .756, "msi_stad": .804}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


# Pillow modes of more than 8 bits per sample: convert("RGB") clips them to 0..255, which turns a 16-bit tile
# into a mostly white image without a word, so they are refused instead of converted
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DatasetLayoutError(FileNotFoundError):
    """The on-disk layout of a dataset is incomplete or differs from the official one."""


class ImageReadError(OSError):
    """One sample of a dataset could not be decoded; the message names the dataset, split, sample id and file."""


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as a uint8 (H, W, 3) array (refuses more than 8 bits per sample rather than clipping)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in HIGH_BIT_DEPTH_MODES:
            raise ValueError(f"{image.mode} image ({image.width}x{image.height}) has more than 8 bits per sample; "
                             "converting it to RGB would clip it: convert it to 8-bit RGB first")
        return np.array(image.convert("RGB"), dtype=np.uint8)  # writable: torch.from_numpy needs it


def _is_hidden(name: str) -> bool:
    """A folder entry that is nobody's data: .ipynb_checkpoints, .DS_Store, a zip's __MACOSX."""
    return name.startswith(".") or name == "__MACOSX"


def _case_hint(wanted: Sequence[str], present: Sequence[str]) -> str:
    """"; found 'tum' (case differs)" for each wanted name present only in another letter case."""
    by_lower: dict[str, list[str]] = {}
    for name in present:
        by_lower.setdefault(name.lower(), []).append(name)
    found = [f"'{other}'" for name in wanted for other in by_lower.get(name.lower(), []) if other != name]
    return f"; found {', '.join(found)} (case differs)" if found else ""


# ----------------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------------
class PatchDataset(torch.utils.data.Dataset):
    """A labelled patch dataset: subclasses fill `_labels`, `_sample_ids` and implement `_load_image(i)`."""

    name: str = ""
    class_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    probe_splits: tuple[str, str | None, str] = ("train", None, "test")  # (train, val or None, test)
    expected: ClassVar[Mapping[str, Mapping[str, int]]] = {}  # split -> class name -> published count

    def __init__(self, root: str | os.PathLike, split: str, strict: bool = True):
        self.root = Path(root)
        split = split if split in self.splits else SPLIT_ALIASES.get(split, split)
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; available: {', '.join(self.splits)}")
        self.split = split
        self.strict = strict
        self.skipped: Counter[str] = Counter()  # reason -> count of files not used (reported, never silent)
        if not self.root.is_dir():
            raise DatasetLayoutError(f"{self.name}: root folder {self.root} does not exist")
        self._labels = np.zeros(0, dtype=np.int64)
        self._sample_ids: list[str] = []
        self._index = np.zeros(0, dtype=np.int64)  # positions into the full split (subsets keep a sub-range)
        self._scan()
        self._index = np.arange(len(self._labels))
        self._validate_counts()
        if self.skipped:
            warnings.warn(f"{self.name}/{self.split}: ignored files: {dict(self.skipped)}", stacklevel=2)

    # subclasses -------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        raise NotImplementedError

    def _load_image(self, position: int) -> np.ndarray:
        raise NotImplementedError

    def sample_path(self, position: int) -> str:
        """Where the item at `position` of the full split is stored (a file, or file + row)."""
        paths = getattr(self, "_paths", None)
        return str(paths[position]) if paths is not None else self._sample_ids[position]

    # shared -----------------------------------------------------------------------------------------------
    def _validate_counts(self) -> None:
        """Every class present (both modes); exact published counts in strict mode."""
        counts = self.class_counts()
        empty = [name for name in self.class_names if counts.get(name, 0) == 0]
        if empty:
            raise DatasetLayoutError(f"{self.name}/{self.split} under {self.root}: no images for class(es) "
                                     f"{', '.join(empty)}")
        expected = self.expected.get(self.split)
        if not self.strict or not expected:
            return
        wrong = [f"{name}: found {counts.get(name, 0)}, expected {n}" for name, n in expected.items()
                 if counts.get(name, 0) != n]
        if wrong:
            raise DatasetLayoutError(
                f"{self.name}/{self.split} under {self.root} differs from the published counts "
                f"(found {len(self)}, expected {sum(expected.values())}): {'; '.join(wrong)} "
                "(pass strict=False for a deliberate subset)"
            )

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, str]:
        position = int(self._index[i])
        try:
            image = self._load_image(position)
        except Exception as exc:  # any decoder failure: say which file, keep the original as the cause
            raise ImageReadError(f"{self.name}/{self.split}: cannot read sample {self._sample_ids[position]} "
                                 f"({self.sample_path(position)}): {type(exc).__name__}: {exc}") from exc
        return image, int(self._labels[position]), self._sample_ids[position]

    @property
    def labels(self) -> np.ndarray:
        """Labels of this (sub)set without decoding images."""
        return self._labels[self._index]

    @property
    def sample_ids(self) -> list[str]:
        """Sample ids of this (sub)set, in item order."""
        return [self._sample_ids[p] for p in self._index]

    def class_counts(self) -> dict[str, int]:
        """Class name -> number of items."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(counts[k]) for k, name in enumerate(self.class_names)}

    def subset(self, max_samples: int, seed: int = 0) -> PatchDataset:
        """A stratified random subset of at most `max_samples` items (same class proportions), in place order."""
        if max_samples <= 0 or max_samples >= len(self):
            return self
        rng = np.random.default_rng(seed)
        labels = self.labels
        chosen = []
        for k in range(len(self.class_names)):
            members = np.flatnonzero(labels == k)
            take = max(1, round(max_samples * len(members) / len(labels))) if len(members) else 0
            chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._index = self._index[np.sort(np.concatenate(chosen))]
        return clone

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (goes into feature manifests)."""
        return {"dataset": self.name, "split": self.split, "root": str(self.root), "n": len(self),
                "class_names": list(self.class_names), "class_counts": self.class_counts(),
                "strict": self.strict, "skipped_files": dict(self.skipped)}


class FolderClassDataset(PatchDataset):
    """Images in `root/<split folder>/<class folder>/*`; one folder per class, all of them required."""

    split_folders: ClassVar[Mapping[str, str]] = {}
    class_folders: tuple[str, ...] = ()  # folder names in class order (default: class_names)
    split_level_files: tuple[str, ...] = ()  # files expected beside the class folders (not counted as skipped)

    def _split_dir(self) -> Path:
        return self.root / self.split_folders[self.split]

    def _scan(self) -> None:
        split_dir = self._split_dir()
        layout = "/".join([self.split_folders[self.split], "{" + ",".join(self._folders()) + "}", "*"])
        if not split_dir.is_dir():
            siblings = sorted(p.name for p in split_dir.parent.iterdir()) if split_dir.parent.is_dir() else []
            raise DatasetLayoutError(f"{self.name}: missing folder {split_dir} (expected layout under "
                                     f"{self.root}: {layout}){_case_hint([split_dir.name], siblings)}")
        present = set()
        for entry in os.scandir(split_dir):
            if _is_hidden(entry.name):
                self.skipped["hidden entry beside the class folders"] += 1
            elif entry.is_dir():
                present.add(entry.name)
            elif entry.name not in self.split_level_files:  # e.g. Thumbs.db, notes.txt: counted, not used
                self.skipped[f"file beside the class folders ({Path(entry.name).suffix or 'no extension'})"] += 1
        missing = [name for name in self._folders() if name not in present]
        if missing:
            raise DatasetLayoutError(f"{self.name}: missing class folder(s) {', '.join(missing)} in {split_dir} "
                                     f"(expected {', '.join(self._folders())}){_case_hint(missing, sorted(present))}")
        extra = sorted(present - set(self._folders()))
        if extra:
            raise DatasetLayoutError(f"{self.name}: unexpected folder(s) {', '.join(extra)} in {split_dir} "
                                     f"(expected only {', '.join(self._folders())})")
        labels, ids, paths = [], [], []
        for label, folder in enumerate(self._folders()):
            for entry in sorted(os.scandir(split_dir / folder), key=lambda e: e.name):
                if not entry.is_file():
                    self.skipped["not a file"] += 1
                elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    self.skipped[f"not an image ({Path(entry.name).suffix or 'no extension'})"] += 1
                else:
                    paths.append(Path(entry.path))
                    labels.append(label)
                    ids.append(Path(entry.path).relative_to(self.root).as_posix())
        self._paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self._sample_ids = ids

    def _folders(self) -> tuple[str, ...]:
        return self.class_folders or self.class_names

    def _load_image(self, position: int) -> np.ndarray:
        return _read_rgb(self._paths[position])


# ----------------------------------------------------------------------------------------------------------
# The paper's six tasks
# ----------------------------------------------------------------------------------------------------------
class PCamDataset(PatchDataset):
    """PatchCamelyon (Veeling et al. 2018): `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`."""

    name = "pcam"
    class_names = ("normal", "metastatic")
    splits = ("train", "valid", "test")
    probe_splits = ("train", "valid", "test")
    split_sizes: ClassVar[Mapping[str, int]] = {"train": 262_144, "valid": 32_768, "test": 32_768}

    def _files(self) -> tuple[Path, Path]:
        stem = f"camelyonpatch_level_2_split_{self.split}"
        return self.root / f"{stem}_x.h5", self.root / f"{stem}_y.h5"

    def _scan(self) -> None:
        import h5py

        missing = [p.name for p in self._files() if not p.is_file()]
        if missing:
            gz = [name for name in missing if (self.root / f"{name}.gz").is_file()]
            hint = f" ({', '.join(gz)} present as .gz: gunzip them first)" if gz else ""
            raise DatasetLayoutError(f"pcam: missing file(s) {', '.join(missing)} in {self.root}{hint}")
        x_path, y_path = self._files()

        def open_h5(path: Path) -> h5py.File:
            try:
                return h5py.File(path, "r")
            except OSError as exc:  # opened once here, not probed first and opened again
                raise DatasetLayoutError(f"pcam: cannot open {path} as HDF5 ({exc}); re-download or gunzip it "
                                         "again") from exc

        with open_h5(x_path) as fx, open_h5(y_path) as fy:
            for handle, key, path in ((fx, "x", x_path), (fy, "y", y_path)):
                if key not in handle:
                    raise DatasetLayoutError(f"pcam: dataset '{key}' missing in {path} (has {list(handle)})")
            x_shape, x_dtype = fx["x"].shape, fx["x"].dtype
            y = np.asarray(fy["y"][...]).reshape(-1)
        if len(x_shape) != 4 or x_shape[-1] != 3 or x_dtype != np.uint8:
            raise DatasetLayoutError(f"pcam: {x_path} 'x' must be uint8 (N,H,W,3), got {x_dtype} {x_shape}")
        if x_shape[0] != len(y):
            raise DatasetLayoutError(f"pcam: {x_path} has {x_shape[0]} images but {y_path} {len(y)} labels")
        bad = np.setdiff1d(np.unique(y), [0, 1])
        if bad.size:
            raise DatasetLayoutError(f"pcam: {y_path} holds labels {bad.tolist()} outside {{0, 1}}")
        if self.strict and len(y) != self.split_sizes[self.split]:
            raise DatasetLayoutError(f"pcam/{self.split}: {len(y)} patches, expected {self.split_sizes[self.split]}"
                                     " (pass strict=False for a deliberate subset)")
        self._labels = y.astype(np.int64)
        self._sample_ids = [f"{self.split}/{i:06d}" for i in range(len(y))]
        self._h5: Any = None
        self._h5_pid = -1

    def sample_path(self, position: int) -> str:
        """The h5 file and row of the item at `position`."""
        return f"{self._files()[0]} row {position}"

    def _load_image(self, position: int) -> np.ndarray:
        import h5py

        # h5py handles do not survive fork: open lazily once per (worker) process
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = h5py.File(self._files()[0], "r")
            self._h5_pid = os.getpid()
        return np.asarray(self._h5["x"][position], dtype=np.uint8)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_h5_pid"] = None, -1
        return state


class MHISTDataset(PatchDataset):
    """MHIST (Wei et al. 2021): `annotations.csv` (Image Name, Majority Vote Label, Partition) + `images/`."""

    name = "mhist"
    class_names = ("HP", "SSA")
    splits = ("train", "test")
    expected: ClassVar[Mapping[str, Mapping[str, int]]] = {"train": {"HP": 1545, "SSA": 630}, "test": {"HP": 617, "SSA": 360}}
    required_columns = ("Image Name", "Majority Vote Label", "Partition")

    def _scan(self) -> None:
        csv_path, image_dir = self.root / "annotations.csv", self.root / "images"
        missing = [str(p.name) + ("/" if p == image_dir else "") for p in (csv_path, image_dir) if not p.exists()]
        if missing:
            raise DatasetLayoutError(f"mhist: missing {', '.join(missing)} in {self.root} "
                                     "(expected annotations.csv and images/)")
        with open(csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c for c in self.required_columns if c not in (reader.fieldnames or [])]
            if columns:
                raise DatasetLayoutError(f"mhist: {csv_path} lacks column(s) {', '.join(columns)} "
                                         f"(has {reader.fieldnames})")
            rows = list(reader)
        bad_labels = sorted({r["Majority Vote Label"] for r in rows} - set(self.class_names))
        bad_parts = sorted({r["Partition"] for r in rows} - set(self.splits))
        if bad_labels or bad_parts:
            raise DatasetLayoutError(f"mhist: {csv_path} has unknown labels {bad_labels} / partitions {bad_parts}")
        rows = [r for r in rows if r["Partition"] == self.split]
        absent = [r["Image Name"] for r in rows if not (image_dir / r["Image Name"]).is_file()]
        if absent:
            raise DatasetLayoutError(f"mhist: {len(absent)} image(s) listed in annotations.csv missing from "
                                     f"{image_dir}: {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")
        self._paths = [image_dir / r["Image Name"] for r in rows]
        self._labels = np.asarray([self.class_names.index(r["Majority Vote Label"]) for r in rows], dtype=np.int64)
        self._sample_ids = [r["Image Name"] for r in rows]

    def _load_image(self, position: int) -> np.ndarray:
        return _read_rgb(self._paths[position])


class CRC100KDataset(FolderClassDataset):
    """CRC-100K (Kather et al. 2018): NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test), nine class folders."""

    name = "crc100k"
    class_names = CRC_CLASSES
    splits = ("train", "test")
    split_folders: ClassVar[Mapping[str, str]] = {"train": "NCT-CRC-HE-100K", "test": "CRC-VAL-HE-7K"}
    expected: ClassVar[Mapping[str, Mapping[str, int]]] = {
        "train": {"ADI": 10407, "BACK": 10566, "DEB": 11512, "LYM": 11557, "MUC": 8896, "MUS": 13536,
                  "NORM": 8763, "STR": 10446, "TUM": 14317},
        "test": {"ADI": 1338, "BACK": 847, "DEB": 339, "LYM": 634, "MUC": 1035, "MUS": 592, "NORM": 741,
                 "STR": 421, "TUM": 1233},
    }


class TILDataset(FolderClassDataset):
    """TCGA TIL detection (Saltz et al. 2018; Abousamra et al. 2022) as distributed on Zenodo (record 6604094):
    `{train,val,test}/{til-negative,til-positive}/*.png`, optionally under `images-tcga-tils/pancancer/`.

    Published per-class counts are not pinned here (see `DATASET_SOURCES`); strict mode checks the layout only.
    """

    name = "til"
    class_names = ("til-negative", "til-positive")
    splits = ("train", "valid", "test")
    probe_splits = ("train", "valid", "test")
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "valid": "val", "test": "test"}

    def _split_dir(self) -> Path:
        nested = self.root / "images-tcga-tils" / "pancancer"
        base = nested if nested.is_dir() else self.root
        return base / self.split_folders[self.split]


class MSIDataset(FolderClassDataset):
    """Kather et al. 2019 MSI vs MSS tiles: `{TRAIN,TEST}/{MSIMUT,MSS}/*`; label 1 = MSIMUT (the positive class).

    Published per-class counts are not pinned here (see `DATASET_SOURCES`); strict mode checks the layout only.
    """

    class_names = ("MSS", "MSIMUT")
    splits = ("train", "test")
    split_folders: ClassVar[Mapping[str, str]] = {"train": "TRAIN", "test": "TEST"}


class MSICRCDataset(MSIDataset):
    """MSI-CRC: the CRC_DX tiles of Kather et al. 2019."""

    name = "msi_crc"


class MSISTADDataset(MSIDataset):
    """MSI-STAD: the STAD tiles of Kather et al. 2019."""

    name = "msi_stad"


# ----------------------------------------------------------------------------------------------------------
# The small real subsets in ../shared/data (smoke profile)
# ----------------------------------------------------------------------------------------------------------
def _check_labels_csv(dataset: FolderClassDataset, csv_path: Path) -> None:
    """Every file labels.csv lists for this split exists in the folder of its label, and every image is listed."""
    if not csv_path.is_file():
        raise DatasetLayoutError(f"{dataset.name}: missing {csv_path.name} in {dataset.root}")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DatasetLayoutError(f"{dataset.name}: {csv_path} needs columns path,label")
    # a `split` column restricts the check to this split; without one every row belongs to it
    listed = {r["path"]: r["label"] for r in rows if r.get("split", dataset.split) == dataset.split}
    on_disk = set(dataset._sample_ids)
    not_on_disk = sorted(set(listed) - on_disk)
    not_listed = sorted(on_disk - set(listed))
    wrong = sorted(p for p in on_disk & set(listed) if listed[p] != Path(p).parts[-2])
    problems = []
    if not_on_disk:
        problems.append(f"{len(not_on_disk)} listed file(s) missing: {', '.join(not_on_disk[:5])}")
    if not_listed:
        problems.append(f"{len(not_listed)} file(s) not in {csv_path.name}: {', '.join(not_listed[:5])}")
    if wrong:
        problems.append(f"{len(wrong)} file(s) whose label disagrees with their folder: {', '.join(wrong[:5])}")
    if problems:
        raise DatasetLayoutError(f"{dataset.name}/{dataset.split}: " + "; ".join(problems))


class PCamSubsetDataset(FolderClassDataset):
    """The 3,000 real PCam patches in `patches/pcam_subset/{train,valid,test}/{0,1}/*.jpg` + labels.csv."""

    name = "pcam_subset"
    class_names = ("normal", "metastatic")
    class_folders = ("0", "1")
    splits = ("train", "valid", "test")
    probe_splits = ("train", "valid", "test")
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "valid": "valid", "test": "test"}
    expected: ClassVar[Mapping[str, Mapping[str, int]]] = {"train": {"normal": 1000, "metastatic": 1000}, "valid": {"normal": 250, "metastatic": 250},
                "test": {"normal": 250, "metastatic": 250}}

    def _scan(self) -> None:
        super()._scan()
        _check_labels_csv(self, self.root / "labels.csv")


class CRCSubsetDataset(FolderClassDataset):
    """32 real CRC-VAL-HE-7K tiles in `patches/crc_val_he_7k_subset/<CLASS>/*.png` (8 classes, no BACK).

    There is no official split of these tiles: `all` is every tile; `train`/`test` are a deterministic
    stratified half split (in sorted file order, even positions train, odd positions test).
    """

    name = "crc_subset"
    class_names = tuple(c for c in CRC_CLASSES if c != "BACK")
    splits = ("all", "train", "test")
    split_folders: ClassVar[Mapping[str, str]] = {"all": ".", "train": ".", "test": "."}
    split_level_files = ("labels.csv",)
    expected: ClassVar[Mapping[str, Mapping[str, int]]] = {"all": {c: 4 for c in CRC_CLASSES if c != "BACK"},
                "train": {c: 2 for c in CRC_CLASSES if c != "BACK"},
                "test": {c: 2 for c in CRC_CLASSES if c != "BACK"}}

    def _split_dir(self) -> Path:
        return self.root

    def _scan(self) -> None:
        requested = self.split
        super()._scan()
        _check_labels_csv(self, self.root / "labels.csv")
        if requested != "all":
            keep = []
            for k in range(len(self.class_names)):
                members = np.flatnonzero(self._labels == k)
                keep.extend(members[(0 if requested == "train" else 1)::2])
            keep = np.sort(np.asarray(keep, dtype=np.int64))
            self._paths = [self._paths[i] for i in keep]
            self._labels = self._labels[keep]
            self._sample_ids = [self._sample_ids[i] for i in keep]


IMAGE_FOLDER_PREFIX = "folder_"


class ImageFolderDataset(FolderClassDataset):
    """Your own labelled patches: `root/{train,test}/<class>/*` (an optional `valid/` is not read); any name
    `folder_<task>` in `data.downstream_roots` uses it.

    The classes are the sub-folders of `train/`, in sorted order; `test/` must hold the same ones. Without a
    val split, the logistic probe picks its C on a held-out part of train, as for the other such datasets.
    """

    splits = ("train", "valid", "test")
    probe_splits = ("train", None, "test")
    split_folders: ClassVar[Mapping[str, str]] = {"train": "train", "valid": "valid", "test": "test"}

    def _scan(self) -> None:
        train = self.root / "train"
        classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not _is_hidden(p.name)) \
            if train.is_dir() else []
        if len(classes) < 2:
            raise DatasetLayoutError(
                f"{self.name}: {train} must hold one folder per class (at least two), found "
                f"{classes or 'none'}; expected layout under {self.root}: {{train,test}}/<class>/*.png|jpg|tif")
        self.class_names = tuple(classes)  # per instance: every folder dataset has its own classes
        super()._scan()

    def __reduce__(self):
        # the class is made per name at run time: rebuild it by name (spawned DataLoader workers unpickle it)
        return _restore_image_folder, (self.name, self.__dict__)


def _restore_image_folder(name: str, state: dict) -> PatchDataset:
    cls = image_folder_class(name)
    dataset = cls.__new__(cls)
    dataset.__dict__.update(state)
    return dataset


@functools.cache  # one class per name, however often it is asked for
def image_folder_class(name: str) -> type[PatchDataset]:
    """The adapter of a `folder_<task>` dataset (an `ImageFolderDataset` carrying that name)."""
    task = name[len(IMAGE_FOLDER_PREFIX):]
    if not name.startswith(IMAGE_FOLDER_PREFIX) or not task or not task.replace("_", "").replace("-", "").isalnum():
        raise KeyError(f"a dataset of your own is named {IMAGE_FOLDER_PREFIX}<task> with letters, digits, _ or -, "
                       f"got {name!r}")
    return type(f"ImageFolder_{task}", (ImageFolderDataset,), {"name": name})


DATASETS: dict[str, type[PatchDataset]] = {
    "pcam": PCamDataset,
    "mhist": MHISTDataset,
    "crc100k": CRC100KDataset,
    "til": TILDataset,
    "msi_crc": MSICRCDataset,
    "msi_stad": MSISTADDataset,
    "pcam_subset": PCamSubsetDataset,
    "crc_subset": CRCSubsetDataset,
}


def dataset_class(name: str) -> type[PatchDataset]:
    """The adapter class registered under `name`, or the image-folder adapter for a `folder_<task>` name."""
    if name.startswith(IMAGE_FOLDER_PREFIX):
        return image_folder_class(name)
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown dataset {name!r}{hint}; known: {', '.join(DATASETS)}, or {IMAGE_FOLDER_PREFIX}<task> "
                       "for your own {train,test}/<class>/ folders")
    return DATASETS[name]


def get_dataset(name: str, root: str | os.PathLike, split: str, strict: bool = True) -> PatchDataset:
    """The validated dataset `name` at `root`, split `split` (raises `DatasetLayoutError` naming what is missing)."""
    return dataset_class(name)(root, split, strict=strict)


def class_names(name: str) -> tuple[str, ...]:
    """Class names of dataset `name`, in label order."""
    return dataset_class(name).class_names


@dataclass
class ImageCheck:
    """What decoding every image of one split found: unreadable files and sizes that differ from the common one."""

    dataset: str
    split: str
    n_checked: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, error)
    size_counts: Counter[tuple[int, ...]] = field(default_factory=Counter)  # image shape -> count
    size_examples: dict[tuple[int, ...], list[str]] = field(default_factory=dict)  # shape -> first files

    EXAMPLES_PER_SIZE: ClassVar[int] = 5

    @property
    def common_size(self) -> tuple[int, ...] | None:
        """The most frequent image shape (ties: the first one seen)."""
        return self.size_counts.most_common(1)[0][0] if self.size_counts else None

    @property
    def n_odd_size(self) -> int:
        """How many decodable images differ in shape from the common one."""
        return sum(n for shape, n in self.size_counts.items() if shape != self.common_size)

    @property
    def ok(self) -> bool:
        """True when every image decodes and all share one shape."""
        return not self.unreadable and self.n_odd_size == 0

    def summary(self) -> str:
        """One line: counts of unreadable and odd-sized images."""
        common = "x".join(map(str, self.common_size[:2])) if self.common_size else "none"
        return (f"{self.dataset}/{self.split}: {self.n_checked} image(s) decoded, {len(self.unreadable)} unreadable, "
                f"{self.n_odd_size} of another size than the common {common}")

    def lines(self) -> list[str]:
        """The summary, then every unreadable file with its error, then example files of each odd size."""
        out = [self.summary()]
        out += [f"  unreadable: {path}: {error}" for path, error in self.unreadable]
        for shape, n in sorted(self.size_counts.items(), key=lambda kv: -kv[1]):
            if shape != self.common_size:
                shown = self.size_examples[shape]
                more = f" (+{n - len(shown)} more)" if n > len(shown) else ""
                out.append(f"  size {'x'.join(map(str, shape[:2]))} ({n} image(s)): {', '.join(shown)}{more}")
        return out


def check_images(dataset: PatchDataset, progress: bool = False) -> ImageCheck:
    """Decode every image of `dataset` once (streaming) and record the unreadable ones and each image shape."""
    from tqdm.auto import tqdm

    report = ImageCheck(dataset.name, dataset.split)
    for i in tqdm(range(len(dataset)), disable=not progress, desc=f"decoding {dataset.name}/{dataset.split}",
                  unit="img"):
        position = int(dataset._index[i])
        path = dataset.sample_path(position)
        report.n_checked += 1
        try:
            image = dataset[i][0]
        except ImageReadError as exc:
            cause = exc.__cause__ or exc
            report.unreadable.append((path, f"{type(cause).__name__}: {cause}"))
            continue
        report.size_counts[image.shape] += 1
        examples = report.size_examples.setdefault(image.shape, [])
        if len(examples) < ImageCheck.EXAMPLES_PER_SIZE:
            examples.append(path)
    return report


def _probe_split_datasets(name: str, root: str | os.PathLike, strict: bool) -> list[PatchDataset]:
    cls = dataset_class(name)
    return [cls(root, split, strict=strict) for split in cls.probe_splits if split is not None]


def available_datasets(roots: Mapping[str, str | os.PathLike], strict: bool = True,
                       names: Sequence[str] | None = None, deep: bool = False,
                       reports: dict[str, list[ImageCheck]] | None = None, progress: bool = False
                       ) -> dict[str, str]:
    """Dataset name -> "present", "absent: <reason>" (no root, or nothing at it), "unreadable: <reason>" (a root
    that exists but is not laid out as the adapter expects) or (deep) "damaged: <counts>", for the paper's six
    tasks and every configured root.

    The default check reads the layout only (no decoding). `deep=True` also decodes every image of every probe
    split once (`check_images`); a dataset with unreadable images or images of another size than the common
    one is "damaged". Pass a dict as `reports` to receive each dataset's per-split `ImageCheck`s; `progress`
    shows a progress bar while decoding.
    """
    names = list(names) if names is not None else list(dict.fromkeys([*PAPER_ACCURACY, *roots]))
    status = {}
    for name in names:
        if name not in roots or not str(roots[name]):
            status[name] = "absent: no root configured"
            continue
        try:
            datasets = _probe_split_datasets(name, roots[name], strict)
        except (DatasetLayoutError, KeyError, ValueError, OSError) as exc:
            # "absent" only when nothing is there: a folder that exists but is laid out wrongly says so
            kind = "unreadable" if Path(roots[name]).exists() else "absent"
            status[name] = f"{kind}: {str(exc).splitlines()[0]}"
            continue
        status[name] = "present"
        if deep:
            checks = [check_images(dataset, progress) for dataset in datasets]
            if reports is not None:
                reports[name] = checks
            bad = [c for c in checks if not c.ok]
            if bad:
                status[name] = "damaged: " + "; ".join(
                    f"{c.split}: {len(c.unreadable)} of {c.n_checked} image(s) unreadable, "
                    f"{c.n_odd_size} of another size" for c in bad)
    return status


# ----------------------------------------------------------------------------------------------------------
# prepare: official sources, checksums, download when reachable
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and how its archives become the layout the adapter reads."""

    citation: str
    homepage: str
    zenodo_record: str | None = None  # files + md5 checksums are listed by the Zenodo API
    files: tuple[tuple[str, str | None], ...] = ()  # (file name, md5 of the archive) when pinned here
    instructions: str = ""
    layout: str = ""
    file_prefix: str = ""  # only the record's files starting with this prefix
    extra: dict[str, str] = field(default_factory=dict)


DATASET_SOURCES: dict[str, DatasetSource] = {
    "pcam": DatasetSource(
        citation="Veeling et al., Rotation equivariant CNNs for digital pathology, MICCAI 2018 (CC0)",
        homepage="https://github.com/basveeling/pcam",
        zenodo_record="2546921",
        # md5 of the .h5.gz archives, as torchvision's PCAM dataset pins them
        files=(("camelyonpatch_level_2_split_train_x.h5.gz", "1571f514728f59376b705fc836ff4b63"),
               ("camelyonpatch_level_2_split_train_y.h5.gz", "35c2d7259d906cfc8143347bb8e05be7"),
               ("camelyonpatch_level_2_split_valid_x.h5.gz", "d5b63470df7cfa627aeec8b9dc0c066e"),
               ("camelyonpatch_level_2_split_valid_y.h5.gz", "2b85f58b927af9964a4c15b8f7e8f179"),
               ("camelyonpatch_level_2_split_test_x.h5.gz", "d8c2d60d490dbd479f8199bdfa0cf6ec"),
               ("camelyonpatch_level_2_split_test_y.h5.gz", "60a7035772fbdb7f34eb86d4420cf66a")),
        instructions="download the six .h5.gz files and gunzip them into ROOT",
        layout="ROOT/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (262,144 / 32,768 / 32,768)",
    ),
    "mhist": DatasetSource(
        citation="Wei et al., A Petri dish for histopathology image analysis, AIME 2021",
        homepage="https://bmirds.github.io/MHIST/",
        instructions="MHIST is released after a data-use form at the homepage (no direct download): put the "
                     "emailed annotations.csv and the unzipped images.zip in ROOT",
        layout="ROOT/annotations.csv + ROOT/images/*.png (train 2,175: HP 1,545 SSA 630; test 977: HP 617 SSA 360)",
    ),
    "crc100k": DatasetSource(
        citation="Kather et al., PLOS Medicine 2019 (NCT-CRC-HE-100K, CRC-VAL-HE-7K; CC BY 4.0)",
        homepage="https://zenodo.org/records/1214456",
        zenodo_record="1214456",
        files=(("NCT-CRC-HE-100K.zip", None), ("CRC-VAL-HE-7K.zip", None)),
        instructions="download NCT-CRC-HE-100K.zip and CRC-VAL-HE-7K.zip (md5 listed on the Zenodo record) and "
                     "unzip both into ROOT",
        layout="ROOT/NCT-CRC-HE-100K/{ADI,...,TUM}/*.tif (100,000) + ROOT/CRC-VAL-HE-7K/{ADI,...,TUM}/*.tif (7,180)",
    ),
    "til": DatasetSource(
        citation="Saltz et al., Cell Reports 2018; Abousamra et al., Front. Oncol. 2022 (TCGA TIL maps)",
        homepage="https://zenodo.org/records/6604094",
        zenodo_record="6604094",
        instructions="download the TCGA-TILs archive from the Zenodo record and extract it into ROOT",
        layout="ROOT/[images-tcga-tils/pancancer/]{train,val,test}/{til-negative,til-positive}/*.png",
    ),
    "msi_crc": DatasetSource(
        citation="Kather et al., Nature Medicine 2019 (MSI vs MSS tiles, CC BY 4.0)",
        homepage="https://zenodo.org/records/2530835",
        zenodo_record="2530835",
        file_prefix="CRC_DX_",
        instructions="download CRC_DX_{TRAIN,TEST}_{MSIMUT,MSS}.zip and unzip each into ROOT/{TRAIN,TEST}/{MSIMUT,MSS}",
        layout="ROOT/{TRAIN,TEST}/{MSIMUT,MSS}/*.png",
    ),
    "msi_stad": DatasetSource(
        citation="Kather et al., Nature Medicine 2019 (MSI vs MSS tiles, CC BY 4.0)",
        homepage="https://zenodo.org/records/2530835",
        zenodo_record="2530835",
        file_prefix="STAD_",
        instructions="download STAD_{TRAIN,TEST}_{MSIMUT,MSS}.zip and unzip each into ROOT/{TRAIN,TEST}/{MSIMUT,MSS}",
        layout="ROOT/{TRAIN,TEST}/{MSIMUT,MSS}/*.png",
    ),
}
ZENODO_API = "https://zenodo.org/api/records/"


class PrepareError(RuntimeError):
    """A dataset could not be prepared automatically; the message says how to do it by hand."""


def _manual_text(name: str, root: Path) -> str:
    source = DATASET_SOURCES[name]
    pinned = "".join(f"\n    {fname}  md5 {md5 or '(see the Zenodo record)'}" for fname, md5 in source.files)
    return (f"{name}: {source.citation}\n  source: {source.homepage}\n  by hand: "
            f"{source.instructions.replace('ROOT', str(root))}\n  expected layout: "
            f"{source.layout.replace('ROOT', str(root))}" + (f"\n  files:{pinned}" if pinned else ""))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, md5: str | None, timeout: float) -> None:
    """Stream `url` to `target` atomically; verify md5 when known."""
    with atomic.atomic_path(target) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        if md5 is not None and _md5(tmp) != md5:
            raise PrepareError(f"checksum mismatch for {url}: expected md5 {md5}")


def _extract(archive: Path, destination: Path) -> None:
    """Unpack .zip / .tar(.gz) / .gz archives into `destination`."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(destination)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as handle:
            handle.extractall(destination, filter="data")
    elif archive.suffix == ".gz":
        import gzip

        with gzip.open(archive, "rb") as src, open(destination / archive.stem, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)


def prepare(name: str, root: str | os.PathLike, timeout: float = 20.0, zenodo_api: str = ZENODO_API) -> str:
    """Download and unpack dataset `name` into `root` from its official source; returns a status text.

    Raises `PrepareError` with step-by-step instructions when the source is unreachable or needs a form.
    """
    if name not in DATASET_SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASET_SOURCES)}")
    root = Path(root)
    if available_datasets({name: root}, names=[name])[name] == "present":
        return f"{name}: already present and valid at {root}"
    source = DATASET_SOURCES[name]
    if source.zenodo_record is None:
        raise PrepareError(f"{name} cannot be downloaded automatically.\n{_manual_text(name, root)}")
    try:
        with urllib.request.urlopen(zenodo_api + source.zenodo_record, timeout=timeout) as response:
            record = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrepareError(f"{name}: the official source is unreachable ({exc}).\n{_manual_text(name, root)}")
    pinned = dict(source.files)
    wanted = [f for f in record.get("files", []) if f["key"].startswith(source.file_prefix)
              and (not pinned or f["key"] in pinned)]
    if not wanted:
        raise PrepareError(f"{name}: Zenodo record {source.zenodo_record} lists none of the expected files.\n"
                           f"{_manual_text(name, root)}")
    root.mkdir(parents=True, exist_ok=True)
    for entry in wanted:
        md5 = pinned.get(entry["key"]) or str(entry.get("checksum", "")).removeprefix("md5:") or None
        archive = root / entry["key"]
        if not archive.is_file():
            _download(entry["links"]["self"], archive, md5, timeout)
        destination = root
        if name in ("msi_crc", "msi_stad"):  # e.g. CRC_DX_TRAIN_MSIMUT.zip -> ROOT/TRAIN/MSIMUT
            split, _label = archive.stem.split("_")[-2:]
            destination = root / split
        destination.mkdir(parents=True, exist_ok=True)
        _extract(archive, destination)
    status = available_datasets({name: root}, names=[name])[name]
    if status != "present":
        raise PrepareError(f"{name}: downloaded, but the layout check says {status}.\n{_manual_text(name, root)}")
    return f"{name}: prepared at {root}"


def _check_name(name: str) -> str:
    try:
        dataset_class(name)
    except KeyError as err:
        raise argparse.ArgumentTypeError(err.args[0]) from None
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `prepare --dataset NAME --root DIR`, `check --dataset NAME --root DIR`, `sources`."""
    parser = argparse.ArgumentParser(prog="python -m exaonepath_core.data.downstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("prepare", "check"):
        sub = commands.add_parser(command)
        if command == "prepare":
            sub.add_argument("--dataset", required=True, choices=sorted(DATASET_SOURCES))
        else:  # a registered name, or folder_<task> for your own {train,test}/<class>/ folders
            sub.add_argument("--dataset", required=True, type=_check_name,
                             help=f"one of {', '.join(sorted(DATASETS))}, or {IMAGE_FOLDER_PREFIX}<task>")
        sub.add_argument("--root", required=True)
        sub.add_argument("--timeout", type=float, default=20.0)
        sub.add_argument("--no-strict", action="store_true")
        if command == "check":
            sub.add_argument("--deep", action="store_true",
                             help="also decode every image once; list unreadable and odd-sized files")
    commands.add_parser("sources")
    args = parser.parse_args(argv)
    if args.command == "sources":
        for name in DATASET_SOURCES:
            print(_manual_text(name, Path("ROOT")) + "\n")
        return 0
    if args.command == "check":
        reports: dict[str, list[ImageCheck]] = {}
        status = available_datasets({args.dataset: args.root}, strict=not args.no_strict, names=[args.dataset],
                                    deep=args.deep, reports=reports, progress=args.deep)
        print(f"{args.dataset}: {status[args.dataset]}")
        for check in reports.get(args.dataset, []):
            print("\n".join(check.lines()))
        return 0 if status[args.dataset] == "present" else 1
    try:
        print(prepare(args.dataset, args.root, timeout=args.timeout))
    except PrepareError as exc:
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
