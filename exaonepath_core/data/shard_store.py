"""Compressed, sharded patch store: encoded patches in WebDataset-compatible tar shards + a memory-mapped index.

Layout of a store root::

    manifest.json                format "shards", patch_size, mode, reference, macenko_params, encoding, quality,
                                 counts (filled by finalize_shard_store)
    shards/<writer>-<seq>.tar    POSIX tar files written sequentially by one writer each; members are named
                                 `<slide>_<x>_<y>.<ext>` so `tar`, `webdataset` or any tar reader can read them
    records/<slide_id>.npy       per-slide record (offset, length, crc32, x, y, fallback per patch), atomic rename
    records/<slide_id>.json      per-slide status (ok/failed, reason, counts, shard name); written last, so a
                                 slide counts as done only once its shard bytes and record are on disk
    index.npy                    INDEX_DTYPE rows over all ok slides (32 B per patch), sorted by slide id,
                                 memory-mapped read-only so the ranks of a node share one copy in the page cache
    fallback.npy                 1 bit per patch (np.packbits): Macenko fell back (patch passed through unchanged)
    slides.json / shards.json    slide ids, first row and patch count per slide; shard file names (per slide and
                                 per shard, never per patch)

Multi-machine safe: a writer only creates files of its own (its shard files, its slides' records), by atomic
rename; nothing is appended to a shared file. `finalize_shard_store` merges the records into the index.
"""
from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from exaonepath_core.config import (
    DEFAULT_MACENKO_PARAMS,
    ENCODINGS,
    JPEG_SUBSAMPLINGS,
    NormalizeSection,
    PretrainConfig,
)
from exaonepath_core.data.stain.reference import MacenkoReference
from exaonepath_core.data.store_layout import LEDGER_COLUMNS, read_manifest, validate_slide_id
from exaonepath_core.io import atomic

SHARD_FORMAT = "shards"
SHARD_FORMAT_VERSION = 1
_NORMALIZE = NormalizeSection()  # the writer's defaults are the config's (normalize.encoding, ...)
DEFAULT_SHARD_MAX_BYTES = _NORMALIZE.shard_max_mb << 20
DEFAULT_MAX_OPEN_FILES = PretrainConfig.store_max_open_files
INDEX_DTYPE = np.dtype([("shard", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("crc32", "<u4"),
                        ("slide", "<u4"), ("x", "<i4"), ("y", "<i4")])
RECORD_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("crc32", "<u4"), ("x", "<i4"), ("y", "<i4"),
                         ("fallback", "u1")])
_MAGIC = {"jpeg": (b"\xff\xd8", b"\xff\xd9"), "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
          "webp": (b"RIFF", b"")}


class CorruptRecordError(ValueError):
    """An encoded patch failed its length, magic, checksum or decode check (the message names shard and offset)."""


def encode_patch(patch: np.ndarray, encoding: str, quality: int, subsampling: str = "4:2:0") -> bytes:
    """One uint8 (T, T, 3) patch encoded as JPEG (chroma `subsampling`) / WebP at `quality`, or lossless PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(patch))
    if encoding == "jpeg":
        image.save(buffer, "JPEG", quality=int(quality), subsampling=subsampling)
    elif encoding == "png":
        image.save(buffer, "PNG", compress_level=6)
    elif encoding == "webp":
        image.save(buffer, "WEBP", quality=int(quality), method=4)
    else:
        raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
    return buffer.getvalue()


def decode_patch(data: bytes | bytearray | memoryview, encoding: str) -> np.ndarray:
    """uint8 (H, W, 3) array of one encoded patch (torchvision's libjpeg-turbo/libpng decoders, PIL for WebP)."""
    if encoding in ("jpeg", "png"):
        from torchvision.io import ImageReadMode, decode_jpeg, decode_png

        _quiet_torchvision_deprecation()

        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = (decode_jpeg(tensor, mode=ImageReadMode.RGB) if encoding == "jpeg"
                 else decode_png(tensor, mode=ImageReadMode.RGB))
        return image.permute(1, 2, 0).contiguous().numpy()
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB"))


@functools.cache
def _quiet_torchvision_deprecation() -> None:
    """torchvision 0.29 warns on every decode that TorchCodec will replace it; once per sample floods the log."""
    import warnings

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)


