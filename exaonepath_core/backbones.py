"""Backbones: timm ViTs in the DINO layout (CLS token output, qkv bias, LayerNorm eps 1e-6)."""
from __future__ import annotations

import torch.nn as nn


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

    kwargs = dict(
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=True,
        global_pool="token",
        drop_path_rate=drop_path_rate,
    )
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return timm.create_model(arch, **kwargs)
