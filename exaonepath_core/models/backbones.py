"""Backbones: timm ViTs in the DINO layout, the official EXAONEPath checkpoint, and per-backbone preprocessing.

Three backbone sources, one return type `(model, BackboneInfo)`:
- `exaonepath:/path/EXAONEPath.ckpt`: the official release, a dict whose `state_dict` holds DINO's
  `vit_base(patch_size=16, num_classes=0)`; loaded into timm `vit_base_patch16_224` with a strict key check.
- `timm:<model_name>`: any timm model, random init (no hub), optionally weights from a local file.
- `ours:/path/teacher_backbone.pth`: our own pretraining export (plain state_dict + `teacher_backbone.json`).
Each carries its preprocessing (`PreprocessSpec`), applied batch-wise on uint8 tensors by `make_transform`.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from exaonepath_core.config import ConfigError, ProjectConfig, resolve_path
from exaonepath_core.models.backbone_info import BackboneInfo, PreprocessSpec
from exaonepath_core.models.peers import get_peer, load_peer
from exaonepath_core.models.weights import (
    CheckpointMismatchError,
    load_state_dict_strict,
    strip_key_prefixes,
    torch_load,
)

EXAONEPATH_ARCH = "vit_base_patch16_224"


def create_backbone(
    arch: str = "vit_tiny_patch16_224",
    img_size: int = 224,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ViT without classifier whose forward returns the CLS embedding (B, embed_dim).

    `dynamic_img_size=True` lets one model take global and local crops of different sizes,
    as DINO's multi-crop needs. timm's ViTs already use qkv bias and LayerNorm eps 1e-6,
    the layout of DINO's (and EXAONEPath's) `vit_base`.
    """
    import timm

    kwargs = {
        "pretrained": False,
        "num_classes": 0,
        "img_size": img_size,
        "dynamic_img_size": True,
        "global_pool": "token",
        "drop_path_rate": drop_path_rate,
    }
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return timm.create_model(arch, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# The batched transform a backbone's PreprocessSpec describes
# ----------------------------------------------------------------------------------------------------------
class BatchTransform:
    """uint8 (B,H,W,3) tensor -> normalized float (B,3,crop,crop); picklable, device-agnostic."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self._reference = None
        self.last_fallback_count = 0
        if spec.macenko:
            from exaonepath_core.data.stain.reference import MacenkoReference

            self._reference = (
                MacenkoReference.from_dict(spec.macenko_reference)
                if spec.macenko_reference is not None
                else MacenkoReference.default()
            )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 (B,H,W,3) tensor, got dtype={images.dtype} shape={tuple(images.shape)}"
            )
        spec = self.spec
        if spec.macenko:
            from exaonepath_core.data.stain.macenko import macenko_normalize_batch

            images, fallback = macenko_normalize_batch(images, self._reference, **(spec.macenko_params or {}))
            self.last_fallback_count = int(fallback.sum())
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        height, width = x.shape[-2:]
        if min(height, width) != spec.resize:
            # shorter side to `resize`, like torchvision's Resize(int); antialias as PIL does
            scale = spec.resize / min(height, width)
            size = (max(spec.resize, round(height * scale)), max(spec.resize, round(width * scale)))
            antialias = spec.interpolation != "nearest"
            x = F.interpolate(x, size=size, mode=spec.interpolation, antialias=antialias,
                              align_corners=False if antialias else None)
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL/uint8 pipelines clamp too
        height, width = x.shape[-2:]
        top = round((height - spec.crop) / 2.0)
        left = round((width - spec.crop) / 2.0)
        x = x[..., top:top + spec.crop, left:left + spec.crop]
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def make_transform(info: BackboneInfo | PreprocessSpec) -> BatchTransform:
    """The batch transform (uint8 (B,H,W,3) tensor -> float (B,3,S,S)) a backbone's info describes."""
    spec = info.preprocess if isinstance(info, BackboneInfo) else info
    return BatchTransform(spec)


def exaonepath_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone state_dict inside an EXAONEPath/DINO checkpoint object.

    Accepted layouts: `{'state_dict': sd}` (the official EXAONEPath.ckpt), `{'teacher': sd}` (a DINO training
    checkpoint; its projection-head keys `head.*` are dropped because they are not part of the backbone),
    or a bare state_dict. Key prefixes `module.`, `backbone.`, `model.`, `teacher.` are stripped.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"{source}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    from_dino_training = False
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        state_dict = checkpoint["state_dict"]
    elif "teacher" in checkpoint and isinstance(checkpoint["teacher"], Mapping):
        state_dict, from_dino_training = checkpoint["teacher"], True
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise CheckpointMismatchError(
            f"{source}: no 'state_dict' (or DINO 'teacher') entry; top-level keys: {sorted(checkpoint)[:20]}"
        )
    state_dict = strip_key_prefixes(state_dict)
    if from_dino_training:
        # MultiCropWrapper holds `backbone.*` and the DINO projection `head.*`; only the backbone is wanted
        state_dict = strip_key_prefixes({k: v for k, v in state_dict.items() if not k.startswith("head.")})
    return state_dict


def load_exaonepath_checkpoint(path: str | Path, arch: str = EXAONEPATH_ARCH) -> nn.Module:
    """The official EXAONEPath ViT-B/16 as a timm model (CLS output), loaded with a strict key/shape check."""
    import timm

    path = Path(path)
    state_dict = exaonepath_state_dict(torch_load(path), source=str(path))
    # weights re-saved in fp16/bf16 would otherwise stay in that dtype (assign=True keeps the checkpoint's
    # tensors) and fail at the first float32 forward; features are computed in float32 (autocast may lower it)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    # DINO's vit_base(num_classes=0) and timm's vit_base_patch16_224(num_classes=0, global_pool='token')
    # share every parameter name (no `head.*`, no `fc_norm.*`), so no renaming is needed.
    # Built on the meta device: random init of 86M parameters would be wasted work (seconds on a CPU)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="token")
    if any(True for _ in model.buffers()):
        model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="token")
    load_state_dict_strict(model, state_dict, source=str(path), assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# One entry point for every backbone source
# ----------------------------------------------------------------------------------------------------------
def parse_backbone_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """`"kind:value"` or a dict with `kind` -> a normalized dict (kind, path/model_name, options)."""
    if isinstance(spec, Mapping):
        out = dict(spec)
        if out.get("kind") not in ("exaonepath", "timm", "ours", "peer"):
            raise ValueError(f"backbone spec dict needs kind in exaonepath|timm|ours|peer, "
                             f"got {out.get('kind')!r}")
        return out
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"backbone spec {spec!r} must look like 'exaonepath:/path/EXAONEPath.ckpt', 'timm:<model_name>', "
            "'ours:/path/teacher_backbone.pth' or 'peer:NAME=/path/to/weights'"
        )
    kind, value = spec.split(":", 1)
    if kind == "timm":
        return {"kind": kind, "model_name": value}
    if kind in ("exaonepath", "ours"):
        return {"kind": kind, "path": value}
    if kind == "peer":  # peer:NAME=PATH, or peer:NAME (weights from the local Hugging Face cache)
        name, _, path = value.partition("=")
        try:
            get_peer(name)
        except KeyError as err:
            raise ValueError(str(err).strip('"')) from None
        return {"kind": kind, "peer": name, **({"path": path} if path else {})}
    raise ValueError(f"unknown backbone kind {kind!r} in {spec!r} (expected exaonepath, timm, ours or peer)")


