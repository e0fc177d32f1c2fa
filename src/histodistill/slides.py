"""Open a slide, resolve its microns-per-pixel (and where that came from), read regions at a target µm/px.

Physical scale, not pyramid level: callers ask for µm/px; this module picks the pyramid level with the
coarsest resolution that is still at least as fine as the target, and reads it in bounded strips.
"""

from __future__ import annotations

import math
import re
import sys
from ctypes import POINTER, c_uint32
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from openslide import lowlevel
from PIL import Image

from histodistill.errors import MppError, SlideError

MPP_RANGE = (0.05, 20.0)
LEVEL_TOLERANCE = 0.01  # a level 1% coarser than the target still counts as "at the target"
_BAND_BYTES = 64 * 2**20  # the most RGBA bytes one read_region call may return


@dataclass(frozen=True)
class Mpp:
    """Microns per level-0 pixel and the source it came from (recorded in every artifact)."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a whole-slide image with OpenSlide, turning its failures into errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"slide not found: {path}")
    if not path.is_file():
        raise SlideError(f"slide path is not a file: {path}")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideError(f"not a slide format OpenSlide can read: {path} ({exc})") from exc
    except openslide.OpenSlideError as exc:
        raise SlideError(f"corrupt or unreadable slide: {path} ({exc})") from exc


def parse_mpp(value: object) -> float | None:
    """A µm/px override as a sample sheet, a manifest or a rule param gives it: a float, or None for none.

    None, NaN (pandas' missing value) and a blank string mean "no override" and give None (the slide's own
    metadata is then used). A number, or a string holding one, gives that float. Raises ValueError for
    anything else: text that is not a number, inf, zero or a negative value.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            out = float(value.strip())
        except ValueError:
            raise ValueError(f"µm/px {value!r} is not a number") from None
    else:
        try:
            out = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"µm/px {value!r} is not a number") from None
        if math.isnan(out):
            return None
    if math.isnan(out) or not math.isfinite(out) or out <= 0:
        raise ValueError(f"µm/px {value!r} is not a number > 0")
    return out


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        out = float(str(value).strip().strip('"'))
    except ValueError:
        return None
    return out if math.isfinite(out) and out > 0 else None


def _vendor_mpp(props: dict[str, str]) -> tuple[float, float, str] | None:
    """Vendor-specific keys that OpenSlide does not always map to openslide.mpp-x/y."""
    if (v := _float(props.get("aperio.MPP"))) is not None:
        return v, v, "aperio.MPP"
    if (v := _float(props.get("ventana.ScanRes"))) is not None:
        return v, v, "ventana.ScanRes"
    spacing = props.get("philips.DICOM_PIXEL_SPACING")  # e.g. '"0.000243" "0.000243"' in mm (row, col)
    if spacing:
        values = [_float(s) for s in re.findall(r"[0-9.eE+-]+", spacing)]
        if len(values) == 2 and all(values):
            return values[1] * 1000, values[0] * 1000, "philips.DICOM_PIXEL_SPACING"
    return None


_UNIT_MICRONS = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def _tiff_mpp(props: dict[str, str]) -> tuple[float, float, str] | None:
    unit = (props.get("tiff.ResolutionUnit") or "").strip().lower()
    xres, yres = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if unit not in _UNIT_MICRONS or xres is None or yres is None:
        return None  # unit "none" (or absent) gives no physical scale
    return _UNIT_MICRONS[unit] / xres, _UNIT_MICRONS[unit] / yres, f"tiff.XResolution/{unit}"


