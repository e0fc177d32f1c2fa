"""A model's published input transform, applied to uint8 HWC tiles: resize → centre crop → normalise."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from histodistill.models.registry import Transform

_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class ModelTransform:
    """Picklable callable for DataLoader workers: uint8 [H, W, 3] (numpy or tensor) → float [3, S, S]."""

    def __init__(self, transform: Transform):
        self.t = transform
        self.mean = torch.tensor(transform.mean).view(3, 1, 1)
        self.std = torch.tensor(transform.std).view(3, 1, 1)

    def __call__(self, tile: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(tile).permute(2, 0, 1)
        mode = _MODES[self.t.interpolation]
        if self.t.resize is not None and min(x.shape[1:]) != self.t.resize:
            x = F.resize(x, [self.t.resize], interpolation=mode, antialias=True)
        elif self.t.resize is None and tuple(x.shape[1:]) != (self.t.size, self.t.size):
            x = F.resize(x, [self.t.size, self.t.size], interpolation=mode, antialias=True)
        x = F.center_crop(x, [self.t.size, self.t.size])
        return (x.float() / 255.0 - self.mean) / self.std
