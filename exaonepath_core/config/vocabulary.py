"""The words a configuration may use, each written once: arms, store modes and formats, encodings, Macenko
defaults, pretraining choices, and the small grammars of shard strings (`i/N`) and schedule lengths (`N steps`).

The modules that act on them (the stores, stain normalization, the DINO loss, schedules) import them from here,
so that a new arm, encoding or choice is added in one place and checked at load time.
"""
from __future__ import annotations

import math
import re

from exaonepath_core.config.values import ConfigError

# pretraining inputs: raw patches, Macenko-normalized patches, raw patches with stain augmentation
INPUT_ARMS = ("raw", "macenko", "stain_augmentation")
# patch stores written by stage 02 (normalize.stores) and their on-disk formats (normalize.store_format)
STORE_MODES = ("raw", "macenko")
STORE_FORMATS = ("npy", "shards")
# shard-store encodings -> file suffix of a record in the tar shards
ENCODINGS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
JPEG_SUBSAMPLINGS = ("4:2:0", "4:4:4")
ON_CORRUPT = ("raise", "skip")  # a corrupt shard record: stop, or count it and read the next
DATA_SOURCES = ("store", "storeless")
DEVICES = ("auto", "cpu", "cuda")
# the paper's Macenko parameters (Io, alpha, beta): the only ones on-the-fly normalization supports
DEFAULT_MACENKO_PARAMS = {"Io": 240.0, "alpha": 1.0, "beta": 0.15}
PRECISIONS = ("bf16", "fp16", "fp32")
CLIP_MODES = ("per_parameter", "global")  # DINO clips each parameter's gradient; DINOv2 clips the global norm
CENTERINGS = ("center", "sinkhorn_knopp")  # DINO's running centre; DINOv2/SwAV's balanced teacher targets
AUTO = "auto"  # nproc_per_node: one process per visible GPU


def store_for_arm(arm: str, normalize_on_the_fly: bool = False, data_source: str = "store") -> str:
    """The folder under stage 02 an arm pretrains from: the macenko store for the macenko arm, unless it
    normalizes on the fly (then the raw store), and the coordinate index for a storeless run (raw tiles; the
    macenko arm then normalizes on the device)."""
    if data_source == "storeless":
        return "storeless"
    return "macenko" if arm == "macenko" and not normalize_on_the_fly else "raw"


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Return `shard` (i, N) if 0 <= i < N (shards are numbered from 0), else raise a ValueError that says so."""
    index, count = (int(v) for v in shard)
    if count < 1:
        raise ValueError(f"shard {index}/{count}: the number of shards N must be >= 1")
    if not 0 <= index < count:
        last = f"; the last of {count} is {count - 1}/{count}" if index == count else ""
        raise ValueError(f"shard {index}/{count} is out of range (need 0 <= i < N): shard indices are 0-based, "
                         f"from 0/{count} to {count - 1}/{count}{last}")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N): this process handles the 0-based i-th of N parts (the one shard parser of every stage)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"shard must look like i/N with a 0-based i (e.g. 0/4 ... 3/4), got {text!r}")
    return check_shard((int(match.group(1)), int(match.group(2))))


# A schedule length is a number of epochs (fractions allowed: 0.045 is 4.5% of one pass over the store) or an
# explicit count of optimisation steps written "2500 steps" (steps of this run's global batch).
_LENGTH_TEXT = re.compile(r"\s*(?P<value>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*(?P<unit>steps?|epochs?)\s*")


def parse_length(key: str, value: float | str) -> tuple[float, str]:
    """`value` of a schedule length as `(amount, unit)`, unit "epochs" or "steps"; ValueError names the key.

    A number means epochs; a string is "N steps" (an integer) or "X epochs".
    """
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004 (config errors are ValueErrors here, whatever the wrong value)
            f"{key} must be a number of epochs or a string 'N steps', got {value!r}")
    if isinstance(value, (int, float)):
        amount, unit = float(value), "epochs"
    else:
        match = _LENGTH_TEXT.fullmatch(str(value))
        if match is None:
            raise ValueError(f"{key} must be a number of epochs (e.g. 0.5) or a string like '2500 steps' or "
                             f"'0.5 epochs', got {value!r}")
        amount, unit = float(match["value"]), "steps" if match["unit"].startswith("step") else "epochs"
        if unit == "steps" and not amount.is_integer():
            raise ValueError(f"{key}: a step count must be a whole number, got {value!r}")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{key} must be >= 0, got {value!r}")
    return amount, unit


def visible_gpu_count() -> int:
    """GPUs this process may use (torch.cuda.device_count(): honours CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch  # seconds to import: only when a GPU count is asked for

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def resolve_nproc_per_node(value: object) -> object:
    """`auto` -> one process per visible GPU, 1 on a machine without one; anything else unchanged (typed later)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return max(1, visible_gpu_count())
    return value


def pick_device(setting: str = "auto") -> str:
    """'cuda' when asked or when auto and a GPU is present, else 'cpu'."""
    import torch  # seconds to import: only when a stage picks its device

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch.cuda.is_available() is False")
    return setting
