"""Frozen-feature extraction, once per (backbone, dataset, split): arrays on disk plus a manifest.

Layout of one feature folder (written into a temporary sibling, then renamed into place):
    features.npy      float32 (N, D), written through an open_memmap while streaming batches
    labels.npy        int64 (N,)
    sample_ids.txt    one id per line, in row order
    manifest.json     backbone, dataset, split, n, dim, preprocessing, timing, device, counts
Under torchrun every rank writes its contiguous part to `<out_dir>.parts/rank-XXXXX/`, then rank 0 merges the
parts in rank order (streaming) and removes them; single-process runs write the folder directly.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from numpy.lib.format import open_memmap

from exaonepath_core.io import atomic

FEATURE_FILES = ("features.npy", "labels.npy", "sample_ids.txt", "manifest.json")
MERGE_CHUNK_ROWS = 65_536
ODD_IDS_SHOWN = 10  # sample ids an odd-shape error lists before '+N more'


def _collate_uint8(batch: Sequence[tuple[np.ndarray, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack (HWC uint8, label, id) items into a uint8 (B,H,W,3) tensor; all patches must share a size.

    Patches of another size are an error naming their sample ids, never resized here: a silent resize would
    give those samples a different scale (um/px) from the rest without any record of it.
    """
    shapes = Counter(item[0].shape for item in batch)
    if len(shapes) != 1:
        common = shapes.most_common(1)[0][0]
        odd = [f"{item[2]} {item[0].shape[:2]}" for item in batch if item[0].shape != common]
        shown = ", ".join(odd[:ODD_IDS_SHOWN]) + (f" (+{len(odd) - ODD_IDS_SHOWN} more)" if len(odd) > ODD_IDS_SHOWN
                                                   else "")
        raise ValueError(f"{len(odd)} of {len(batch)} patches of one batch differ in shape from the batch's common "
                         f"{common}: {shown}; every patch of a dataset must have one size (resize those files, or "
                         "list all of them with `python -m exaonepath_core.data.downstream check --deep`)")
    images = torch.from_numpy(np.stack([item[0] for item in batch]))
    labels = torch.as_tensor([item[1] for item in batch], dtype=torch.int64)
    return images, labels, [str(item[2]) for item in batch]


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) under torch.distributed, (0, 1) otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous block of row indices rank `rank` of `world_size` extracts (blocks cover 0..n-1 in order)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return np.array_split(np.arange(n), world_size)[rank]


def _describe(obj: Any, fallback: str) -> Any:
    """A JSON-able description of a dataset / backbone info / preprocessing spec."""
    for method in ("describe", "to_dict"):
        if hasattr(obj, method):
            return getattr(obj, method)()
    if hasattr(obj, "__dataclass_fields__"):
        return dataclasses.asdict(obj)
    return fallback


@torch.inference_mode()
def _extract_rows(model: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                  dataset: torch.utils.data.Dataset, indices: np.ndarray, part_dir: Path, batch_size: int,
                  num_workers: int, device: torch.device, amp: bool, progress: bool) -> dict[str, Any]:
    """Stream `dataset[indices]` through transform + model into `part_dir` (features/labels/sample_ids)."""
    from tqdm.auto import tqdm

    subset = torch.utils.data.Subset(dataset, indices.tolist())
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate_uint8,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    model = model.to(device).eval()
    n = len(indices)
    features = None
    labels = np.zeros(n, dtype=np.int64)
    n_nonfinite = 0
    macenko_fallbacks = 0
    row = 0
    use_amp = amp and device.type == "cuda"  # bf16 autocast on GPU; CPU stays float32 (exact, and not slower)
    with open(part_dir / "sample_ids.txt", "w") as ids_file, tqdm(
        total=n, disable=not progress, desc=f"features {getattr(dataset, 'name', '')}", unit="img"
    ) as bar:
        for images, batch_labels, batch_ids in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(transform(images))
            macenko_fallbacks += int(getattr(transform, "last_fallback_count", 0))
            out = out.float().cpu().numpy()
            if out.ndim != 2 or out.shape[0] != len(batch_ids):
                raise ValueError(f"backbone returned shape {out.shape} for a batch of {len(batch_ids)}; "
                                 "expected (B, D) pooled features")
            if features is None:
                features = open_memmap(part_dir / "features.npy", mode="w+", dtype=np.float32,
                                       shape=(n, out.shape[1]))
            n_nonfinite += int((~np.isfinite(out)).any(axis=1).sum())
            features[row:row + len(out)] = out
            labels[row:row + len(out)] = batch_labels.numpy()
            for sample_id in batch_ids:
                if "\n" in sample_id:
                    raise ValueError(f"sample id {sample_id!r} contains a newline")
                ids_file.write(sample_id + "\n")
            row += len(out)
            bar.update(len(out))
    if features is None:  # empty shard: a valid (0, D) array needs D, take it from a dummy forward
        dim = int(getattr(model, "num_features", 0))
        features = open_memmap(part_dir / "features.npy", mode="w+", dtype=np.float32, shape=(0, dim))
    features.flush()
    dim = int(features.shape[1])
    del features
    np.save(part_dir / "labels.npy", labels)
    return {"n": n, "dim": dim, "n_nonfinite_rows": n_nonfinite, "macenko_fallbacks": macenko_fallbacks}


