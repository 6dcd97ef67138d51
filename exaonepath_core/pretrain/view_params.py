"""The layout of one view's random parameters and the arithmetic both multi-crop pixel paths share.

`multicrop.MultiCropAugmentation.sample_params` writes one (n_crops, N_VIEW_PARAMS) row block per sample; the host
path (`multicrop`) and the device path (`multicrop_device`) read it with the same kernels defined here, so the two
cannot drift apart.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentations, a pure function of (run seed, epoch, dataset index)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# Layout of one view's row of random parameters (float64), drawn by `MultiCropAugmentation.sample_params` and
# read by `MultiCropAugmentation.apply`. Colour-jitter factors are the identity (1, 1, 1, 0) when jitter is off.
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH, P_FLIP = 0, 1, 2, 3, 4
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE = 5, 6, 7, 8
P_ORDER = slice(9, 13)  # colour-jitter op order: 0 brightness, 1 contrast, 2 saturation, 3 hue
P_GRAY, P_SIGMA, P_SOLARIZE = 13, 14, 15  # sigma 0: no blur
N_VIEW_PARAMS = 16

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
# NTSC RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane at fixed luma Y.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def cubic_aa(distance: torch.Tensor) -> torch.Tensor:
    """The bicubic kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    a = -0.5
    x = distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))



def reflect_shifts(size: int, radius: int) -> torch.Tensor:
    """(2 * radius + 1, size, size) 0/1 matrices: row i of shift d picks pixel i + d, reflected at the borders."""
    index = torch.arange(size)[None, :] + torch.arange(-radius, radius + 1)[:, None]
    index = torch.where(index < 0, -index, index)
    index = torch.where(index >= size, 2 * (size - 1) - index, index)
    return nnf.one_hot(index, size).to(torch.float64)

