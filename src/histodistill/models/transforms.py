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


def transform_batch(transform: ModelTransform, tiles: np.ndarray) -> torch.Tensor:
    """`transform` applied to a whole uint8 batch [B, H, W, 3] at once → float [B, 3, S, S].

    The same operations as `ModelTransform.__call__` (resize, centre crop, normalise), on the batch: where
    the model is small (LoRA fine-tuning, CPU tests), a per-tile loop would cost more than its forward pass.
    """
    t = transform.t
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    mode = _MODES[t.interpolation]
    if t.resize is not None and min(x.shape[-2:]) != t.resize:
        x = F.resize(x, [t.resize], interpolation=mode, antialias=True)
    elif t.resize is None and tuple(x.shape[-2:]) != (t.size, t.size):
        x = F.resize(x, [t.size, t.size], interpolation=mode, antialias=True)
    x = F.center_crop(x, [t.size, t.size])
    return (x.float() / 255.0 - transform.mean) / transform.std