def _check_writable(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        what = "features" if (out_dir / "manifest.json").is_file() else "a folder without manifest.json"
        raise FileExistsError(f"{out_dir} already holds {what}; pass overwrite=True to replace it")


def extract_feature_shard(model: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                          dataset: torch.utils.data.Dataset, out_dir: str | os.PathLike, rank: int,
                          world_size: int, batch_size: int = 128, num_workers: int = 0,
                          device: str | torch.device | None = None, amp: bool = True,
                          progress: bool = True) -> Path:
    """Rank `rank`'s contiguous block of rows into `<out_dir>.parts/rank-XXXXX/` (for a later merge)."""
    out_dir = Path(out_dir)
    parts = out_dir.with_name(out_dir.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    final = parts / f"rank-{rank:05d}"
    with atomic.atomic_dir(final, overwrite=True) as tmp:
        stats = _extract_rows(model, transform, dataset, shard_indices(len(dataset), rank, world_size), tmp,
                              batch_size, num_workers, _resolve_device(device), amp, progress)
        atomic.write_json(tmp / "part.json", {"rank": rank, "world_size": world_size, **stats})
    return final


def merge_feature_shards(out_dir: str | os.PathLike, world_size: int, manifest: dict[str, Any],
                         overwrite: bool = False) -> Path:
    """Concatenate the `world_size` parts in rank order into `out_dir` (streaming), write the manifest, clean up."""
    out_dir = Path(out_dir)
    parts = out_dir.with_name(out_dir.name + ".parts")
    part_dirs = [parts / f"rank-{r:05d}" for r in range(world_size)]
    missing = [p.name for p in part_dirs if not (p / "part.json").is_file()]
    if missing:
        raise FileNotFoundError(f"cannot merge {out_dir}: part(s) {', '.join(missing)} missing in {parts}")
    infos = [json.loads((p / "part.json").read_text()) for p in part_dirs]
    dims = {info["dim"] for info in infos if info["n"] > 0} or {infos[0]["dim"]}
    if len(dims) != 1:
        raise ValueError(f"parts of {out_dir} disagree on the feature dimension: {sorted(dims)}")
    n, dim = sum(info["n"] for info in infos), dims.pop()
    _check_writable(out_dir, overwrite)
    with atomic.atomic_dir(out_dir, overwrite) as tmp:
        features = open_memmap(tmp / "features.npy", mode="w+", dtype=np.float32, shape=(n, dim))
        labels = np.zeros(n, dtype=np.int64)
        row = 0
        with open(tmp / "sample_ids.txt", "w") as ids_out:
            for part in part_dirs:
                part_features = np.load(part / "features.npy", mmap_mode="r")
                for start in range(0, len(part_features), MERGE_CHUNK_ROWS):
                    chunk = part_features[start:start + MERGE_CHUNK_ROWS]
                    features[row + start:row + start + len(chunk)] = chunk
                labels[row:row + len(part_features)] = np.load(part / "labels.npy")
                ids_out.write((part / "sample_ids.txt").read_text())
                row += len(part_features)
        features.flush()
        del features
        np.save(tmp / "labels.npy", labels)
        manifest = {**manifest, "n": n, "dim": dim,
                    "n_nonfinite_rows": sum(i["n_nonfinite_rows"] for i in infos),
                    "macenko_fallbacks": sum(i["macenko_fallbacks"] for i in infos),
                    "world_size": world_size}
        atomic.write_json(tmp / "manifest.json", manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return out_dir


def extract_features(model: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                     dataset: torch.utils.data.Dataset, out_dir: str | os.PathLike, batch_size: int = 128,
                     num_workers: int = 0, device: str | torch.device | None = None, amp: bool = True,
                     overwrite: bool = False, progress: bool = True, backbone_info: Any = None) -> Path:
    """Frozen features of `dataset` through `transform` + `model` into `out_dir` (see the module docstring).

    Refuses to overwrite an existing folder unless `overwrite=True`. Under an initialized torch.distributed
    process group every rank extracts its block and rank 0 merges; all ranks return `out_dir`.
    """
    out_dir = Path(out_dir)
    rank, world_size = _dist_rank_world()
    _check_writable(out_dir, overwrite)
    resolved = _resolve_device(device)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    if world_size == 1:  # no parts: stream straight into a temporary sibling, then rename
        with atomic.atomic_dir(out_dir, overwrite) as tmp:
            stats = _extract_rows(model, transform, dataset, np.arange(len(dataset)), tmp, batch_size,
                                  num_workers, resolved, amp, progress)
            seconds = time.perf_counter() - t0
            manifest = _manifest(model, transform, dataset, backbone_info, started, seconds, resolved, amp,
                                 batch_size, num_workers)
            atomic.write_json(tmp / "manifest.json", {**manifest, **stats, "world_size": 1})
        return out_dir
    extract_feature_shard(model, transform, dataset, out_dir, rank, world_size, batch_size, num_workers,
                          resolved, amp, progress and rank == 0)
    torch.distributed.barrier()
    if rank == 0:
        manifest = _manifest(model, transform, dataset, backbone_info, started, time.perf_counter() - t0,
                             resolved, amp, batch_size, num_workers)
        merge_feature_shards(out_dir, world_size, manifest, overwrite=overwrite)
    torch.distributed.barrier()
    return out_dir


def _manifest(model: torch.nn.Module, transform: Any, dataset: Any, backbone_info: Any,
              started: _dt.datetime, seconds: float, device: torch.device, amp: bool, batch_size: int,
              num_workers: int) -> dict[str, Any]:
    """Everything a reader needs to know where a feature folder came from."""
    spec = getattr(transform, "spec", None)
    # a Subset (a capped or split view) keeps its name, split and classes on the dataset it wraps
    base, n_subset_levels = dataset, 0
    while not hasattr(base, "name") and isinstance(getattr(base, "dataset", None), torch.utils.data.Dataset):
        base, n_subset_levels = base.dataset, n_subset_levels + 1
    info = _describe(base, type(base).__name__)
    if n_subset_levels:
        info = {"subset_of": info, "subset_size": len(dataset), "full_size": len(base)}
    return {
        "backbone": _describe(backbone_info, type(model).__name__) if backbone_info is not None
        else {"name": type(model).__name__},
        "dataset": getattr(base, "name", type(base).__name__),
        "split": getattr(base, "split", ""),
        "dataset_info": info,
        "class_names": list(getattr(base, "class_names", [])),
        "preprocessing": _describe(spec, repr(transform)) if spec is not None else repr(transform),
        "created_utc": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "img_per_s": round(len(dataset) / seconds, 3) if seconds > 0 else None,
        "device": str(device),
        "amp_bf16": bool(amp and device.type == "cuda"),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "torch": torch.__version__,
    }


def load_features(directory: str | os.PathLike, mmap: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(X float32 (N,D), y int64 (N,), sample_ids, manifest) of a folder written by `extract_features`."""
    directory = Path(directory)
    missing = [name for name in FEATURE_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a complete feature folder: missing {', '.join(missing)}")
    manifest = json.loads((directory / "manifest.json").read_text())
    features = np.load(directory / "features.npy", mmap_mode="r" if mmap else None)
    labels = np.load(directory / "labels.npy")
    sample_ids = (directory / "sample_ids.txt").read_text().splitlines()
    if not (len(features) == len(labels) == len(sample_ids) == manifest["n"]) or features.shape[1] != manifest["dim"]:
        raise ValueError(f"{directory}: inconsistent sizes features {features.shape}, labels {labels.shape}, "
                         f"ids {len(sample_ids)}, manifest n={manifest['n']} dim={manifest['dim']}")
    return features, labels, sample_ids, manifest
