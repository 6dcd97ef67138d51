"""What the pretraining loader yields: the epoch's per-rank order, multi-crop samples, their collate, the store.

Each sample's augmentations are seeded from (seed, epoch, index) alone (`EpochSampler` hands the epoch to the
workers), so a resumed or re-sharded run draws exactly the views it would have drawn.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from exaonepath_core.config import ConfigError, PretrainConfig
from exaonepath_core.data import patch_store
from exaonepath_core.data.shard_dataset import open_patch_dataset
from exaonepath_core.data.stain.augment import stain_augment_batch
from exaonepath_core.data.stain.macenko import macenko_normalize_batch
from exaonepath_core.pretrain.multicrop import MultiCropAugmentation
from exaonepath_core.pretrain.view_params import sample_seed


def epoch_indices(n: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's share of the epoch's seeded permutation (equal length on every rank)."""
    return np.asarray(patch_store.rank_indices(n, rank, world_size, seed, epoch), dtype=np.int64)


class EpochSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` so each worker can seed a sample's augmentations without shared state."""

    def __init__(self, indices: np.ndarray, epoch: int) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class MultiCropDataset(Dataset):
    """Wraps a patch dataset (uint8 (T, T, 3) per item): optional stain augmentation, then DINO multi-crop draws.

    An item is `(patch, params)`: the (stain-augmented) uint8 patch and the (n_crops, N_VIEW_PARAMS) random
    parameters of its views, both drawn from the sample's own generator seeded by (seed, epoch, index). The pixel
    work of the multi-crop runs batched afterwards (`MultiCropCollate` in the loader, or on the training device),
    so a sample's views stay a pure function of (seed, epoch, index). With `augmentation=None` an item is the patch.
    """

    def __init__(
        self,
        patches: Dataset,
        augmentation: MultiCropAugmentation | None,
        seed: int,
        stain_augmentation: bool = False,
    ) -> None:
        self.patches = patches
        self.augmentation = augmentation
        self.seed = int(seed)
        self.stain_augment_batch = stain_function("stain_augment_batch") if stain_augmentation else None

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        epoch, index = key
        patch = torch.from_numpy(np.ascontiguousarray(self.patches[index]))
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        if self.stain_augment_batch is not None:
            patch = self.stain_augment_batch(patch[None], generator)[0]
        if self.augmentation is None:
            return patch
        return patch, self.augmentation.sample_params(patch.shape[0], patch.shape[1], generator)


class MultiCropCollate:
    """Stacks `(patch, params)` items; with `apply_views` also runs the batched multi-crop (in the loader worker).

    Returns the list of views `[g1, g2, l1..lN]` (each (B, 3, S, S)) or, without `apply_views`, the pair
    `(patches (B, T, T, 3) uint8, params (B, n_crops, P))` for the loop to augment on the training device.
    """

    def __init__(self, augmentation: MultiCropAugmentation, apply_views: bool) -> None:
        self.augmentation = augmentation
        self.apply_views = apply_views

    def __call__(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        patches = torch.stack([patch for patch, _ in items])
        params = torch.stack([params for _, params in items])
        if self.apply_views:
            return self.augmentation.apply(patches, params)
        return patches, params


def stain_function(name: str) -> Any:
    """`stain_augment_batch` or `macenko_normalize_batch` (exaonepath_core.data.stain), by name."""
    functions = {"stain_augment_batch": stain_augment_batch, "macenko_normalize_batch": macenko_normalize_batch}
    if name not in functions:
        raise ValueError(f"no stain function {name!r}; expected one of {sorted(functions)}")
    return functions[name]


def load_patch_dataset(cfg: PretrainConfig) -> Dataset:
    """The patch store named by `cfg.data_root` (held-out slides left out), checked against the input arm."""
    if not cfg.data_root:
        raise ConfigError("data_root is empty: point it at a patch store (raw or macenko) written by stage 02")

    def open_store(root: str, slide_ids: list[str] | None = None) -> Dataset:
        return open_patch_dataset(root, slide_ids, max_open_files=cfg.store_max_open_files,
                                  max_open_slides=cfg.store_max_open_files, on_corrupt=cfg.store_on_corrupt)

    dataset = open_store(cfg.data_root)
    excluded = sorted(set(cfg.exclude_slide_ids) & set(dataset.slide_ids))
    if excluded:
        keep = sorted(set(dataset.slide_ids) - set(excluded))
        print(f"[pretrain] {len(excluded)} excluded (held-out) slide(s) present in the store are left out: "
              f"{', '.join(excluded[:10])}{' ...' if len(excluded) > 10 else ''}", file=sys.stderr, flush=True)
        dataset = open_store(cfg.data_root, slide_ids=keep)
    if cfg.input_arm == "macenko" and not cfg.normalize_on_the_fly and getattr(dataset, "mode", None) == "raw":
        raise ConfigError(f"{cfg.data_root} holds raw patches (store mode raw, asked for input_arm macenko): point "
                          "data_root at a macenko store or set normalize_on_the_fly: true (storeless is always raw)")
    return dataset