def decode_jpeg_batch_on_device(datas: list[bytes], device: str | torch.device = "cuda") -> torch.Tensor:
    """Batched JPEG decode on the GPU (nvjpeg via torchvision): uint8 (B, H, W, 3) on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images).permute(0, 2, 3, 1).contiguous()


def check_encoded(data: bytes, encoding: str, expected_length: int, expected_crc: int) -> str:
    """Empty string when `data` passes the length, magic and crc32 checks; else what is wrong."""
    if len(data) != expected_length:
        return f"truncated: read {len(data)} of {expected_length} bytes"
    head, tail = _MAGIC[encoding]
    if not data.startswith(head) or (tail and not data.endswith(tail)):
        return f"not a {encoding} stream (bad magic bytes)"
    if zlib.crc32(data) != expected_crc:
        return "crc32 mismatch (bytes changed since writing)"
    return ""


def _settings_problems(existing: dict, settings: dict, reference: MacenkoReference | None) -> list[str]:
    problems = [f"{key}: store has {existing.get(key)!r}, asked for {settings[key]!r}"
                for key in ("format", "format_version", "patch_size", "mode", "macenko_params", "encoding",
                            "quality", "subsampling") if existing.get(key) != settings[key]]
    stored = existing.get("reference")
    if (stored is None) != (reference is None) or (
        stored is not None and not MacenkoReference.from_dict(stored).allclose(reference)
    ):
        problems.append("reference differs from the one the store was written with")
    return problems


class ShardStoreWriter:
    """Writes slides into tar shards of its own (rolled over at `shard_max_bytes`) plus one record per slide.

    Same interface as `patch_store.PatchStoreWriter` (has_slide, write_slide, record, finalize) plus close().
    """

    def __init__(self, root: str | os.PathLike, patch_size: int, mode: str, reference: MacenkoReference | None = None,
                 force: bool = False, macenko_params: dict | None = None, encoding: str = _NORMALIZE.encoding,
                 quality: int = _NORMALIZE.jpeg_quality, shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
                 subsampling: str = _NORMALIZE.jpeg_subsampling) -> None:
        if int(patch_size) <= 0:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
        if encoding == "webp":
            from PIL import features

            if not features.check("webp"):
                raise ValueError("encoding 'webp' needs Pillow built with WebP support, which this one lacks")
        if subsampling not in JPEG_SUBSAMPLINGS:
            raise ValueError(f"subsampling must be one of {JPEG_SUBSAMPLINGS}, got {subsampling!r}")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must lie in [1, 100], got {quality}")
        self.root = Path(root)
        self.patch_size = int(patch_size)
        self.mode = mode
        self.reference = reference
        self.macenko_params = None if mode == "raw" else {**DEFAULT_MACENKO_PARAMS, **(macenko_params or {})}
        self.encoding = encoding
        self.quality = int(quality) if encoding != "png" else None
        self.subsampling = subsampling if encoding == "jpeg" else None
        self.shard_max_bytes = int(shard_max_bytes)
        self.force = force
        # unique across machines and restarts: a writer never touches another writer's shard files
        self._writer_tag = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._shard_seq = 0
        self._tar: tarfile.TarFile | None = None
        self._shard_name = ""
        self._open_manifest()
        for sub in ("shards", "records"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _settings(self) -> dict:
        return {"format": SHARD_FORMAT, "format_version": SHARD_FORMAT_VERSION, "patch_size": self.patch_size,
                "mode": self.mode, "reference": None if self.reference is None else self.reference.to_dict(),
                "macenko_params": self.macenko_params, "encoding": self.encoding, "quality": self.quality,
                "subsampling": self.subsampling}

    def _open_manifest(self) -> None:
        path = self.root / "manifest.json"
        settings = self._settings()
        if path.is_file():
            existing = read_manifest(self.root)
            problems = _settings_problems(existing, settings, self.reference)
            if not problems:
                return
            if not self.force:
                raise ValueError(f"patch store {self.root} was written with other settings (" + "; ".join(problems)
                                 + "); use another root or force=True to overwrite")
            # records and shards of other settings must not be merged with the new ones: moved aside, not deleted
            for sub in ("records", "shards"):
                if (self.root / sub).exists():
                    atomic.move_aside(self.root / sub, "other-settings")
        self.root.mkdir(parents=True, exist_ok=True)
        _drop_index(self.root)
        atomic.write_json(path, {**settings, "counts": None})

    def has_slide(self, slide_id: str) -> bool:
        """True when the slide's record says ok and its record array and shard file are in place."""
        status = _read_status(self.root, slide_id)
        return (status is not None and status["status"] == "ok"
                and (self.root / "records" / f"{slide_id}.npy").is_file()
                and (self.root / "shards" / status["shard"]).is_file())

    def record(self, slide_id: str, status: str, reason: str = "", n_patches: int = 0, n_fallback: int = 0,
               seconds: float = 0.0, shard: str = "") -> None:
        """Write the slide's status file (atomic rename; the last attempt wins)."""
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        atomic.write_json(self.root / "records" / f"{validate_slide_id(slide_id)}.json",
                          {"slide_id": slide_id, "status": status, "reason": reason, "n_patches": int(n_patches),
                           "n_fallback": int(n_fallback), "seconds": round(float(seconds), 3), "shard": shard,
                           "encoding": self.encoding, "quality": self.quality, "subsampling": self.subsampling})
        _drop_index(self.root)

    def _shard(self) -> tarfile.TarFile:
        if self._tar is not None and self._tar.offset >= self.shard_max_bytes:
            self._close_shard()
        if self._tar is None:
            self._shard_name = f"{self._writer_tag}-{self._shard_seq:05d}.tar"
            self._shard_seq += 1
            # kept open across slides (closed by _close_shard / close): one sequential file per writer. PAX:
            # plain ustar headers, plus an extended header only for a member name over 100 characters
            self._tar = tarfile.open(  # noqa: SIM115
                self.root / "shards" / self._shard_name, "w", format=tarfile.PAX_FORMAT)
        return self._tar

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()  # writes the end-of-archive blocks
            self._tar = None

    def write_slide(self, slide_id: str, coords: np.ndarray, batches: Iterable[np.ndarray],
                    fallback: Iterable | None = None, seconds_offset: float = 0.0) -> dict:
        """Encode and append one slide's uint8 (b, T, T, 3) batches to this writer's shard; exactly len(coords)."""
        validate_slide_id(slide_id)
        start = time.perf_counter()
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
            raise ValueError(f"coords of {slide_id} must be an integer (N, 2) array, got {coords.dtype} {coords.shape}")
        size, ext = self.patch_size, ENCODINGS[self.encoding]
        rows = np.zeros(len(coords), dtype=RECORD_DTYPE)
        rows["x"], rows["y"] = coords[:, 0], coords[:, 1]
        tar = self._shard()
        written = 0
        for batch in batches:
            batch = np.asarray(batch)
            if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
                raise ValueError(f"slide {slide_id}: batches must be uint8 (b, {size}, {size}, 3), got "
                                 f"{batch.dtype} {batch.shape}")
            if written + len(batch) > len(coords):
                raise ValueError(f"slide {slide_id}: more patches than the {len(coords)} coordinates")
            for patch in batch:
                data = encode_patch(patch, self.encoding, self.quality or 0, self.subsampling or "4:2:0")
                info = tarfile.TarInfo(f"{slide_id}_{int(rows['x'][written])}_{int(rows['y'][written])}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                # the member's data ends at tar.offset minus its zero padding to a 512 B block
                rows[written]["offset"] = tar.offset - ((len(data) + 511) // 512) * 512
                rows[written]["length"], rows[written]["crc32"] = len(data), zlib.crc32(data)
                written += 1
        if written != len(coords):
            raise ValueError(f"slide {slide_id}: got {written} patches for {len(coords)} coordinates")
        flags = _fallback_flags(fallback, len(coords), slide_id)
        rows["fallback"] = flags
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())  # the bytes are durable before the record points at them
        with atomic.atomic_path(self.root / "records" / f"{slide_id}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, rows)
        row = {"slide_id": slide_id, "status": "ok", "reason": "", "n_patches": len(coords),
               "n_fallback": int(flags.sum()), "seconds": seconds_offset + time.perf_counter() - start}
        self.record(**row, shard=self._shard_name)
        return row

    def finalize(self) -> pd.DataFrame:
        """Merge the records into index.npy (see finalize_shard_store); returns the store's ledger."""
        self._close_shard()
        finalize_shard_store(self.root)
        return read_shard_ledger(self.root)

    def close(self) -> None:
        """Close the open shard (its end-of-archive blocks written)."""
        self._close_shard()


def _fallback_flags(fallback: Iterable | None, n: int, slide_id: str) -> np.ndarray:
    if fallback is None:
        flags = np.zeros(n, dtype=bool)
    elif isinstance(fallback, np.ndarray | torch.Tensor):
        flags = np.asarray(fallback, dtype=bool).reshape(-1)
    else:
        parts = [np.asarray(f, dtype=bool).reshape(-1) for f in fallback]
        flags = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
    if len(flags) != n:
        raise ValueError(f"slide {slide_id}: {len(flags)} fallback flags for {n} patches")
    return flags


def _read_status(root: Path, slide_id: str) -> dict | None:
    path = Path(root) / "records" / f"{slide_id}.json"
    if not path.is_file():
        return None
    with open(path) as handle:
        return json.load(handle)


def _drop_index(root: Path) -> None:
    """A record written after finalize makes the index stale: remove it and reset the counts."""
    if not (root / "index.npy").exists():
        return
    (root / "index.npy").unlink(missing_ok=True)
    manifest = read_manifest(root)
    if manifest.get("counts") is not None:
        atomic.write_json(root / "manifest.json", {**manifest, "counts": None})


def read_shard_ledger(root: str | os.PathLike) -> pd.DataFrame:
    """One row per slide record (slide_id, status, reason, n_patches, n_fallback, seconds), sorted by id."""
    rows = []
    for path in sorted((Path(root) / "records").glob("*.json")):
        with open(path) as handle:
            rows.append(json.load(handle))
    frame = pd.DataFrame(rows, columns=[*LEDGER_COLUMNS, "shard"])
    return frame.astype({"n_patches": np.int64, "n_fallback": np.int64}) if len(frame) else frame


def finalize_shard_store(root: str | os.PathLike) -> int:
    """Merge every ok slide record into index.npy, fallback.npy, slides.json, shards.json; returns n patches.

    Memory stays bounded: the index is filled slide by slide into a memory-mapped temp file and renamed in.
    """
    root = Path(root)
    manifest = read_manifest(root)
    ledger = read_shard_ledger(root)
    ok = ledger[ledger["status"] == "ok"].sort_values("slide_id").reset_index(drop=True)
    for slide_id in ok["slide_id"]:
        status = _read_status(root, slide_id) or {}
        for key in ("encoding", "quality", "subsampling"):
            if status.get(key) != manifest[key]:
                raise ValueError(f"{root}: slide {slide_id} was written with {key} {status.get(key)!r}, the "
                                 f"manifest says {manifest[key]!r}")
    shard_names = sorted(set(ok["shard"]))
    shard_number = {name: i for i, name in enumerate(shard_names)}
    counts = ok["n_patches"].to_numpy(dtype=np.int64)
    first_rows = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(first_rows[-1])
    fallback_bits = np.zeros(total, dtype=bool)
    with atomic.atomic_path(root / "index.npy") as tmp:
        index = np.lib.format.open_memmap(tmp, mode="w+", dtype=INDEX_DTYPE, shape=(total,))
        for number, (slide_id, shard, n) in enumerate(zip(ok["slide_id"], ok["shard"], counts)):
            record = np.load(root / "records" / f"{slide_id}.npy")
            if record.dtype != RECORD_DTYPE or len(record) != n:
                raise ValueError(f"{root}/records/{slide_id}.npy holds {record.dtype} x {len(record)}, its status "
                                 f"file says {n} patches of {RECORD_DTYPE}")
            part = index[first_rows[number]:first_rows[number + 1]]
            part["shard"], part["slide"] = shard_number[shard], number
            for field in ("offset", "length", "crc32", "x", "y"):
                part[field] = record[field]
            fallback_bits[first_rows[number]:first_rows[number + 1]] = record["fallback"].astype(bool)
        index.flush()
        del index
    with atomic.atomic_path(root / "fallback.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.packbits(fallback_bits))
    atomic.write_json(root / "shards.json", shard_names)
    atomic.write_json(root / "slides.json", {"slide_ids": list(ok["slide_id"]), "first_row": first_rows.tolist(),
                                              "n_rows": total}, indent=0)
    failed = ledger[ledger["status"] == "failed"]
    atomic.write_json(root / "manifest.json", {**manifest, "counts": {
        "n_slides_ok": len(ok), "n_slides_failed": len(failed), "failed_slides": sorted(failed["slide_id"]),
        "n_patches": total, "n_fallback": int(fallback_bits.sum()), "n_shards": len(shard_names)}})
    return total


def is_shard_store_complete(root: str | os.PathLike, slide_ids: Iterable[str]) -> bool:
    """True when every one of `slide_ids` has a record (ok or failed) in the store at `root`."""
    return all((Path(root) / "records" / f"{s}.json").is_file() for s in slide_ids)


def main(argv: list[str] | None = None) -> int:
    """`python -m exaonepath_core.data.shard_store finalize ROOT`: merge the slide records into the index."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["finalize"])
    parser.add_argument("root")
    args = parser.parse_args(argv)
    total = finalize_shard_store(args.root)
    print(f"{args.root}: index of {total} patches written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
