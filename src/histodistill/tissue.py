"""Tissue mask on a low-resolution thumbnail, from several cues, with the pixels it rejected and why.

`detect_tissue` combines, on an RGB thumbnail taken at `mask_mpp` µm/px:

1. **A brightness window** on luminance (Rec. 709 weights, 0–1): pixels darker than `min_brightness`
   (black borders, dark tinted backgrounds such as RGB ≈ (6, 4, 12) with JPEG noise, whose saturation is
   high because the channels are tiny) or brighter than `max_brightness` (glass) are never tissue.
2. **Pen-ink removal** (`remove_ink`): blue, green, red and black marker are recognised by HSV hue,
   saturation and value ranges (`INK_RANGES`) and removed, with a 1-px fringe. This follows the idea of
   histolab's `BluePenFilter`/`GreenPenFilter`/`RedPenFilter` (after deroneriksson/python-wsi-preprocessing),
   which test many RGB boxes per pen colour; here one HSV range per colour, chosen to leave haematoxylin
   (hue ≈ 240–290°) and eosin (≈ 300–350°) alone. CLAM (Lu et al. 2021, `segmentTissue`) relies on a
   saturation threshold plus contour filtering and keeps ink; this is the part it lacks.
3. **The stain cue**: HSV saturation for colour slides, optical density for greyscale ones (below),
   smoothed (Gaussian, σ = 1 px), thresholded with Otsu's method computed on the pixels the window and
   the ink filter left, and never below a floor (`min_saturation`, `min_od`), so a blank slide gives an
   empty mask. When Otsu's lower class is itself stained (mean ≥ twice the floor) there is no background
   to separate (a slide that is all tissue, e.g. one tile large): the floor alone is the threshold.
4. **Greyscale slides** (single-channel, or RGB whose 99th-percentile chroma max−min is below
   `GREY_CHROMA`, judged on the pixels inside the brightness window): saturation is meaningless, so the
   cue is optical density OD = −log10(luminance) (Beer–Lambert, with white = 1), and `greyscale` is set
   so callers can warn. The ink filter is off on greyscale slides: there, "dark and achromatic" (black
   ink) describes dense tissue too, and coloured ink cannot occur.
5. **Clean-up**: closing (disk 2) then opening (disk 1); pieces smaller than `min_object_um2` removed and
   holes smaller than `min_hole_um2` filled (strictly smaller) (µm², converted with `mask_mpp`). Callers that tile cap both
   at one tile's area (`histodistill.tiling.plan_tiles`).

`tissue_method: learned` replaces step 3 with a segmentation network loaded from a local weights file
(`load_segmenter`; the kind TRIDENT runs, e.g. its HEST DeepLabV3 or GrandQC tissue models exported to
TorchScript); steps 1, 2 and 5 still apply.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage import color, filters, morphology

from histodistill.errors import ConfigError, ModelError

TISSUE_METHODS = ("classical", "learned")
GREY_CHROMA = 10.0  # 99th percentile of max−min of RGB (0–255) below this: the slide is greyscale
_LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)  # Rec. 709, as skimage.color.rgb2gray

# Pen ink as HSV ranges: hue in degrees (a range may wrap through 0), saturation and value in 0–1.
# Blue stops at 235° (dense haematoxylin is ≈ 245° and above); green spans 70–185° (H&E has no green);
# red is 355–25° and strongly saturated (eosin is ≈ 320°; note that fresh blood is ≈ 350°); black is dark
# and achromatic (haematoxylin-dense tissue is dark but saturated).
INK_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "blue": {"hue": (185.0, 235.0), "saturation": (0.45, 1.0), "value": (0.0, 1.0)},
    "green": {"hue": (70.0, 185.0), "saturation": (0.2, 1.0), "value": (0.0, 1.0)},
    "red": {"hue": (355.0, 25.0), "saturation": (0.6, 1.0), "value": (0.0, 1.0)},
    "black": {"hue": (0.0, 360.0), "saturation": (0.0, 0.35), "value": (0.0, 0.4)},
}


@dataclass(frozen=True)
class MaskConfig:
    """The tissue-mask settings (the `tiling.*` keys of the same names; see schema.yaml)."""

    mask_mpp: float = 8.0
    min_saturation: float = 0.05
    min_object_um2: float = 20000.0
    min_hole_um2: float = 5000.0
    min_brightness: float = 0.12
    max_brightness: float = 0.9
    remove_ink: bool = True
    min_od: float = 0.05
    tissue_method: str = "classical"
    tissue_weights: str | None = None


@dataclass(frozen=True)
class TissueDetection:
    """What `detect_tissue` found on a thumbnail [H, W]: every mask is bool [H, W].

    - `mask`: tissue;
    - `ink`: pen ink removed (with its 1-px fringe);
    - `dark`: near-black background (luminance < min_brightness), never tissue;
    - `greyscale`: the slide was judged greyscale and thresholded on optical density;
    - `cue`, `threshold`: the quantity thresholded ("saturation", "optical density" or "learned") and the
      threshold applied to it (NaN when the image was constant).
    """

    mask: np.ndarray
    ink: np.ndarray
    dark: np.ndarray
    greyscale: bool
    cue: str
    threshold: float


def _in_hue(hue_deg: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (hue_deg >= lo) & (hue_deg <= hi) if lo <= hi else (hue_deg >= lo) | (hue_deg <= hi)


def ink_mask(hsv: np.ndarray) -> np.ndarray:
    """Pen ink of any colour in `INK_RANGES`: bool [H, W] from an HSV image [H, W, 3] (skimage, 0–1)."""
    hue = hsv[..., 0] * 360.0
    out = np.zeros(hsv.shape[:2], bool)
    for ranges in INK_RANGES.values():
        (slo, shi), (vlo, vhi) = ranges["saturation"], ranges["value"]
        out |= (
            _in_hue(hue, *ranges["hue"])
            & (hsv[..., 1] >= slo)
            & (hsv[..., 1] <= shi)
            & (hsv[..., 2] >= vlo)
            & (hsv[..., 2] <= vhi)
        )
    return out


def is_greyscale(rgb: np.ndarray, valid: np.ndarray | None = None) -> bool:
    """True when the image carries no colour: 99th percentile of max−min over RGB (0–255) < GREY_CHROMA.

    `valid` (bool [H, W]) restricts the pixels looked at (e.g. the brightness window).
    """
    chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    values = chroma[valid] if valid is not None else chroma.ravel()
    return values.size == 0 or float(np.percentile(values, 99)) < GREY_CHROMA


def _threshold(values: np.ndarray, floor: float) -> float:
    """Otsu's threshold on `values`, never below `floor`; the floor alone when Otsu's lower class is
    stained (mean ≥ 2 × floor): then there is no background to separate, only tissue (e.g. a slide one
    tile large), and Otsu would cut the tissue in two. A faintly tinted glass (mean below 2 × floor) still
    counts as background."""
    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        return floor
    otsu = float(filters.threshold_otsu(values))
    lower = values[values <= otsu]
    if lower.size and float(lower.mean()) >= 2 * floor:
        return floor
    return max(otsu, floor)


def _below(area_um2: float, mpp: float) -> int:
    """The largest pixel count (at `mpp` µm/px) strictly below `area_um2`: skimage's max_size is inclusive."""
    return max(0, math.ceil(area_um2 / mpp**2) - 1)


