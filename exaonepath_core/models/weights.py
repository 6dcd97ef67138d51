"""Reading checkpoints: torch.load of tensors only, wrapper prefixes stripped, and a strict key/shape check whose
error names every missing, unexpected and mis-shaped key (ours, EXAONEPath's and the peers' layouts alike).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Prefixes written by DDP (`module.`), DINO's MultiCropWrapper (`backbone.`) and Lightning-style wrappers
# (`model.`, `teacher.`); stripped (repeatedly, in any order) before the strict key comparison.
ACCEPTED_KEY_PREFIXES = ("module.", "backbone.", "model.", "teacher.")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model; the message names every offending key."""


def strip_key_prefixes(state_dict: Mapping[str, torch.Tensor],
                       prefixes: tuple[str, ...] = ACCEPTED_KEY_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (`module.`, `backbone.`, ...) that every key shares."""
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in prefixes:
            if all(key.startswith(prefix) for key in out):
                out = {key[len(prefix):]: value for key, value in out.items()}
                changed = True
    return out


def raise_on_key_mismatch(header: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> None:
    """Raise `CheckpointMismatchError` under `header` listing every missing, unexpected and mis-shaped key, if any."""
    if not (missing or unexpected or wrong_shape):
        return
    lines = [header]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong_shape:
        lines.append(f"  shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
    raise CheckpointMismatchError("\n".join(lines))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """Load with exact key and shape equality; raise `CheckpointMismatchError` listing every difference."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    raise_on_key_mismatch(f"checkpoint {source} does not match {type(model).__name__}:", missing, unexpected,
                          wrong_shape)
    model.load_state_dict(state_dict, strict=True, assign=assign)


def torch_load(path: Path) -> Any:
    """torch.load on CPU; weights_only first (safe), a clear error when the file is not a checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path named
        # torch's own message suggests weights_only=False, which would run arbitrary code from the file: the
        # checkpoints this loader accepts hold tensors and plain containers only, so a file that needs it is not one
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointMismatchError(
            f"cannot read {path} as a checkpoint of tensors and plain dicts (torch.load(weights_only=True) "
            f"failed: {first_line}). Expected the official EXAONEPath.ckpt, a DINO checkpoint or a state_dict "
            f"saved with torch.save; a truncated download or a non-PyTorch file gives this error."
        ) from None
