"""Reading tiles back: `read_tiles` (batches of one slide), `TileDataset` (map-style over many slides), and the
TileSets of a slide table (`tile_sets`, `tile_sources`: the input of the patch stores).

Tiles are read one at a time at the target mpp from the stored read geometry, so memory does not grow with
the slide.
"""
from __future__ import annotations

import bisect
import functools
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from exaonepath_core.data.tiling.coords import TileSet, coords_path, load_tile_set
from exaonepath_core.data.tiling.ledger import read_ledger
from exaonepath_core.io.slides import Slide, open_slide


def load_tile_sets(out_dir: str | Path, ok_only: bool = True) -> list[TileSet]:
    """Every coords file in a tiling folder (only slides whose ledger says ok, by default), sorted by id."""
    out_dir = Path(out_dir)
    paths = sorted((out_dir / "coords").glob("*.h5"))
    if ok_only:
        ledger = read_ledger(out_dir)
        ok_ids = set(ledger.loc[ledger["status"] == "ok", "slide_id"])
        paths = [p for p in paths if p.stem in ok_ids]
    return [load_tile_set(p) for p in paths]


def read_one_tile(slide: Slide, tile_set: TileSet, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray:
    """One uint8 (T, T, 3) tile at the target mpp, written into `out` when given."""
    t = tile_set.tile_size
    if out is None:
        out = np.empty((t, t, 3), dtype=np.uint8)
    if tile_set.read_size == t:  # exact level match: decode straight into the output, no PIL image at all
        return slide.read_rgb_into(x, y, tile_set.read_level, out)
    region = slide.read_rgb(x, y, tile_set.read_level, tile_set.read_size, tile_set.read_size)
    # Pillow widens the bilinear kernel when shrinking, so this is area-like (anti-aliased) downsampling.
    out[...] = np.asarray(Image.fromarray(region).resize((t, t), Image.Resampling.BILINEAR))
    return out


def read_tiles(
    tile_set: TileSet,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 64,
    slide: Slide | None = None,
) -> Iterator[np.ndarray]:
    """Yield uint8 (b, T, T, 3) batches of tiles at the target mpp, in index order, one slide handle open.

    `slide`: an open handle of the tile set's slide to read through (e.g. the one `tile_slide` just used);
    by default the stored path is opened for the duration of the iteration. Each batch is a new array.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(len(tile_set)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(order) and (order.min() < 0 or order.max() >= len(tile_set)):
        raise IndexError(f"tile indices out of range [0, {len(tile_set)}) for {tile_set.slide_id}")
    if slide is not None:
        if slide.slide_id != tile_set.slide_id:
            raise ValueError(f"slide {slide.slide_id!r} is not the tile set's slide {tile_set.slide_id!r}")
        yield from _read_tile_batches(slide, tile_set, order, batch_size)
        return
    with open_slide(tile_set.slide_path, require_mpp=False) as opened:
        yield from _read_tile_batches(opened, tile_set, order, batch_size)


def _read_tile_batches(slide: Slide, tile_set: TileSet, order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    t = tile_set.tile_size
    coords = tile_set.coords[order].tolist()  # Python ints once, not a numpy scalar per coordinate per tile
    for start in range(0, len(coords), batch_size):
        chunk = coords[start : start + batch_size]
        batch = np.empty((len(chunk), t, t, 3), dtype=np.uint8)
        for j, (x, y) in enumerate(chunk):
            read_one_tile(slide, tile_set, x, y, batch[j])
        yield batch


class _TileDatasetImpl:
    """Tiles of several slides as one map-style dataset: item -> (uint8 HWC tile, slide_id, x, y).

    `TileDataset` is this class mixed into `torch.utils.data.Dataset`, created on first use (see
    `__getattr__` below). Slides are opened lazily in whichever process reads (DataLoader workers each open their own handles; a
    handle never crosses a fork or a pickle), and at most `max_open_slides` stay open per process.
    """

    def __init__(self, tile_sets: Sequence[TileSet], transform=None, max_open_slides: int = 8):
        self.tile_sets = list(tile_sets)
        self.transform = transform
        self.max_open_slides = max(1, int(max_open_slides))
        self._starts = np.cumsum([0] + [len(ts) for ts in self.tile_sets]).tolist()
        self._handles: OrderedDict[str, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(tile-set index, tile index within it) of a dataset index."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} tiles")
        s = bisect.bisect_right(self._starts, index) - 1
        return s, index - self._starts[s]

    def _slide(self, tile_set: TileSet) -> Slide:
        if os.getpid() != self._pid:  # forked worker: the parent's handles are not ours to use
            self._handles = OrderedDict()
            self._pid = os.getpid()
        slide = self._handles.get(tile_set.slide_path)
        if slide is None:
            slide = Slide(tile_set.slide_path, require_mpp=False)
            self._handles[tile_set.slide_path] = slide
            while len(self._handles) > self.max_open_slides:
                _, old = self._handles.popitem(last=False)
                old.close()
        else:
            self._handles.move_to_end(tile_set.slide_path)
        return slide

    def __getitem__(self, index: int):
        s, i = self.locate(int(index))
        tile_set = self.tile_sets[s]
        x, y = (int(v) for v in tile_set.coords[i])
        tile = read_one_tile(self._slide(tile_set), tile_set, x, y)
        if self.transform is not None:
            tile = self.transform(tile)
        return tile, tile_set.slide_id, x, y

    def close(self) -> None:
        """Close every open slide handle of this process."""
        while self._handles:
            _, slide = self._handles.popitem()
            slide.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state


@functools.cache
def _tile_dataset_class() -> type:
    import torch.utils.data

    return type(
        "TileDataset",
        (_TileDatasetImpl, torch.utils.data.Dataset),
        {"__module__": __name__, "__qualname__": "TileDataset", "__doc__": _TileDatasetImpl.__doc__},
    )


def __getattr__(name: str) -> Any:
    # torch is imported only when TileDataset is first asked for: importing it costs 2-7 s in every spawned
    # tiling worker, which never needs it (measured on 2 loaded cores). Pickle finds the class here too.
    if name == "TileDataset":
        return _tile_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tile_sets(slides: pd.DataFrame, tiles_dir: str | Path) -> list[TileSet]:
    """TileSets of the given slides that tiled successfully (a slide without a coords file is skipped and
    reported on stderr: it failed or belonged to another shard, as the stage 01 ledger says)."""
    sets, missing = [], []
    for sid in slides["slide_id"]:
        f = coords_path(tiles_dir, sid)
        if f.is_file():
            sets.append(load_tile_set(f))
        else:
            missing.append(sid)
    if missing:
        print(f"[tile_sets] {len(missing)} slide(s) without coordinates (see 01_tiles ledger): "
              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)
    return sets


def tile_sources(sets: list[TileSet], batch_size: int = 64) -> list[tuple[str, np.ndarray, Callable]]:
    """(slide_id, coords, make_batch_iterator) per slide, the input of `normalize_store.normalize_slides`."""
    return [(ts.slide_id, ts.coords, partial(read_tiles, ts, batch_size=batch_size)) for ts in sets]