def resolve_mpp(props: dict[str, str], override: float | None = None, slide_name: str = "slide") -> Mpp:
    """Resolve µm/px: an explicit override wins; else openslide.mpp-x/y, vendor keys, TIFF resolution tags.

    No MPP anywhere, or an implausible one, is an error naming the slide and the override to use:
    a silent default would make every tile the wrong physical size.
    """
    found: tuple[float, float, str] | None = None
    try:
        given = parse_mpp(override)
    except ValueError as exc:
        raise MppError(f"{slide_name}: override {exc}") from None
    if given is not None:
        found = (given, given, "override")
    if found is None:
        mx, my = (
            _float(props.get(openslide.PROPERTY_NAME_MPP_X)),
            _float(props.get(openslide.PROPERTY_NAME_MPP_Y)),
        )
        if mx is not None and my is not None:
            found = (mx, my, "openslide.mpp")
    found = found or _vendor_mpp(props) or _tiff_mpp(props)
    if found is None:
        raise MppError(
            f"{slide_name}: no microns-per-pixel in the slide (no openslide.mpp-x/y, vendor key or TIFF "
            "resolution tag). Give it explicitly: an 'mpp' column in the sample sheet, or --slide-mpp on "
            "the command line."
        )
    mx, my, source = found
    lo, hi = MPP_RANGE
    if not (lo <= mx <= hi and lo <= my <= hi):
        raise MppError(
            f"{slide_name}: implausible microns-per-pixel {mx:g} x {my:g} (from {source}); expected "
            f"{lo:g}–{hi:g}. Fix the slide's metadata or override it (sample sheet 'mpp' / --slide-mpp)."
        )
    return Mpp(mx, my, source)


def best_level(slide: openslide.OpenSlide, slide_mpp: float, target_mpp: float) -> int:
    """The coarsest pyramid level whose µm/px is at or finer than the target (never upsample)."""
    best = 0
    for level, downsample in enumerate(slide.level_downsamples):
        if slide_mpp * downsample <= target_mpp * (1 + LEVEL_TOLERANCE):
            best = level
    return best


