"""DINO's projection head and the multi-crop wrapper that runs the backbone once per crop resolution."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """DINO projection head: MLP to a bottleneck, L2 normalisation, weight-normalised linear layer to `out_dim`.

    The last layer uses `torch.nn.utils.parametrizations.weight_norm`; its state_dict keys are
    `last_layer.parametrizations.weight.original0` (the norm g, fixed at 1 when `norm_last_layer`) and
    `...original1` (the direction v).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        fp32_last_layer: bool = True,
    ) -> None:
        super().__init__()
        # under autocast the K-way logits are cosines / T: bf16 would round them to 2^-8 (~0.05 nats at T=0.04)
        self.fp32_last_layer = fp32_last_layer
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim) logits."""
        x = self.mlp(x)
        x = nnf.normalize(x, dim=-1, p=2)
        if self.fp32_last_layer and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.last_layer(x.float())
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops; the backbone runs once per run of equal-resolution crops."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Crops (each (B, 3, H, W)) -> head outputs concatenated in crop order, shape (n_crops * B, out_dim)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        sizes = [tuple(c.shape[-2:]) for c in crops]
        features = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


def last_layer_parameters(head: DINOHead) -> list[nn.Parameter]:
    """The head's last-layer parameters (frozen during the first `freeze_last_layer` epochs)."""
    return list(head.last_layer.parameters())