def detect_tissue(rgb: np.ndarray, params: MaskConfig) -> TissueDetection:
    """Tissue, ink and dark background of an RGB thumbnail (uint8 [H, W, 3]) taken at `params.mask_mpp` µm/px.

    The cues and their sources are in the module docstring. Raises ConfigError for an unknown
    `tissue_method` and ModelError when `tissue_method: learned` has no usable weights file.
    """
    if params.tissue_method not in TISSUE_METHODS:
        raise ConfigError(f"tiling.tissue_method {params.tissue_method!r} is not one of {TISSUE_METHODS}")
    rgb = np.asarray(rgb)[..., :3]
    shape = rgb.shape[:2]
    luminance = rgb.astype(np.float32) @ _LUMA / 255.0
    dark = luminance < params.min_brightness
    window = ~dark & (luminance <= params.max_brightness)
    hsv = color.rgb2hsv(rgb)
    greyscale = bool(window.any()) and is_greyscale(rgb, window)  # only glass or dark: nothing to judge
    ink = np.zeros(shape, bool)
    if params.remove_ink and not greyscale:  # on a grey slide "black ink" would be any dark tissue
        ink = ink_mask(hsv) & ~dark
        ink = morphology.dilation(ink, morphology.disk(1)) & ~dark if ink.any() else ink
    usable = window & ~ink
    if float(rgb.max()) - float(rgb.min()) < 1e-6:  # a constant image holds no tissue
        empty = np.zeros(shape, bool)
        return TissueDetection(empty, ink, dark, greyscale, "saturation", float("nan"))

    if params.tissue_method == "learned":
        cue, threshold = "learned", 0.5
        mask = run_segmenter(load_segmenter(params.tissue_weights), rgb) & usable
    else:
        if greyscale:
            cue, floor = "optical density", params.min_od
            signal = -np.log10(np.maximum(luminance, 1 / 255))
        else:
            cue, floor = "saturation", params.min_saturation
            signal = hsv[..., 1]
        signal = np.where(usable, signal, 0.0)  # rejected pixels do not bleed into their neighbours
        smooth = filters.gaussian(signal, sigma=1.0, preserve_range=True)
        threshold = _threshold(smooth[usable], floor)
        mask = (smooth > threshold) & usable
    mask = morphology.closing(mask, morphology.disk(2)) & ~dark & ~ink
    mask = morphology.opening(mask, morphology.disk(1))
    mask = morphology.remove_small_objects(mask, max_size=_below(params.min_object_um2, params.mask_mpp))
    mask = morphology.remove_small_holes(mask, max_size=_below(params.min_hole_um2, params.mask_mpp))
    return TissueDetection(mask, ink, dark, greyscale, cue, float(threshold))


