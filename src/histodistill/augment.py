"""DINOv2-style augmented views with explicit parameters: draw once, store, rebuild exactly.

Every view's parameters are drawn from a seed derived from (base seed, slide, tile, view), packed into a
fixed-length float64 vector (`VIEW_FIELDS`) that the teacher cache stores beside the teacher's outputs.
`render(tile, params)` applies deterministic uint8 ops (torchvision functional), so the student rebuilds
bit for bit the image the teacher saw.

Views: even view indices are DINOv2's first global crop (blur p=1.0), odd ones the second (blur p=0.1,
solarize p=0.2); local crops (student only) have their own kind.

Optional stain augmentation (`AugmentConfig.hed_jitter`, off by default as in DINOv2): HED jitter of
Tellez et al. 2018 (IEEE TMI 37(9), "Whole-slide mitosis detection in H&E breast histology using PHH3 as a
reference to train distilled stain-invariant convolutional networks") and 2019 (MedIA 58:101544,
"Quantifying the effects of data augmentation and stain color normalization in convolutional neural
networks for computational pathology"): each view's haematoxylin, eosin and DAB concentrations (scikit-image's
`rgb2hed` color deconvolution, Ruifrok & Johnston's matrix) become s·(1 + σ_c) + b_c with σ_c, b_c drawn
uniformly from ±`hed_jitter` (their "HED-light": 0.05; "HED-strong": 0.2), as DIAG's reference
`HedColorAugmenter` (pathology-common) applies them. It runs first, before DINOv2's color jitter: stain
variation happens on the glass, before the scanner and the camera.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional import _color

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
    "hed",  # 1: HED jitter applied (`AugmentConfig.hed_jitter` > 0)
    "hed_scale_h",
    "hed_scale_e",
    "hed_scale_d",
    "hed_bias_h",
    "hed_bias_e",
    "hed_bias_d",
)
GLOBAL_1, GLOBAL_2, LOCAL = 0, 1, 2
_ORDERS = list(permutations(range(4)))  # the order of brightness, contrast, saturation, hue
_F = {name: i for i, name in enumerate(VIEW_FIELDS)}


@dataclass(frozen=True)
class AugmentConfig:
    """DINOv2's defaults (global 224 px, scale 0.32–1; local 98 px, scale 0.05–0.32), plus the HED jitter
    of Tellez et al. (`hed_jitter`: the half-width of σ and b, dimensionless, in scikit-image's stain units;
    0 = off, DINOv2's recipe; see the module docstring)."""

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
    hed_jitter: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        """The config a teacher cache recorded (`augment` in its provenance params; JSON lists become tuples).
        Fields a cache written before them lacks keep their defaults."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
    if cfg.hed_jitter > 0:  # drawn last: the other fields are those of a view without it
        p[_F["hed"]] = 1
        p[_F["hed_scale_h"] : _F["hed_bias_d"] + 1] = rng.uniform(-cfg.hed_jitter, cfg.hed_jitter, 6)
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


def geometric(
    tile: np.ndarray | torch.Tensor, params: np.ndarray, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """The geometric part of a view: uint8 [H, W, 3] tile → uint8 [3, out_px, out_px].

    torchvision's `resized_crop` (bicubic, antialiased) of the stored box, then the stored horizontal
    flip: the cheap part, run in the data loader. `photometric` finishes the view.

    Computed as torchvision computes it (`torch.nn.functional.interpolate`, bicubic, antialias, the kernel
    behind `F.resized_crop` for uint8 tensors), on a view of the crop box in the tile's own HWC memory
    (channels-last): no copy of the whole tile, and torch's vectorized uint8 channels-last path, ~2× less
    CPU. Bit for bit `F.resized_crop` of the CHW tile (tests/unit/test_augment.py), so views rebuilt from
    caches written before are unchanged.
    """
    top, left, height, width, out = (int(params[_F[k]]) for k in ("top", "left", "height", "width", "out_px"))
    if top < 0 or left < 0 or top + height > tile.shape[0] or left + width > tile.shape[1]:
        raise ValueError(f"crop box {(top, left, height, width)} is outside the {tuple(tile.shape[:2])} tile")
    x = torch.as_tensor(np.asarray(tile))[top : top + height, left : left + width].permute(2, 0, 1)
    x = torch.nn.functional.interpolate(
        x[None], size=(out, out), mode="bicubic", align_corners=False, antialias=True
    )[0].contiguous()
    return x.flip(-1) if params[_F["flip"]] else x


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 `_blend` with one ratio per image (float64 [n]). On the CPU the
    `add_(other, alpha=1 - ratio)` runs per image, so its fused multiply-add rounds exactly as
    torchvision's; elsewhere one batched `addcmul_` (a GPU must not be driven image by image)."""
    out = x.mul(ratio.float().view(-1, 1, 1, 1))
    if x.device.type == "cpu":
        for i, r in enumerate(ratio.tolist()):
            out[i].add_(other[i], alpha=1.0 - r)
    else:
        out.addcmul_(other, (1.0 - ratio).float().view(-1, 1, 1, 1))
    return out.clamp_(0, 255).to(torch.uint8)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """torchvision's uint8 `gaussian_blur` (square `kernel`, reflect padding, float32, rounded) with one
    sigma per image (float64 [n]): per image on the CPU (bit for bit torchvision's), one grouped
    convolution of per-image kernels (torchvision's `_get_gaussian_kernel2d` formula) elsewhere."""
    if x.device.type == "cpu":
        return torch.stack(
            [F.gaussian_blur(v, [kernel, kernel], [s, s]) for v, s in zip(x, sigma.tolist(), strict=True)]
        )
    n, c, h, w = x.shape
    lim = (kernel - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, steps=kernel, dtype=torch.float32, device=x.device)
    k1 = torch.softmax(t.div(sigma.float().view(-1, 1)).pow(2).neg(), dim=1)  # [n, k]
    weight = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # [n·c, 1, k, k]
    padded = torch.nn.functional.pad(x.float().reshape(1, n * c, h, w), [kernel // 2] * 4, mode="reflect")
    out = torch.nn.functional.conv2d(padded, weight, groups=n * c)
    return out.reshape(n, c, h, w).round_().to(torch.uint8)


def _hed(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """HED jitter of uint8 RGB images [n, 3, H, W] with per-image σ `scale` and `bias` [n, 3] (H, E, D):
    scikit-image's `rgb2hed` (`separate_stains`: log(max(rgb, 1e-6)) / log(1e-6) times `hed_from_rgb`),
    s·(1 + σ) + b per stain, `hed2rgb` (`combine_stains`, clipped to [0, 1]), on x's device in float32.
    Two deliberate deviations from the reference (DIAG's `HedColorAugmenter` on scikit-image), so that
    σ = b = 0 returns the image to within one uint8 level: the concentrations are not clipped at 0 (scikit-
    image clips them; colors outside the H-E-D gamut, 8 % of a demo tile's pixel values, would then move by up to
    9 levels with no jitter at all), and the result is rounded to uint8, not truncated."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float32, device=x.device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float32, device=x.device)
    log_adjust = math.log(1e-6)
    rgb = x.permute(0, 2, 3, 1).float().div_(255.0).clamp_min_(1e-6)
    stains = (rgb.log_() / log_adjust) @ to_hed
    stains = stains * (1 + scale.float().view(-1, 1, 1, 3)) + bias.float().view(-1, 1, 1, 3)
    out = torch.exp((stains * log_adjust) @ to_rgb).clamp_(0, 1)
    return out.mul_(255.0).round_().to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """float32 [n, 1, H, W] luma of uint8 RGB, floored (torchvision's contrast and saturation reference)."""
    return _color._rgb_to_grayscale_image(x, num_output_channels=1, preserve_dtype=False).floor_()


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x.mul(f.float().view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = _color._rgb_to_hsv(F.to_dtype(x, torch.float32, scale=True))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(f.float().view(-1, 1, 1)).remainder_(1.0)
    return F.to_dtype(_color._hsv_to_rgb(torch.stack((h, s, v), dim=-3)), torch.uint8, scale=True)


_JITTER = (  # in `_ORDERS`' numbering: brightness, contrast, saturation, hue
    ("brightness", _brightness),
    ("contrast", _contrast),
    ("saturation", _saturation),
    ("hue", _hue),
)


def photometric(
    views: torch.Tensor, params: np.ndarray | torch.Tensor, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """The photometric part of views, batched on their device: uint8 [N, 3, S, S] views (`geometric`'s
    output) and their stored parameters [N, len(VIEW_FIELDS)] → uint8 [N, 3, S, S] (a new tensor).

    HED jitter first where the parameters hold it (`_hed`), then DINOv2's color jitter (brightness, contrast, saturation, hue in the stored order), grayscale, Gaussian
    blur (`cfg.blur_kernel`, the stored sigma) and solarize (`cfg.solarize_threshold`), each applied to
    the images whose parameters ask for it. Every step is torchvision's uint8 kernel (torchvision
    `transforms.v2.functional`, whose HSV helpers are used directly) with a tensor of per-image factors
    in place of a scalar. On the CPU the fused add of a blend and the blur run per image, so the result
    equals torchvision's one image at a time, bit for bit (tests/unit/test_augment.py); on a GPU they are
    batched too (launches, not arithmetic, would set its speed), and CUDA kernels round differently: a
    view finished there differs from the CPU's by a few uint8 levels at a few pixels (the bound is tested
    where a GPU is present). ValueError for a shape mismatch.
    """
    if views.ndim != 4 or views.shape[1] != 3 or views.dtype != torch.uint8 or len(params) != len(views):
        raise ValueError(
            f"photometric needs uint8 views [N, 3, S, S] and params [N, {len(VIEW_FIELDS)}], got "
            f"{views.dtype} {tuple(views.shape)} and {tuple(np.shape(params))}"
        )
    p = torch.as_tensor(np.asarray(params, dtype=np.float64) if not torch.is_tensor(params) else params)
    p = p.to(torch.float64).cpu()  # the decisions are made here; only the pixels stay on the device
    x = views.clone()
    idx = torch.nonzero(p[:, _F["hed"]] > 0).flatten()
    if len(idx):
        on = idx.to(x.device)
        hed = p[idx, _F["hed_scale_h"] : _F["hed_bias_d"] + 1].to(x.device)
        x[on] = _hed(x[on], hed[:, :3], hed[:, 3:])
    jitter = p[:, _F["jitter"]] > 0
    order = torch.tensor(_ORDERS)[p[:, _F["order"]].long()]  # [N, 4]: the op at each position
    for position in range(4):
        for op, (name, fn) in enumerate(_JITTER):
            idx = torch.nonzero(jitter & (order[:, position] == op)).flatten()
            if len(idx):
                on = idx.to(x.device)
                x[on] = fn(x[on], p[idx, _F[name]].to(x.device))
    idx = torch.nonzero(p[:, _F["grayscale"]] > 0).flatten()
    if len(idx):
        on = idx.to(x.device)
        x[on] = F.rgb_to_grayscale(x[on], num_output_channels=3)
    idx = torch.nonzero(p[:, _F["blur_sigma"]] > 0).flatten()
    if len(idx):
        on = idx.to(x.device)
        x[on] = _blur(x[on], p[idx, _F["blur_sigma"]].to(x.device), cfg.blur_kernel)
    idx = torch.nonzero(p[:, _F["solarize"]] > 0).flatten()
    if len(idx):
        on = idx.to(x.device)
        x[on] = F.solarize(x[on], cfg.solarize_threshold)
    return x


def render(
    tile: np.ndarray | torch.Tensor, params: np.ndarray, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """Apply stored view parameters to a uint8 [H, W, 3] tile → uint8 [3, out_px, out_px] (deterministic):
    `geometric`, then `photometric` on the CPU."""
    return photometric(geometric(tile, params, cfg)[None], np.asarray(params)[None], cfg)[0]


def view_digest(view: torch.Tensor) -> int:
    """64-bit digest of a rendered uint8 view: stored in the teacher cache to prove bitwise rebuilds."""
    return (
        int.from_bytes(hashlib.blake2b(view.contiguous().numpy().tobytes(), digest_size=8).digest(), "little")
        >> 1
    )


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [..., 3, H, W] → float, normalised with a model's mean/std (on x's device)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s