def _premultiplied_to_rgb(argb: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied ARGB (uint32 [H, W]) → uint8 RGB [H, W, 3]; transparent pixels white.

    One copy of the pixels. Opaque pixels are unpacked as they are; partly transparent pixels are
    un-premultiplied as openslide-python's `argb2rgba` does (255·c // alpha, truncated), so the colours
    equal `OpenSlide.read_region`'s RGBA; fully transparent pixels (outside the scanned area) become white.
    """
    height, width = argb.shape
    channels = argb.view(np.uint8).reshape(height, width, 4)
    r, g, b, a = (2, 1, 0, 3) if sys.byteorder == "little" else (1, 2, 3, 0)
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = channels[..., r]  # three contiguous-destination passes beat one reversed-stride copy 3×
    rgb[..., 1] = channels[..., g]
    rgb[..., 2] = channels[..., b]
    if argb.min() < 0xFF000000:  # some pixel is not opaque (rare: slide edges, non-rectangular scans)
        alpha = channels[..., a]
        partial = (alpha > 0) & (alpha < 255)
        if partial.any():
            values = rgb[partial].astype(np.uint32) * 255 // alpha[partial, None]
            rgb[partial] = np.minimum(values, 255).astype(np.uint8)
        rgb[alpha == 0] = 255
    return rgb


def _read_argb(
    slide: openslide.OpenSlide, x0: int, y0: int, level: int, width: int, height: int
) -> np.ndarray:
    """OpenSlide's premultiplied ARGB (uint32 [height, width]) decoded straight into an array owned here.

    Uses openslide-python's `lowlevel._read_region` (the C call `OpenSlide.read_region` makes; ctypes
    releases the GIL around it) with the buffer the pinned openslide-python 1.4 would allocate itself.
    """
    argb = np.empty((height, width), np.uint32)
    lowlevel._read_region(slide._osr, argb.ctypes.data_as(POINTER(c_uint32)), x0, y0, level, width, height)
    return argb


def _region_error(slide, x0: int, y0: int, level: int, width: int, height: int, exc: Exception) -> SlideError:
    name = getattr(slide, "_filename", "slide")
    return SlideError(
        f"corrupt slide {name}: cannot read {width}x{height} px at ({x0}, {y0}) level {level} ({exc})"
    )


def read_rgb(slide: openslide.OpenSlide, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
    """read_region as uint8 RGB [height, width, 3]; transparent pixels (outside the scanned area) become white.

    `(x0, y0)` is the top-left corner in level-0 px, `width` × `height` the size in px of `level`. For an
    `openslide.OpenSlide`, OpenSlide decodes straight into a buffer owned here (the C call releases the GIL,
    so threads read in parallel) and one copy unpacks it to RGB; `OpenSlide.read_region` instead goes
    through a PIL image, whose conversion to an array copies the RGBA again before the RGB copy (0.17 s per
    demo slide, histodistill issue 19). The pixels equal `read_region`'s RGBA without its alpha
    (openslide-python 1.4's `lowlevel.read_region` and `argb2rgba`, which this mirrors; the pinned version).
    Other slide objects (e.g. `openslide.ImageSlide`) go through their `read_region`.

    Raises SlideError naming the slide and the region when decoding fails (corrupt tile data).
    """
    x0, y0, level, width, height = int(x0), int(y0), int(level), int(width), int(height)
    try:
        if isinstance(slide, openslide.OpenSlide) and width > 0 and height > 0:
            return _premultiplied_to_rgb(_read_argb(slide, x0, y0, level, width, height))
        rgba = np.asarray(slide.read_region((x0, y0), level, (width, height)))
    except openslide.OpenSlideError as exc:
        raise _region_error(slide, x0, y0, level, width, height, exc) from exc
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


def read_rgb_image(
    slide: openslide.OpenSlide, x0: int, y0: int, level: int, width: int, height: int
) -> Image.Image:
    """The pixels of `read_rgb` as a PIL RGB image, for resizing: an opaque region of an `OpenSlide` is
    unpacked by PIL straight from OpenSlide's buffer (one copy, instead of one to an array and one into PIL).

    Raises SlideError as `read_rgb`.
    """
    x0, y0, level, width, height = int(x0), int(y0), int(level), int(width), int(height)
    if isinstance(slide, openslide.OpenSlide) and width > 0 and height > 0:
        try:
            argb = _read_argb(slide, x0, y0, level, width, height)
        except openslide.OpenSlideError as exc:
            raise _region_error(slide, x0, y0, level, width, height, exc) from exc
        if argb.min() >= 0xFF000000:  # opaque: PIL's BGRX unpacker (XRGB on big-endian) drops the alpha byte
            rawmode = "BGRX" if sys.byteorder == "little" else "XRGB"
            return Image.frombuffer("RGB", (width, height), argb, "raw", rawmode, 0, 1)
        return Image.fromarray(_premultiplied_to_rgb(argb))
    return Image.fromarray(read_rgb(slide, x0, y0, level, width, height))


def read_scaled(slide: openslide.OpenSlide, slide_mpp: float, target_mpp: float) -> np.ndarray:
    """The whole slide at `target_mpp` (for thumbnails), read from the best level in bounded strips."""
    level = best_level(slide, slide_mpp, target_mpp)
    lw, lh = slide.level_dimensions[level]
    downsample = slide.level_downsamples[level]
    scale = slide_mpp * downsample / target_mpp  # output px per level px (≤ 1 + tolerance)
    out_w, out_h = max(1, round(lw * scale)), max(1, round(lh * scale))
    out = np.empty((out_h, out_w, 3), np.uint8)
    band_rows = max(1, _BAND_BYTES // (4 * lw))
    row = 0
    while row < lh:
        rows = min(band_rows, lh - row)
        o0, o1 = round(row * scale), round((row + rows) * scale)
        if o1 > o0:
            band = read_rgb(slide, 0, round(row * downsample), level, lw, rows)
            out[o0:o1] = np.asarray(Image.fromarray(band).resize((out_w, o1 - o0), Image.Resampling.BOX))
        row += rows
    return out