def _reference_dict(options: Mapping[str, Any]) -> dict | None:
    """The Macenko reference named by a spec (`macenko_reference`: a JSON path or dict), else None (default)."""
    ref = options.get("macenko_reference")
    if ref is None or isinstance(ref, dict):
        return ref
    from exaonepath_core.data.stain.reference import MacenkoReference

    return MacenkoReference.from_json(ref).to_dict()


def _load_exaonepath(options: dict[str, Any]) -> tuple[nn.Module, BackboneInfo]:
    model = load_exaonepath_checkpoint(options["path"])
    preprocess = PreprocessSpec(resize=256, crop=224, macenko=True, macenko_reference=_reference_dict(options))
    info = BackboneInfo(name=options.get("name", "exaonepath"), embed_dim=int(model.num_features),
                        input_size=224, preprocess=preprocess, source=f"exaonepath:{options['path']}")
    return model, info


def _load_timm(options: dict[str, Any]) -> tuple[nn.Module, BackboneInfo]:
    import timm

    model_name = options["model_name"]
    if model_name not in timm.list_models():
        raise ValueError(f"timm has no model named {model_name!r}")
    pretrained_cfg = timm.get_pretrained_cfg(model_name)
    default_size = int(pretrained_cfg.input_size[-1]) if pretrained_cfg is not None else 224
    input_size = int(options.get("input_size", default_size))
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if input_size != default_size:
        kwargs["img_size"] = input_size
    try:
        model = timm.create_model(model_name, **kwargs)
    except TypeError:  # CNNs take any size and have no img_size argument
        kwargs.pop("img_size", None)
        model = timm.create_model(model_name, **kwargs)
    weights = options.get("weights")
    if weights:
        state_dict = strip_key_prefixes(exaonepath_state_dict(torch_load(Path(weights)), source=str(weights)))
        load_state_dict_strict(model, state_dict, source=str(weights))
    resize = int(options.get("resize", input_size))
    preprocess = PreprocessSpec(resize=resize, crop=input_size, macenko=bool(options.get("macenko", False)),
                                macenko_reference=_reference_dict(options))
    name = options.get("name", f"timm-{model_name}" + ("" if weights else "-random"))
    info = BackboneInfo(name=name, embed_dim=int(model.num_features), input_size=input_size,
                        preprocess=preprocess, source=f"timm:{model_name}",
                        extra={"weights": str(weights) if weights else None, "seed": options.get("seed")})
    return model.eval(), info


