"""Tissue mask on a low-resolution thumbnail: HSV saturation → blur → Otsu → morphology → clean-up.

Stained tissue is coloured, glass and background are grey: saturation separates them without a trained
model. The threshold has a floor so a blank slide (only sensor noise) gives an empty mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage import color, filters, morphology


@dataclass(frozen=True)
class MaskConfig:
    mask_mpp: float = 8.0
    min_saturation: float = 0.05
    min_object_um2: float = 20000.0
    min_hole_um2: float = 5000.0


def tissue_mask(rgb: np.ndarray, params: MaskConfig) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail taken at `params.mask_mpp` µm/px."""
    saturation = color.rgb2hsv(rgb)[..., 1]
    smooth = filters.gaussian(saturation, sigma=1.0, preserve_range=True)
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(smooth.shape, bool)
    threshold = max(float(filters.threshold_otsu(smooth)), params.min_saturation)
    mask = smooth > threshold
    mask = morphology.closing(mask, morphology.disk(2))
    mask = morphology.opening(mask, morphology.disk(1))
    px_area = params.mask_mpp**2
    mask = morphology.remove_small_objects(mask, max_size=int(params.min_object_um2 / px_area))
    mask = morphology.remove_small_holes(mask, max_size=int(params.min_hole_um2 / px_area))
    return mask


def tile_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, size0: float, px0: float) -> np.ndarray:
    """Fraction of mask pixels inside each tile; tiles are given in level-0 px, the mask is `px0` level-0 px/px.

    A summed-area table makes this O(1) per tile.
    """
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    c0 = np.clip(np.round(x0 / px0).astype(np.int64), 0, w)
    r0 = np.clip(np.round(y0 / px0).astype(np.int64), 0, h)
    c1 = np.clip(np.maximum(np.round((x0 + size0) / px0).astype(np.int64), c0 + 1), 0, w)
    r1 = np.clip(np.maximum(np.round((y0 + size0) / px0).astype(np.int64), r0 + 1), 0, h)
    area = np.maximum((c1 - c0) * (r1 - r0), 1)
    inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return inside / area
