"""Storeless pretraining source: tiles read straight from the slides by the stage-01 coordinates.

Nothing is stored but a compact index of the coordinates (STORELESS_DTYPE: slide u32, x i32, y i32, 12 B per
patch, memory-mapped read-only) and one row per slide (path and read geometry). Each process keeps at most
`max_open_slides` slides open (LRU). Tiles come back raw; the trainer normalizes them on its device
(`normalize_on_the_fly`), then applies the same multi-crop as for a store.

Layout of a storeless root::

    manifest.json    format "storeless", patch_size, mode "raw", counts
    index.npy        STORELESS_DTYPE rows, slides sorted by id, each slide's tiles in stage-01 order
    slides.json      slide_ids, first_row, n_rows and per slide: slide_path, read_level, read_size
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from exaonepath_core.data.store_layout import SlideSelection, read_manifest, validate_slide_id
from exaonepath_core.io import atomic

STORELESS_FORMAT = "storeless"
STORELESS_DTYPE = np.dtype([("slide", "<u4"), ("x", "<i4"), ("y", "<i4")])
DEFAULT_MAX_OPEN_SLIDES = 64


def write_storeless_index(tile_sets: Sequence, root: str | os.PathLike) -> int:
    """Concatenate the tile sets' coordinates into `root` (index.npy, slides.json, manifest.json); returns n.

    Every tile set must have the same tile size (the store's patch size). Written slide by slide into a
    memory-mapped temp file, so memory stays bounded by one slide's coordinates.
    """
    root = Path(root)
    sets = sorted(tile_sets, key=lambda ts: ts.slide_id)
    sizes = sorted({int(ts.tile_size) for ts in sets})
    if len(sizes) > 1:
        raise ValueError(f"tile sets of several tile sizes {sizes} cannot share one storeless index")
    ids = [validate_slide_id(ts.slide_id) for ts in sets]
    if len(set(ids)) != len(ids):
        raise ValueError("a slide id appears twice in the tile sets")
    counts = np.array([len(ts) for ts in sets], dtype=np.int64)
    first_row = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(first_row[-1])
    root.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(root / "index.npy") as tmp:
        index = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORELESS_DTYPE, shape=(total,))
        for number, ts in enumerate(sets):
            part = index[first_row[number]:first_row[number + 1]]
            part["slide"], part["x"], part["y"] = number, ts.coords[:, 0], ts.coords[:, 1]
        index.flush()
        del index
    atomic.write_json(root / "slides.json", {
        "slide_ids": ids, "first_row": first_row.tolist(), "n_rows": total,
        "slide_path": [str(ts.slide_path) for ts in sets], "read_level": [int(ts.read_level) for ts in sets],
        "read_size": [int(ts.read_size) for ts in sets]}, indent=0)
    atomic.write_json(root / "manifest.json", {
        "format": STORELESS_FORMAT, "format_version": 1, "patch_size": sizes[0] if sizes else None, "mode": "raw",
        "reference": None, "macenko_params": None, "counts": {"n_slides_ok": len(sets), "n_patches": total}})
    return total


class StorelessDataset(torch.utils.data.Dataset):
    """Raw uint8 (T, T, 3) tiles read from the slides at the stage-01 coordinates (bounded LRU of open slides)."""

    def __init__(self, root: str | os.PathLike, slide_ids: Iterable[str] | None = None,
                 max_open_slides: int = DEFAULT_MAX_OPEN_SLIDES) -> None:
        if int(max_open_slides) < 1:
            raise ValueError(f"max_open_slides must be >= 1, got {max_open_slides}")
        self.root = Path(root)
        manifest = read_manifest(self.root)
        if manifest.get("format") != STORELESS_FORMAT:
            raise ValueError(f"{self.root} is not a storeless index (manifest format {manifest.get('format')!r})")
        self.patch_size, self.mode, self.reference = int(manifest["patch_size"]), "raw", None
        with open(self.root / "slides.json") as handle:
            self._slides = json.load(handle)
        self._selection = SlideSelection(self._slides["slide_ids"], self._slides["first_row"], slide_ids,
                                         self.root / "slides.json")
        self.slide_ids = self._selection.slide_ids
        self.max_open_slides = int(max_open_slides)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._owner_pid = os.getpid()
        if len(self._index()) != self._slides["n_rows"]:
            raise ValueError(f"{self.root}/index.npy has {len(self._index())} rows, slides.json says "
                             f"{self._slides['n_rows']}")

    def _index(self) -> np.ndarray:
        index = self.__dict__.get("_index_map")
        if index is None:
            index = self._index_map = np.load(self.root / "index.npy", mmap_mode="r")
        return index

    def __len__(self) -> int:
        return len(self._selection)

    def _slide(self, number: int):
        from exaonepath_core.io.slides import Slide, SlideOpenError

        if self._owner_pid != os.getpid():  # a forked worker opens its own handles
            self._handles, self._owner_pid = OrderedDict(), os.getpid()
        slide = self._handles.get(number)
        if slide is not None:
            self._handles.move_to_end(number)
            return slide
        while len(self._handles) >= self.max_open_slides:
            self._handles.popitem(last=False)[1].close()
        path = self._slides["slide_path"][number]
        try:
            slide = Slide(path, require_mpp=False)
        except SlideOpenError as error:
            raise FileNotFoundError(f"storeless read: slide {self._slides['slide_ids'][number]} ({path}) cannot be "
                                    f"opened any more: {error}") from error
        self._handles[number] = slide
        return slide

    def __getitem__(self, index: int) -> np.ndarray:
        from exaonepath_core.data.tiling.dataset import read_one_tile

        row = self._index()[self._selection.row(index)]
        number = int(row["slide"])
        # the read geometry of stage 01 (tile size, level, region size), as tiling.dataset.read_tiles uses it
        geometry = SimpleNamespace(tile_size=self.patch_size, read_level=self._slides["read_level"][number],
                                   read_size=self._slides["read_size"][number])
        slide = self._slide(number)
        try:
            return read_one_tile(slide, geometry, int(row["x"]), int(row["y"]))
        except Exception as error:
            path = self._slides["slide_path"][number]
            gone = "" if Path(path).is_file() else " (the file is gone)"
            raise OSError(f"storeless read of slide {self._slides['slide_ids'][number]} ({path}){gone} at "
                          f"x={int(row['x'])} y={int(row['y'])} failed: {error}") from error

    def open_file_count(self) -> int:
        """Slides this process holds open."""
        return len(self._handles) if self._owner_pid == os.getpid() else 0

    def close(self) -> None:
        """Close every open slide of this process."""
        while self._handles:
            self._handles.popitem()[1].close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state.pop("_index_map", None)
        return state