OURS_JSON_KEYS = ("arch", "patch_size", "img_size", "embed_dim")


def _load_ours(options: dict[str, Any]) -> tuple[nn.Module, BackboneInfo]:
    path = Path(options["path"])
    meta_path = path.with_name("teacher_backbone.json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found beside {path} (it holds {', '.join(OURS_JSON_KEYS)})")
    meta = json.loads(meta_path.read_text())
    missing = [key for key in OURS_JSON_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {', '.join(missing)}")
    model = create_backbone(meta["arch"], img_size=int(meta["img_size"]), patch_size=int(meta["patch_size"]))
    load_state_dict_strict(model, strip_key_prefixes(torch_load(path)), source=str(path))
    if int(model.num_features) != int(meta["embed_dim"]):
        raise ValueError(f"{meta_path}: embed_dim {meta['embed_dim']} but the model has {model.num_features}")
    # Trained on Macenko-normalized patches -> normalize the same way at inference.
    macenko = bool(options.get("macenko", meta.get("macenko", meta.get("arm") == "macenko")))
    size = int(meta["img_size"])
    preprocess = PreprocessSpec(resize=size, crop=size, macenko=macenko,
                                macenko_reference=_reference_dict(options) or meta.get("macenko_reference"))
    name = options.get("name", meta.get("name", f"ours-{meta.get('arm', path.parent.name)}"))
    info = BackboneInfo(name=name, embed_dim=int(meta["embed_dim"]), input_size=size, preprocess=preprocess,
                        source=f"ours:{path}", extra={k: v for k, v in meta.items() if k not in OURS_JSON_KEYS})
    return model.eval(), info


def load_backbone(spec: str | Mapping[str, Any]) -> tuple[nn.Module, BackboneInfo]:
    """Load any backbone from `exaonepath:PATH`, `timm:NAME`, `ours:PATH` or `peer:NAME[=PATH]` (or the dict
    form) in eval mode."""
    options = parse_backbone_spec(spec)
    loader = {"exaonepath": _load_exaonepath, "timm": _load_timm, "ours": _load_ours,
              "peer": load_peer}[options["kind"]]
    if options["kind"] == "timm" and not options.get("weights"):
        # random-init timm backbones are reproducible only with a fixed seed: 0 unless the spec names one
        options.setdefault("seed", 0)
    if "seed" in options:
        torch.manual_seed(int(options["seed"]))
    model, info = loader(options)
    for param in model.parameters():
        param.requires_grad_(False)
    return model, info


# ----------------------------------------------------------------------------------------------------------
# Config checks of backbone specs (features.extra_backbones), run by stages.config_checks before any stage
# ----------------------------------------------------------------------------------------------------------
BACKBONE_FORMS = ("'exaonepath:/path/EXAONEPath.ckpt'", "'ours:/path/teacher_backbone.pth'", "'timm:<model_name>'",
                  "'peer:NAME=/path/to/weights' (NAME from exaonepath_core.models.peers.PEERS)")


def resolve_backbone_spec(spec: str) -> dict[str, Any]:
    """`parse_backbone_spec(spec)` with a checkpoint path made absolute as every config path is
    (`resolve_path`: `~` expanded, relative to the repository root); ValueError for a malformed spec."""
    options = parse_backbone_spec(spec)
    if "path" in options:
        options["path"] = str(resolve_path(options["path"]))
    return options


def check_backbone_spec(dotted: str, spec: str) -> None:
    """ConfigError unless `spec` parses, its checkpoint (and for `ours:` the teacher_backbone.json beside it)
    exists, and a `timm:` name is a timm architecture; what stage 04 would otherwise find after pretraining."""
    try:
        options = resolve_backbone_spec(spec)
    except ValueError as err:
        reason = "no kind: prefix" if ":" not in spec else str(err)
        raise ConfigError(f"config key {dotted}: {spec!r} is not a backbone spec ({reason}); accepted forms: "
                          f"{', '.join(BACKBONE_FORMS)}") from None
    if options["kind"] == "peer":
        # an explicit weights path must exist; `peer:NAME` alone (the local Hugging Face cache) may be absent:
        # stage 04 then lists the peer as absent instead of stopping the run
        if "path" in options and not Path(options["path"]).exists():
            raise ConfigError(f"config key {dotted}: weights of {spec!r} not found: {options['path']} "
                              "(a file, a Hugging Face snapshot or cache folder; relative paths are read from "
                              "the repository root)")
        return
    if options["kind"] in ("exaonepath", "ours"):
        # local checkpoints are never downloaded: a missing one can only fail later
        path = Path(options["path"])
        if not path.is_file():
            raise ConfigError(f"config key {dotted}: checkpoint of {spec!r} not found: {path} is not a file "
                              "(relative paths are read from the repository root)")
        meta = path.with_name("teacher_backbone.json")
        if options["kind"] == "ours" and not meta.is_file():
            raise ConfigError(f"config key {dotted}: {spec!r} needs {meta} beside the weights (written with them "
                              "by pretraining's export: arch, patch_size, img_size, embed_dim)")
        return
    import timm  # slow to import (seconds): only for a timm: entry

    name = options["model_name"]
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"config key {dotted}: timm has no architecture named {name!r} in {spec!r} (see "
                          f"timm.list_models(); pretrained tags such as '.augreg_in21k' are not accepted){hint}")


def check_config(cfg: ProjectConfig) -> None:
    """Every `features.extra_backbones` entry parses and its weights exist (`check_backbone_spec`)."""
    for i, spec in enumerate(cfg.features.extra_backbones):
        check_backbone_spec(f"features.extra_backbones[{i}]", spec)
