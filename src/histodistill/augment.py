"""DINOv2-style augmented views with explicit parameters: draw once, store, rebuild exactly.

Every view's parameters are drawn from a seed derived from (base seed, slide, tile, view), packed into a
fixed-length float64 vector (`VIEW_FIELDS`) that the teacher cache stores beside the teacher's outputs.
`render(tile, params)` applies deterministic uint8 ops (torchvision functional), so the student rebuilds
bit for bit the image the teacher saw.

Views: even view indices are DINOv2's first global crop (blur p=1.0), odd ones the second (blur p=0.1,
solarize p=0.2); local crops (student only) have their own kind.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

VIEW_FIELDS = (
    "kind",
    "top",
    "left",
    "height",
    "width",
    "out_px",
    "flip",
    "jitter",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "order",
    "grayscale",
    "blur_sigma",
    "solarize",
)
GLOBAL_1, GLOBAL_2, LOCAL = 0, 1, 2
_ORDERS = list(permutations(range(4)))  # the order of brightness, contrast, saturation, hue
_F = {name: i for i, name in enumerate(VIEW_FIELDS)}


@dataclass(frozen=True)
class AugmentConfig:
    """DINOv2's defaults (global 224 px, scale 0.32–1; local 98 px, scale 0.05–0.32)."""

    global_px: int = 224
    local_px: int = 98
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 9
    solarize_threshold: int = 128


def view_seed(base_seed: int, slide_id: str, tile_id: int, view: int) -> np.random.SeedSequence:
    slide_key = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    return np.random.SeedSequence([base_seed, slide_key, int(tile_id), int(view)])


def _crop_box(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling, with our generator."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def draw_view(
    rng: np.random.Generator, kind: int, tile_hw: tuple[int, int], cfg: AugmentConfig = AugmentConfig()
) -> np.ndarray:
    """The parameters of one view (float64 [len(VIEW_FIELDS)])."""
    p = np.zeros(len(VIEW_FIELDS))
    p[_F["kind"]] = kind
    scale, out_px = (cfg.local_scale, cfg.local_px) if kind == LOCAL else (cfg.global_scale, cfg.global_px)
    p[[_F["top"], _F["left"], _F["height"], _F["width"]]] = _crop_box(rng, *tile_hw, scale, cfg.ratio)
    p[_F["out_px"]] = out_px
    p[_F["flip"]] = rng.random() < cfg.flip_p
    if rng.random() < cfg.jitter_p:
        p[_F["jitter"]] = 1
        p[_F["brightness"]] = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        p[_F["contrast"]] = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        p[_F["saturation"]] = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        p[_F["hue"]] = rng.uniform(-cfg.hue, cfg.hue)
        p[_F["order"]] = rng.integers(0, len(_ORDERS))
    p[_F["grayscale"]] = rng.random() < cfg.grayscale_p
    blur_p = {GLOBAL_1: 1.0, GLOBAL_2: 0.1, LOCAL: 0.5}[kind]
    if rng.random() < blur_p:
        p[_F["blur_sigma"]] = rng.uniform(*cfg.blur_sigma)
    p[_F["solarize"]] = kind == GLOBAL_2 and rng.random() < 0.2
    return p


def draw_views(
    base_seed: int,
    slide_id: str,
    tile_id: int,
    kinds: list[int],
    tile_hw: tuple[int, int],
    cfg: AugmentConfig = AugmentConfig(),
    first_view: int = 0,
) -> np.ndarray:
    """Parameters of views first_view…first_view+len(kinds)-1 of one tile ([V, len(VIEW_FIELDS)]).

    Each view number has its own seed, so a view never depends on how many others are drawn.
    """
    return np.stack(
        [
            draw_view(
                np.random.default_rng(view_seed(base_seed, slide_id, tile_id, first_view + v)),
                k,
                tile_hw,
                cfg,
            )
            for v, k in enumerate(kinds)
        ]
    )


def global_kinds(n_views: int) -> list[int]:
    return [GLOBAL_1 if v % 2 == 0 else GLOBAL_2 for v in range(n_views)]


def render(
    tile: np.ndarray | torch.Tensor, params: np.ndarray, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """Apply stored view parameters to a uint8 [H, W, 3] tile → uint8 [3, out_px, out_px] (deterministic)."""
    x = torch.as_tensor(np.asarray(tile)).permute(2, 0, 1).contiguous()
    p = {name: float(params[i]) for i, name in enumerate(VIEW_FIELDS)}
    out = int(p["out_px"])
    x = F.resized_crop(
        x,
        int(p["top"]),
        int(p["left"]),
        int(p["height"]),
        int(p["width"]),
        [out, out],
        interpolation=InterpolationMode.BICUBIC,
        antialias=True,
    )
    if p["flip"]:
        x = F.horizontal_flip(x)
    if p["jitter"]:
        ops = (
            lambda t: F.adjust_brightness(t, p["brightness"]),
            lambda t: F.adjust_contrast(t, p["contrast"]),
            lambda t: F.adjust_saturation(t, p["saturation"]),
            lambda t: F.adjust_hue(t, p["hue"]),
        )
        for i in _ORDERS[int(p["order"])]:
            x = ops[i](x)
    if p["grayscale"]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur_sigma"] > 0:
        x = F.gaussian_blur(x, [cfg.blur_kernel, cfg.blur_kernel], [p["blur_sigma"], p["blur_sigma"]])
    if p["solarize"]:
        x = F.solarize(x, cfg.solarize_threshold)
    return x


def view_digest(view: torch.Tensor) -> int:
    """64-bit digest of a rendered uint8 view: stored in the teacher cache to prove bitwise rebuilds."""
    return (
        int.from_bytes(hashlib.blake2b(view.contiguous().numpy().tobytes(), digest_size=8).digest(), "little")
        >> 1
    )


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [..., 3, H, W] → float, normalised with a model's mean/std."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s
