"""The adapter base classes every downstream dataset shares: validation, items, subsets, folder scanning.

A broken layout raises `DatasetLayoutError` whose message names exactly what is missing. Items are
`(uint8 HWC array, label, sample_id)`; an image that cannot be decoded raises `ImageReadError` naming the
dataset, split, sample id and file.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch.utils.data

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


# Pillow modes of more than 8 bits per sample: convert("RGB") clips them to 0..255, which turns a 16-bit tile
# into a mostly white image without a word, so they are refused instead of converted
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DatasetLayoutError(FileNotFoundError):
    """The on-disk layout of a dataset is incomplete or differs from the official one."""


class ImageReadError(OSError):
    """One sample of a dataset could not be decoded; the message names the dataset, split, sample id and file."""


def read_rgb(path: Path) -> np.ndarray:
    """An image file as a uint8 (H, W, 3) array (refuses more than 8 bits per sample rather than clipping)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in HIGH_BIT_DEPTH_MODES:
            raise ValueError(f"{image.mode} image ({image.width}x{image.height}) has more than 8 bits per sample; "
                             "converting it to RGB would clip it: convert it to 8-bit RGB first")
        return np.array(image.convert("RGB"), dtype=np.uint8)  # writable: torch.from_numpy needs it


def is_hidden(name: str) -> bool:
    """A folder entry that is nobody's data: .ipynb_checkpoints, .DS_Store, a zip's __MACOSX."""
    return name.startswith(".") or name == "__MACOSX"


def _case_hint(wanted: Sequence[str], present: Sequence[str]) -> str:
    """"; found 'tum' (case differs)" for each wanted name present only in another letter case."""
    by_lower: dict[str, list[str]] = {}
    for name in present:
        by_lower.setdefault(name.lower(), []).append(name)
    found = [f"'{other}'" for name in wanted for other in by_lower.get(name.lower(), []) if other != name]
    return f"; found {', '.join(found)} (case differs)" if found else ""


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
    def item_path(self, i: int) -> str:
        """Where item `i` of this (sub)set is stored (`sample_path` of its position in the full split)."""
        return self.sample_path(int(self._index[i]))

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
            if is_hidden(entry.name):
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
        return read_rgb(self._paths[position])

