"""Readers of the pretraining stores: the shard store's Dataset and `open_patch_dataset` (any store format).

No per-patch Python objects: the index stays a read-only memmap (shared by the ranks of a node through the page
cache) and slide selections are per-slide arrays. Open files are bounded per process by an LRU.
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from exaonepath_core.config import ON_CORRUPT
from exaonepath_core.data.patch_store import PatchStoreDataset
from exaonepath_core.data.shard_store import (
    DEFAULT_MAX_OPEN_FILES,
    INDEX_DTYPE,
    SHARD_FORMAT,
    CorruptRecordError,
    check_encoded,
    decode_patch,
)
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.data.store_layout import SlideSelection, read_manifest
from exaonepath_core.data.storeless import STORELESS_FORMAT, StorelessDataset


class ShardStoreDataset(torch.utils.data.Dataset):
    """Patches of a shard store as uint8 (T, T, 3) arrays, decoded in the reading process (DataLoader worker).

    The index is a read-only memmap (shared page cache), at most `max_open_files` shard files stay open per
    process (LRU), and `on_corrupt='skip'` replaces a corrupt record by the next readable one, counted in
    `n_corrupt_skipped` and printed with its shard and offset; 'raise' stops with that message.
    """

    def __init__(self, root: str | os.PathLike, slide_ids: Iterable[str] | None = None,
                 max_open_files: int = DEFAULT_MAX_OPEN_FILES, on_corrupt: str = "raise") -> None:
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if int(max_open_files) < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest.get("format") != SHARD_FORMAT:
            raise ValueError(f"{self.root} is not a shard store (manifest format {manifest.get('format')!r})")
        if manifest.get("counts") is None or not (self.root / "index.npy").is_file():
            raise FileNotFoundError(f"shard store {self.root} is not finalized (no index.npy or counts): run "
                                    f"`python -m exaonepath_core.data.shard_store finalize {self.root}` once every writer "
                                    "is done, or rerun stage 02")
        self.patch_size, self.mode = int(manifest["patch_size"]), manifest["mode"]
        self.encoding = manifest["encoding"]
        self.reference = None if manifest.get("reference") is None else MacenkoReference.from_dict(manifest["reference"])
        with open(self.root / "slides.json") as handle:
            slides = json.load(handle)
        with open(self.root / "shards.json") as handle:
            self._shard_names = list(json.load(handle))
        self._selection = SlideSelection(slides["slide_ids"], slides["first_row"], slide_ids,
                                         self.root / "slides.json")
        self._all_slide_ids = slides["slide_ids"]
        self.slide_ids = self._selection.slide_ids  # one entry per slide, not per patch
        if len(self._index()) != slides["n_rows"]:
            raise ValueError(f"{self.root}/index.npy has {len(self._index())} rows, slides.json says "
                             f"{slides['n_rows']}: the store was finalized twice at once; finalize it again")
        self.max_open_files = int(max_open_files)
        self.on_corrupt = on_corrupt
        self.n_corrupt_skipped = 0
        self._files: OrderedDict[int, int] = OrderedDict()
        self._owner_pid = os.getpid()

    def _index(self) -> np.ndarray:
        index = self.__dict__.get("_index_map")
        if index is None:
            index = np.load(self.root / "index.npy", mmap_mode="r")
            if index.dtype != INDEX_DTYPE:
                raise ValueError(f"{self.root}/index.npy has dtype {index.dtype}, expected {INDEX_DTYPE}")
            self._index_map = index
        return index

    def __len__(self) -> int:
        return len(self._selection)

    def _fd(self, shard: int) -> int:
        if self._owner_pid != os.getpid():  # a forked worker opens its own files
            self._files, self._owner_pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        while len(self._files) >= self.max_open_files:
            os.close(self._files.popitem(last=False)[1])
        path = self.root / "shards" / self._shard_names[shard]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {path} of the store's index is missing") from None
        self._files[shard] = fd
        return fd

    def encoded(self, index: int) -> tuple[bytes, str]:
        """The checked encoded bytes of item `index` and '' , or (b'', what is wrong incl. shard and offset)."""
        row = self._index()[self._selection.row(index)]
        shard, offset, length = int(row["shard"]), int(row["offset"]), int(row["length"])
        data = os.pread(self._fd(shard), length, offset)
        problem = check_encoded(data, self.encoding, length, int(row["crc32"]))
        if problem:
            where = (f"shard {self.root / 'shards' / self._shard_names[shard]} at offset {offset} (length {length}; "
                     f"slide {self._all_slide_ids[int(row['slide'])]} x={int(row['x'])} y={int(row['y'])})")
            return b"", f"corrupt record in {where}: {problem}"
        return data, ""

    def _decoded(self, index: int) -> tuple[np.ndarray | None, str]:
        data, problem = self.encoded(index)
        if problem:
            return None, problem
        try:
            patch = decode_patch(data, self.encoding)
        except (RuntimeError, OSError, ValueError) as error:
            return None, f"{error}"
        if patch.shape != (self.patch_size, self.patch_size, 3):
            return None, f"decoded to {patch.shape}, the store holds ({self.patch_size}, {self.patch_size}, 3)"
        return patch, ""

    def __getitem__(self, index: int) -> np.ndarray:
        patch, problem = self._decoded(index)
        if patch is not None:
            return patch
        if self.on_corrupt == "raise":
            raise CorruptRecordError(f"{problem} [item {index}] (set on_corrupt: skip to count and replace it)")
        # skip: the next readable item (deterministic: the same replacement on every run), counted
        for step in range(1, min(len(self), 1000)):
            self.n_corrupt_skipped += 1
            print(f"[shard_store] skipped corrupt item {index} ({self.n_corrupt_skipped} skipped in this process): "
                  f"{problem}", file=sys.stderr, flush=True)
            patch, problem = self._decoded((index + step) % len(self))
            if patch is not None:
                return patch
        raise CorruptRecordError(f"no readable record near item {index}: {problem}")

    def open_file_count(self) -> int:
        """Shard files this process holds open."""
        return len(self._files) if self._owner_pid == os.getpid() else 0

    def close(self) -> None:
        """Close the shard files this process holds open (they reopen on the next read)."""
        if self.__dict__.get("_owner_pid") == os.getpid():
            while self._files:
                os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        state.pop("_index_map", None)  # a pickled memmap would copy the whole index: workers map it themselves
        return state


def open_patch_dataset(root: str | os.PathLike, slide_ids: Iterable[str] | None = None,
                       **options) -> torch.utils.data.Dataset:
    """The Dataset of whichever store `root` holds: shard store, storeless index, or a .npy store (read as is).

    `options` (max_open_files, on_corrupt, max_open_slides) go to the readers that take them.
    """
    manifest = read_manifest(root)
    kind = manifest.get("format", "npy")
    if kind == SHARD_FORMAT:
        keys = ("max_open_files", "on_corrupt")
        return ShardStoreDataset(root, slide_ids, **{k: v for k, v in options.items() if k in keys})
    if kind == STORELESS_FORMAT:
        return StorelessDataset(root, slide_ids, **{k: v for k, v in options.items() if k == "max_open_slides"})
    if kind != "npy":
        raise ValueError(f"{root}/manifest.json: unknown store format {kind!r} (shards, storeless or npy)")
    # a .npy store (one uint8 file per slide, 150 KB per 224 px patch) is still read; it keeps one open memmap
    # per slide, so rebuild it as shards (normalize.store_format: shards, ./run_all.sh --from 02) past ~1,000 slides
    return PatchStoreDataset(root, slide_ids)
