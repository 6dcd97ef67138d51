"""Peer foundation models of the paper's comparison, built as released and loaded strictly from local weights.

Spec forms (in `features.extra_backbones`): `peer:NAME=PATH` (a weights file, a Hugging Face snapshot folder,
a `models--org--name` cache folder or a hub cache root holding it) or `peer:NAME` (looked up in the local
Hugging Face cache: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub). Nothing is ever downloaded.

Each `PeerModel` names its architecture and options, the preprocessing its authors use, its probe embedding
and the key layout of the released file. The file is compared key by key (names and shapes, in the file's
own naming) before it is mapped onto the model, so every missing or unexpected key is named in the error.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exaonepath_core.models.backbone_info import IMAGENET_MEAN, IMAGENET_STD, BackboneInfo, PreprocessSpec
from exaonepath_core.models.weights import (
    CheckpointMismatchError,
    load_state_dict_strict,
    raise_on_key_mismatch,
    strip_key_prefixes,
    torch_load,
)

LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)  # Lunit's own pathology statistics (benchmark-ssl-pathology)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0's model card
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


class PeerWeightsAbsent(FileNotFoundError):
    """No local weights for a registered peer: it is listed as absent, never replaced by random weights."""


# ----------------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------------
def _timm(arch: str, depth: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model without classifier; `depth` overrides the block count (reduced models in tests)."""
    import timm

    if depth is not None:
        kwargs["depth"] = depth
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _swiglu_silu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


class ConvStem(nn.Module):
    """TransPath's convolutional patch embedding: two stride-2 3x3 conv/BN/ReLU, a 1x1 conv, then LayerNorm.

    Replaces Swin's 4x4 patchify; output channels-last (NHWC) as timm 1.x Swin stages expect.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Callable[..., nn.Module] | None = None, **_: Any):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8, got {patch_size}, "
                             f"{embed_dim}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        in_dim, out_dim = in_chans, embed_dim // 8
        for _ in range(2):  # indices 0-2 and 3-5 of the released `patch_embed.proj` Sequential
            layers += [nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_dim),
                       nn.ReLU(inplace=True)]
            in_dim, out_dim = out_dim, out_dim * 2
        layers.append(nn.Conv2d(in_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _ctranspath(depth: int | None = None) -> nn.Module:
    """Swin-T (window 7, 224 px) with TransPath's ConvStem; `depth` caps blocks per stage (tests)."""
    import timm

    depths = (2, 2, 6, 2) if depth is None else tuple(min(d, depth) for d in (2, 2, 6, 2))
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                             embed_layer=ConvStem, depths=depths)


class ClsMeanEmbedding(nn.Module):
    """Virchow's probe embedding: the CLS token concatenated with the mean of the patch tokens."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.num_prefix_tokens = int(vit.num_prefix_tokens)  # CLS + register tokens are not patch tokens
        self.num_features = 2 * int(vit.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Key layouts: model state_dict <-> the released file's names
# ----------------------------------------------------------------------------------------------------------
HF_VIT_RENAMES = (  # timm name pattern -> Hugging Face transformers ViTModel name (qkv is split separately)
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layer.\1.layernorm_before.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layer.\1.layernorm_after.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"encoder.layer.\1.output.dense.\2"),
    (r"^norm\.(weight|bias)$", r"layernorm.\1"),
)
HF_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
HF_QKV_PARTS = ("query", "key", "value")


def hf_vit_from_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT state_dict -> Hugging Face ViTModel names (q, k, v split); raises on a name the map lacks."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        qkv = HF_QKV.match(key)
        if qkv:
            for part, chunk in zip(HF_QKV_PARTS, value.chunk(3, dim=0)):
                out[f"encoder.layer.{qkv[1]}.attention.attention.{part}.{qkv[2]}"] = chunk.clone()
            continue
        for pattern, template in HF_VIT_RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            raise KeyError(f"no Hugging Face name for timm key {key!r}")
    return out


HF_VIT_TO_TIMM = (  # the inverse map, spelt out (no name of Phikon's file is left to inference)
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
)
HF_ATTENTION = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_vit_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViTModel state_dict -> timm ViT names (q, k, v concatenated into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = HF_ATTENTION.match(key)
        if match:
            qkv_parts.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        for pattern, template in HF_VIT_TO_TIMM:
            if re.match(pattern, key):
                out[re.sub(pattern, template, key)] = value
                break
        else:
            raise KeyError(f"no timm name for Hugging Face key {key!r}")
    for (block, kind), parts in qkv_parts.items():
        if set(parts) != set(HF_QKV_PARTS):
            raise CheckpointMismatchError(f"encoder.layer.{block}.attention.attention: {kind} of "
                                          f"{sorted(set(HF_QKV_PARTS) - set(parts))} missing")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in HF_QKV_PARTS], dim=0)
    return out


def _swin_derived_buffers(model: nn.Module) -> dict[str, None]:
    """Released CTransPath (timm 0.5.4) keys of buffers timm 1.x recomputes: relative_position_index, attn_mask."""
    return {name: None for name, _ in model.named_buffers()
            if name.endswith(("attn.relative_position_index", "attn_mask"))}


def ctranspath_from_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm 1.x Swin names -> TransPath's timm 0.5.4 names: stage i's leading downsample ends stage i-1."""
    out = {}
    for key, value in state.items():
        match = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
        out[f"layers.{int(match[1]) - 1}.downsample.{match[2]}" if match else key] = value
    return out