def tissue_mask(rgb: np.ndarray, params: MaskConfig) -> np.ndarray:
    """Boolean tissue mask [H, W] of an RGB thumbnail taken at `params.mask_mpp` µm/px (`detect_tissue`)."""
    return detect_tissue(rgb, params).mask


@functools.lru_cache(maxsize=2)
def _load_torchscript(path: str, mtime_ns: int):
    import torch

    model = torch.jit.load(path, map_location="cpu")
    model.eval()
    return model


def load_segmenter(weights: str | Path | None):
    """The learned tissue segmenter of `tiling.tissue_method: learned`, loaded from a local file.

    Contract (the seam for a TRIDENT-style segmenter, e.g. HEST's DeepLabV3 or GrandQC's tissue model,
    exported with `torch.jit.script`/`torch.jit.trace`): a TorchScript module that takes float32
    [N, 3, H, W], RGB in 0–1 normalised with the ImageNet mean/std, at `tiling.mask_mpp` µm/px (set
    `mask_mpp` to the resolution the model was trained at), and returns logits [N, C, H, W]: C = 1 is a
    tissue logit (tissue where > 0), C ≥ 2 are class logits with class 1 = tissue (argmax). No weights
    ship with histodistill and none are downloaded.

    Raises ModelError naming the path when it is unset or missing, or when torch cannot load it.
    """
    if not weights:
        raise ModelError(
            "tiling.tissue_method is 'learned' but tiling.tissue_weights is not set: give the path of a "
            "TorchScript tissue segmenter, or use tissue_method: classical"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"tissue segmenter weights not found: {path} (tiling.tissue_weights); give an existing "
            "TorchScript file, or use tissue_method: classical"
        )
    try:
        return _load_torchscript(str(path.resolve()), path.stat().st_mtime_ns)
    except ImportError as exc:
        raise ModelError(f"tissue segmenter {path}: torch is not installed ({exc})") from exc
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"tissue segmenter {path} is not a loadable TorchScript module ({exc})") from exc


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def run_segmenter(model, rgb: np.ndarray) -> np.ndarray:
    """Tissue (bool [H, W]) from a segmenter following `load_segmenter`'s contract on uint8 [H, W, 3].

    Raises ModelError when the output is not [1, C, H, W].
    """
    import torch

    x = (rgb.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None])
    out = out.detach().float().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
    if out.ndim != 4 or out.shape[0] != 1 or out.shape[2:] != rgb.shape[:2]:
        raise ModelError(
            f"tissue segmenter returned shape {tuple(out.shape)}; expected [1, C, {rgb.shape[0]}, "
            f"{rgb.shape[1]}] logits"
        )
    return out[0, 0] > 0 if out.shape[1] == 1 else out[0].argmax(0) == 1


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
