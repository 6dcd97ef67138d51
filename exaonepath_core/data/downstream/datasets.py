"""The paper's six downstream datasets in their official on-disk layouts, the small real subsets on disk,
your own image folders, and the registry that names them.

Every adapter validates its layout when constructed: split folders/files, class names and order, and (with
`strict=True`, for the real datasets) the published split sizes and per-class counts.
"""
from __future__ import annotations

import csv
import difflib
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exaonepath_core.data.downstream.base import (
    DatasetLayoutError,
    FolderClassDataset,
    PatchDataset,
    is_hidden,
    read_rgb,
)

# The paper's top-1 per task (linear evaluation); its keys are the six tasks, in the paper's order
PAPER_ACCURACY = {"pcam": .901, "mhist": .818, "crc100k": .946, "til": .939, "msi_crc": .756, "msi_stad": .804}
CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


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
        return read_rgb(self._paths[position])


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
        classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not is_hidden(p.name)) \
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