def ctranspath_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TransPath's released names -> timm 1.x names; recomputed buffers (relative index, masks) are dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith(("attn.relative_position_index", "attn_mask")):
            continue
        match = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
        out[f"layers.{int(match[1]) + 1}.downsample.{match[2]}" if match else key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerModel:
    """One released model: how to build it, feed it, embed with it and read its weights file."""

    name: str
    title: str
    build: Callable[..., nn.Module]  # build(depth=None) -> the backbone as released (random init)
    preprocess: PreprocessSpec
    embedding: str  # "cls", "pooled" or "cls+mean" (CLS concatenated with the mean of the patch tokens)
    published_at: str
    hf_repo: str | None = None
    from_model: Callable[[Mapping[str, torch.Tensor]], dict] = dict  # model state -> released names
    to_model: Callable[[Mapping[str, torch.Tensor]], dict] = dict  # released names -> model state
    derived: Callable[[nn.Module], dict[str, None]] = field(default=lambda model: {})  # released, recomputed
    ignored_prefixes: tuple[str, ...] = ()  # released keys outside the backbone (classifier, HF pooler)
    container_keys: tuple[str, ...] = ("state_dict", "model")

    def new_model(self, depth: int | None = None) -> nn.Module:
        """The architecture (random init), wrapped so that forward returns the probe embedding."""
        model = self.build(depth=depth)
        return ClsMeanEmbedding(model) if self.embedding == "cls+mean" else model

    def released_layout(self, model: nn.Module) -> dict[str, tuple[int, ...] | None]:
        """Key -> shape of the released file for this architecture (None: a recomputed buffer, any shape)."""
        backbone = model.vit if isinstance(model, ClsMeanEmbedding) else model
        layout: dict[str, tuple[int, ...] | None] = {
            k: tuple(v.shape) for k, v in self.from_model(backbone.state_dict()).items()}
        layout.update(self.derived(backbone))
        return layout


def _spec(resize: int, crop: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"):
    return PreprocessSpec(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)


_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True}
PEERS: dict[str, PeerModel] = {p.name: p for p in (
    PeerModel("resnet50", "ResNet50 ImageNet", lambda depth=None: _timm("resnet50"),
              _spec(256, interpolation="bilinear"), "pooled",
              "torchvision IMAGENET1K_V1 (resnet50-0676ba61.pth) or timm/resnet50.*", "timm/resnet50.tv_in1k",
              ignored_prefixes=("fc.",)),
    PeerModel("vit_large_imagenet", "ViT-L/16 ImageNet",
              partial(_timm, "vit_large_patch16_224", global_pool="token"),
              _spec(248, mean=(0.5,) * 3, std=(0.5,) * 3), "cls",
              "timm/vit_large_patch16_224.augreg_in21k_ft_in1k", "timm/vit_large_patch16_224.augreg_in21k_ft_in1k",
              ignored_prefixes=("head.",)),
    PeerModel("lunit_vits16", "Lunit DINO ViT-S/16", partial(_timm, "vit_small_patch16_224", global_pool="token"),
              _spec(224, mean=LUNIT_MEAN, std=LUNIT_STD), "cls",
              "github.com/lunit-io/benchmark-ssl-pathology releases: dino_vit_small_patch16_ep200.torch",
              ignored_prefixes=("head.",)),
    PeerModel("lunit_vits8", "Lunit DINO ViT-S/8", partial(_timm, "vit_small_patch8_224", global_pool="token"),
              _spec(224, mean=LUNIT_MEAN, std=LUNIT_STD), "cls",
              "github.com/lunit-io/benchmark-ssl-pathology releases: dino_vit_small_patch8_ep200.torch",
              ignored_prefixes=("head.",)),
    PeerModel("ctranspath", "CTransPath", _ctranspath, _spec(224), "pooled",
              "github.com/Xiyue-Wang/TransPath: ctranspath.pth (Google Drive link in its README)",
              from_model=ctranspath_from_timm, to_model=ctranspath_to_timm, derived=_swin_derived_buffers,
              ignored_prefixes=("head.",)),
    PeerModel("phikon", "Phikon", partial(_timm, "vit_base_patch16_224", global_pool="token",
                                          norm_layer=partial(nn.LayerNorm, eps=1e-12)),
              _spec(224), "cls", "huggingface.co/owkin/phikon", "owkin/phikon",
              from_model=hf_vit_from_timm, to_model=hf_vit_to_timm, ignored_prefixes=("pooler.",)),
    PeerModel("virchow", "Virchow", lambda depth=None: _timm("vit_huge_patch14_224", depth, **_VIRCHOW,
                                                             **_swiglu_silu()),
              _spec(224), "cls+mean", "huggingface.co/paige-ai/Virchow", "paige-ai/Virchow",
              ignored_prefixes=("head.",)),
    PeerModel("virchow2", "Virchow2", lambda depth=None: _timm("vit_huge_patch14_224", depth, **_VIRCHOW,
                                                               reg_tokens=4, **_swiglu_silu()),
              _spec(224), "cls+mean", "huggingface.co/paige-ai/Virchow2", "paige-ai/Virchow2",
              ignored_prefixes=("head.",)),
    PeerModel("gigapath", "Prov-GigaPath (tile encoder)",
              partial(_timm, "vit_giant_patch14_dinov2", img_size=224, patch_size=16, mlp_ratio=5.33334,
                      init_values=1e-5, global_pool="token"),
              _spec(256), "cls", "huggingface.co/prov-gigapath/prov-gigapath", "prov-gigapath/prov-gigapath",
              ignored_prefixes=("head.",)),
    PeerModel("uni", "UNI", partial(_timm, "vit_large_patch16_224", img_size=224, init_values=1e-5,
                                    dynamic_img_size=True, global_pool="token"),
              _spec(224), "cls", "huggingface.co/MahmoodLab/UNI", "MahmoodLab/UNI", ignored_prefixes=("head.",)),
    PeerModel("uni2h", "UNI2-h", lambda depth=None: _timm(
                  "vit_giant_patch14_224", 24 if depth is None else depth, img_size=224, patch_size=14,
                  num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True,
                  reg_tokens=8, dynamic_img_size=True, global_pool="token", **_swiglu_silu()),
              _spec(224), "cls", "huggingface.co/MahmoodLab/UNI2-h", "MahmoodLab/UNI2-h",
              ignored_prefixes=("head.",)),
    PeerModel("hoptimus0", "H-optimus-0", partial(_timm, "vit_giant_patch14_reg4_dinov2", img_size=224,
                                                  init_values=1e-5, dynamic_img_size=False, global_pool="token"),
              _spec(224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD), "cls", "huggingface.co/bioptimus/H-optimus-0",
              "bioptimus/H-optimus-0", ignored_prefixes=("head.",)),
)}


def released_state_dict(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under the names (and with the recomputed buffers) of peer `name`'s released file."""
    peer = get_peer(name)
    backbone = model.vit if isinstance(model, ClsMeanEmbedding) else model
    state = peer.from_model(backbone.state_dict())
    buffers = dict(backbone.named_buffers())
    state.update({key: buffers[key].clone() for key in peer.derived(backbone)})
    return {k: v.contiguous() for k, v in state.items()}


def get_peer(name: str) -> PeerModel:
    """The registry entry `name`; KeyError naming the registered ones."""
    if name not in PEERS:
        raise KeyError(f"no registered peer model {name!r}; registered: {', '.join(PEERS)}")
    return PEERS[name]


@cache
def count_parameters(name: str) -> int:
    """Parameters of a peer's architecture, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = get_peer(name).new_model()
    return int(sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------------------------------------
# Finding and reading the weights file
# ----------------------------------------------------------------------------------------------------------
def hub_cache_roots() -> list[Path]:
    """Local Hugging Face hub caches, in the order huggingface_hub itself consults them."""
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        roots.append(str(Path(os.environ["HF_HOME"]) / "hub"))
    roots.append(str(Path.home() / ".cache" / "huggingface" / "hub"))
    return [Path(r).expanduser() for r in dict.fromkeys(r for r in roots if r)]


def _weights_in_folder(folder: Path, peer: PeerModel) -> Path:
    """The weights file inside a snapshot, a models--org--name folder, a hub cache root or a plain folder."""
    if peer.hf_repo and (folder / f"models--{peer.hf_repo.replace('/', '--')}").is_dir():
        folder = folder / f"models--{peer.hf_repo.replace('/', '--')}"
    if (folder / "snapshots").is_dir():
        ref = folder / "refs" / "main"
        snapshots = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
        if ref.is_file() and (folder / "snapshots" / ref.read_text().strip()).is_dir():
            folder = folder / "snapshots" / ref.read_text().strip()
        elif len(snapshots) == 1:
            folder = snapshots[0]
        else:
            raise PeerWeightsAbsent(f"{folder}: {len(snapshots)} snapshots and no refs/main naming one; pass the "
                                    f"snapshot folder itself ({', '.join(p.name for p in snapshots[:5])})")
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".torch", ".safetensors",
                                                                ".ckpt")) if folder.is_dir() else []
    if len(files) == 1:
        return files[0]
    raise PeerWeightsAbsent(f"{folder}: no {' or '.join(WEIGHT_FILE_NAMES)}" +
                            (f" and {len(files)} candidate files ({', '.join(p.name for p in files[:5])}): "
                             "name the file" if files else " and no .pth/.bin/.torch/.safetensors file"))


def resolve_weights(name: str, path: str | Path | None = None) -> Path:
    """The local weights file of peer `name` (explicit path, else the local Hugging Face cache), or raise
    `PeerWeightsAbsent` saying where it looked. Never downloads."""
    peer = get_peer(name)
    if path:
        path = Path(path).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            return _weights_in_folder(path, peer)
        raise PeerWeightsAbsent(f"peer {name}: weights path {path} does not exist")
    if not peer.hf_repo:
        raise PeerWeightsAbsent(f"peer {name}: not on the Hugging Face hub ({peer.published_at}); give the file "
                                f"as peer:{name}=/path/to/file")
    looked = []
    for root in hub_cache_roots():
        folder = root / f"models--{peer.hf_repo.replace('/', '--')}"
        looked.append(str(folder))
        if folder.is_dir():
            return _weights_in_folder(folder, peer)
    raise PeerWeightsAbsent(f"peer {name}: no weights given and none in the local Hugging Face cache (looked in "
                            f"{', '.join(looked)}); get {peer.published_at} and pass peer:{name}=/path")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a torch file read with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001 - re-raised with the path named
            raise CheckpointMismatchError(f"cannot read {path} as safetensors: {exc}") from None
    return torch_load(path)


def _unwrap(checkpoint: Any, peer: PeerModel, source: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint: under `state_dict`/`model` (CTransPath), or the dict itself."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"{source}: expected a dict of tensors, got {type(checkpoint).__name__}")
    for key in peer.container_keys:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointMismatchError(f"{source}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return strip_key_prefixes(checkpoint, ("module.",))


def check_released_layout(state: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, ...] | None],
                          ignored_prefixes: tuple[str, ...], source: str, title: str) -> list[str]:
    """Compare a file's keys and shapes with the released layout; raise naming every difference, else return
    the ignored keys present (classifier / pooler, outside the backbone)."""
    ignored = sorted(k for k in state if k not in layout and k.startswith(ignored_prefixes))
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout) - set(ignored))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} vs {title} {layout[k]}" for k in set(layout) & set(state)
                   if layout[k] is not None and tuple(state[k].shape) != layout[k])
    raise_on_key_mismatch(f"{source} is not the released {title} layout:", missing, unexpected, wrong)
    return ignored


def load_peer_weights(name: str, path: Path, depth: int | None = None) -> tuple[nn.Module, list[str]]:
    """Peer `name` built as released with the weights of `path` (strict); returns (model, ignored keys)."""
    peer = get_peer(name)
    state = _unwrap(read_weights(path), peer, str(path))
    # built on the meta device (random init of up to 1.1B parameters would be wasted CPU time) unless the model
    # has buffers the file does not carry (Swin's recomputed masks): those must be computed for real
    with torch.device("meta"):
        model = peer.new_model(depth=depth)
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        model = peer.new_model(depth=depth)
    ignored = check_released_layout(state, peer.released_layout(model), peer.ignored_prefixes, str(path),
                                    peer.title)
    kept = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items() if k not in ignored}
    backbone = model.vit if isinstance(model, ClsMeanEmbedding) else model
    load_state_dict_strict(backbone, peer.to_model(kept), source=str(path), assign=True)
    return model.eval(), ignored


def load_peer(options: Mapping[str, Any]) -> tuple[nn.Module, BackboneInfo]:
    """`backbones.load_backbone`'s loader for `peer:NAME[=PATH]` specs."""
    name = options["peer"]
    peer = get_peer(name)
    weights = resolve_weights(name, options.get("path"))
    model, ignored = load_peer_weights(name, weights)
    info = BackboneInfo(
        name=options.get("name", f"peer_{name}"), embed_dim=int(model.num_features), input_size=peer.preprocess.crop,
        preprocess=peer.preprocess, source=f"peer:{name}={weights}",
        extra={"peer": name, "title": peer.title, "weights": str(weights), "embedding": peer.embedding,
               "n_parameters": int(sum(p.numel() for p in model.parameters())), "ignored_keys": ignored})
    return model, info
