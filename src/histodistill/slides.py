"""Open a slide, resolve its microns-per-pixel (and where that came from), read regions at a target µm/px.

Physical scale, not pyramid level: callers ask for µm/px; this module picks the pyramid level with the
coarsest resolution that is still at least as fine as the target, and reads it in bounded strips.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from ctypes import POINTER, c_uint32
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from openslide import lowlevel
from PIL import Image

from histodistill.errors import MppError, SlideError
from histodistill.mpp import parse_mpp

log = logging.getLogger(__name__)

# Physical range of brightfield whole-slide scans: ~0.1 µm/px (100× oil) to ~4 µm/px (a 2.5× overview).
# A header or an override outside it is an error: it is a wrong unit or a wrong number, not a slide.
MPP_RANGE = (0.1, 4.0)
MPP_XY_TOLERANCE = 0.05  # x and y µm/px may differ by 5% (pixel aspect); more is a header error
# µm/px × objective magnification ≈ 10 (a 20× scan is ≈ 0.5 µm/px). Scanner cameras differ, e.g. 3DHistech
# 20× ≈ 0.24, Hamamatsu 20× ≈ 0.45, Aperio 20× ≈ 0.50, so only a factor beyond OBJECTIVE_FACTOR is an error:
# it still catches a header 10× off (the usual mm/µm or 10×/100× slip).
OBJECTIVE_UM = 10.0
OBJECTIVE_FACTOR = 3.0
OBJECTIVE_KEYS = (
    "openslide.objective-power",
    "aperio.AppMag",
    "hamamatsu.SourceLens",
    "ventana.Magnification",
    "ome.NominalMagnification",
)
LEVEL_DIM_TOLERANCE = 0.01  # a level's size may miss level-0 size / downsample by 1 px or 1%, not more
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


OME_SUFFIXES = (".ome.tif", ".ome.tiff")


def open_slide(path: str | Path) -> openslide.OpenSlide:
    """Open a whole-slide image, turning failures into errors that name the file.

    OpenSlide reads the slide formats (SVS, NDPI, MRXS, tiled TIFF, …). An OME-TIFF (`*.ome.tif[f]`), and any
    TIFF that OpenSlide refuses (a stripped TIFF), is opened with tifffile instead
    (`histodistill.tifffile_slide.TiffFileSlide`: OpenSlide would see neither the OME-XML nor the SubIFD
    pyramid). Raises SlideError naming the file when neither can read it.
    """
    from histodistill.tifffile_slide import TiffFileSlide

    path = Path(path)
    if not path.exists():
        raise SlideError(f"slide not found: {path}")
    if not path.is_file():
        raise SlideError(f"slide path is not a file: {path}")
    if path.name.lower().endswith(OME_SUFFIXES):
        return TiffFileSlide(path)
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                return TiffFileSlide(path)
            except SlideError as tiff_exc:
                raise SlideError(
                    f"neither OpenSlide nor tifffile can read the TIFF {path} ({exc}; {tiff_exc})"
                ) from tiff_exc
        raise SlideError(f"not a slide format OpenSlide can read: {path} ({exc})") from exc
    except openslide.OpenSlideError as exc:
        raise SlideError(f"corrupt or unreadable slide: {path} ({exc})") from exc


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


# OME UnitsLength symbols → µm (OME-XML schema 2016-06; PhysicalSizeX's default unit is µm).
_OME_UNIT_MICRONS = {
    "m": 1e6,
    "dm": 1e5,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,  # U+00B5 MICRO SIGN, as the schema writes it
    "μm": 1.0,  # U+03BC GREEK SMALL LETTER MU, as some writers do
    "um": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "in": 25400.0,
    "ft": 304800.0,
    "pt": 25400.0 / 72,
}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_properties(description: str | None) -> dict[str, str]:
    """µm/px and objective magnification from an OME-XML ImageDescription (the first Image's Pixels).

    Returns `ome.mpp-x`, `ome.mpp-y` (µm, converted from `PhysicalSizeX/Y` in their `PhysicalSizeX/YUnit`,
    default µm) and `ome.NominalMagnification` where present; {} when `description` is not OME-XML.
    Raises MppError for a unit that is not an OME length unit (the value cannot be converted).
    Reference: OME Data Model, schema 2016-06 (`Pixels`, `UnitsLength`, `Objective`).
    """
    if not description or "<OME" not in description[:2000]:
        return {}
    try:
        root = ET.fromstring(description.encode("utf-8") if isinstance(description, str) else description)
    except ET.ParseError:
        return {}
    out: dict[str, str] = {}
    pixels = next((e for e in root.iter() if _local(e.tag) == "Pixels"), None)
    if pixels is not None:
        for axis in ("X", "Y"):
            value = _float(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            if value is None:
                continue
            if unit not in _OME_UNIT_MICRONS:
                raise MppError(
                    f"OME-XML PhysicalSize{axis}Unit {unit!r} is not a length unit histodistill knows "
                    f"({', '.join(_OME_UNIT_MICRONS)}); give the µm/px as an override"
                )
            out[f"ome.mpp-{axis.lower()}"] = repr(value * _OME_UNIT_MICRONS[unit])
    objective = next((e for e in root.iter() if _local(e.tag) == "Objective"), None)
    if objective is not None and objective.get("NominalMagnification"):
        out["ome.NominalMagnification"] = objective.get("NominalMagnification")
    return out


def _ome_mpp(props: dict[str, str]) -> tuple[float, float, str] | None:
    mx, my = _float(props.get("ome.mpp-x")), _float(props.get("ome.mpp-y"))
    if mx is None or my is None:
        return None
    return mx, my, "OME-XML PhysicalSizeX/Y"


def _with_ome(props: dict[str, str]) -> dict[str, str]:
    if "ome.mpp-x" in props:
        return props
    return {**props, **ome_properties(props.get("tiff.ImageDescription"))}


def _tiff_mpp(props: dict[str, str]) -> tuple[float, float, str] | None:
    unit = (props.get("tiff.ResolutionUnit") or "").strip().lower()
    xres, yres = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if unit not in _UNIT_MICRONS or xres is None or yres is None:
        return None  # unit "none" (or absent) gives no physical scale
    return _UNIT_MICRONS[unit] / xres, _UNIT_MICRONS[unit] / yres, f"tiff.XResolution/{unit}"


def objective_power(props: dict[str, str]) -> tuple[float, str] | None:
    """The scan's objective magnification and its key (OBJECTIVE_KEYS, in order), or None."""
    for key in OBJECTIVE_KEYS:
        value = _float(props.get(key))
        if value is not None:
            return value, key
    return None


def resolve_mpp(props: dict[str, str], override: float | None = None, slide_name: str = "slide") -> Mpp:
    """Resolve µm/px: an explicit override wins; else openslide.mpp-x/y, vendor keys, OME-XML, TIFF tags.

    `props` are the slide's properties (OpenSlide's, or `histodistill.slides.open_slide`'s for OME-TIFF);
    an OME-XML `tiff.ImageDescription` is parsed for `PhysicalSizeX/Y` with its unit (`ome_properties`).
    No header number is trusted alone. Errors (MppError naming `slide_name`, both values and the override
    to use), checked in this order:
    - no MPP anywhere (a silent default would make every tile the wrong physical size);
    - x and y µm/px that differ by more than MPP_XY_TOLERANCE (5%);
    - a header MPP more than OBJECTIVE_FACTOR (3×) away from OBJECTIVE_UM / objective magnification
      (`openslide.objective-power`, `aperio.AppMag`, …; 10/20 = 0.5 µm/px at 20×);
    - an MPP outside MPP_RANGE (0.1–4 µm/px, the physical range of brightfield scans), override included.
    An override is not checked against the objective (it is how a user fixes a wrong header); a
    disagreement is logged as a warning.
    """
    try:
        props = _with_ome(props)
    except MppError as exc:
        raise MppError(f"{slide_name}: {exc}") from None
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
    found = found or _vendor_mpp(props) or _ome_mpp(props) or _tiff_mpp(props)
    if found is None:
        raise MppError(
            f"{slide_name}: no microns-per-pixel in the slide (no openslide.mpp-x/y, vendor key, OME-XML "
            "PhysicalSizeX/Y or TIFF resolution tag). Give it explicitly: an 'mpp' column in the sample "
            "sheet, or --slide-mpp on the command line."
        )
    mx, my, source = found
    fix = "Fix the slide's metadata or override it (sample sheet 'mpp' / --slide-mpp)"
    if abs(mx - my) > MPP_XY_TOLERANCE * min(mx, my):
        raise MppError(
            f"{slide_name}: x and y microns-per-pixel disagree: x {mx:g} vs y {my:g} µm/px (from {source}; "
            f"tolerance {MPP_XY_TOLERANCE:.0%}). {fix}."
        )
    objective = objective_power(props)
    if objective is not None:
        power, key = objective
        expected = OBJECTIVE_UM / power
        ratio = (mx + my) / 2 / expected
        if not 1 / OBJECTIVE_FACTOR <= ratio <= OBJECTIVE_FACTOR:
            message = (
                f"{slide_name}: microns-per-pixel {(mx + my) / 2:g} (from {source}) disagrees with the "
                f"objective power {power:g}× (from {key}), which implies ≈ {expected:g} µm/px "
                f"(accepted: a factor {OBJECTIVE_FACTOR:g} either way)"
            )
            if source != "override":
                raise MppError(f"{message}. {fix}.")
            log.warning("%s; using the override", message)
    else:
        log.debug("%s: no objective power to cross-check its µm/px (%s) against", slide_name, source)
    lo, hi = MPP_RANGE
    if not (lo <= mx <= hi and lo <= my <= hi):
        raise MppError(
            f"{slide_name}: implausible microns-per-pixel {mx:g} x {my:g} (from {source}); expected "
            f"{lo:g}–{hi:g} µm/px, the range of brightfield slide scanners. {fix}."
        )
    return Mpp(mx, my, source)


def check_levels(slide: openslide.OpenSlide, slide_name: str = "slide") -> None:
    """Check each pyramid level's downsample against its actual dimensions (x and y).

    A level's width and height must both equal level-0 size / downsample within one pixel or
    LEVEL_DIM_TOLERANCE (1%), whichever is larger; otherwise tiles read from it would be stretched.
    Raises SlideError naming the slide, the level, the downsample and the dimensions.
    """
    w0, h0 = slide.level_dimensions[0]
    for level, ((w, h), downsample) in enumerate(
        zip(slide.level_dimensions, slide.level_downsamples, strict=True)
    ):
        for size0, size, axis in ((w0, w, "width"), (h0, h, "height")):
            expected = size0 / downsample
            if abs(expected - size) > max(1.0, LEVEL_DIM_TOLERANCE * size):
                raise SlideError(
                    f"{slide_name}: pyramid level {level} has downsample {downsample:g}, but its {axis} "
                    f"{size} px implies {size0 / max(size, 1):g} (level 0: {w0} x {h0} px, level {level}: "
                    f"{w} x {h} px). The pyramid is inconsistent: rebuild it (e.g. vips tiffsave --pyramid)."
                )


def checked_mpp(slide: openslide.OpenSlide, override: float | None = None, slide_name: str = "slide") -> Mpp:
    """`resolve_mpp` of an open slide's properties, after `check_levels`: the slide's checked geometry."""
    check_levels(slide, slide_name)
    return resolve_mpp(dict(slide.properties), override, slide_name)


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
    """The whole slide at `target_mpp` (for thumbnails), read from the best level in bounded strips.

    Returns uint8 [H, W, 3] with H, W ≥ 1; every output row is written (see `read_scaled_many`).
    """
    return read_scaled_many(slide, slide_mpp, [target_mpp])[0]


def read_scaled_many(
    slide: openslide.OpenSlide, slide_mpp: float, targets: Sequence[float]
) -> list[np.ndarray]:
    """The whole slide at each µm/px of `targets` (uint8 [H, W, 3] each), decoding each level only once.

    Targets with the same best level (`best_level`) share one pass over that level in bands of at most
    `_BAND_BYTES` of RGBA; each band is box-filtered into every output. Bands depend on the level only, so
    an output is identical whether it is read alone or with others (the tissue mask does not depend on
    whether a QC image is drawn). A band's output rows are its input rows times out_h / level height, so
    consecutive bands tile the output exactly and every row is written, also on slides a few pixels high.
    """
    outputs: list[np.ndarray] = [np.zeros((1, 1, 3), np.uint8)] * len(targets)
    by_level: dict[int, list[int]] = {}
    for i, target in enumerate(targets):
        by_level.setdefault(best_level(slide, slide_mpp, target), []).append(i)
    for level, indices in sorted(by_level.items()):
        lw, lh = slide.level_dimensions[level]
        downsample = slide.level_downsamples[level]
        for i in indices:
            scale = slide_mpp * downsample / targets[i]  # output px per level px (≤ 1 + tolerance)
            outputs[i] = np.empty((max(1, round(lh * scale)), max(1, round(lw * scale)), 3), np.uint8)
        band_rows = max(1, _BAND_BYTES // (4 * lw))
        row = 0
        while row < lh:
            rows = min(band_rows, lh - row)
            band = None
            for i in indices:
                out_h, out_w = outputs[i].shape[:2]
                o0, o1 = round(row * out_h / lh), round((row + rows) * out_h / lh)
                if o1 > o0:
                    if band is None:
                        band = Image.fromarray(read_rgb(slide, 0, round(row * downsample), level, lw, rows))
                    outputs[i][o0:o1] = np.asarray(band.resize((out_w, o1 - o0), Image.Resampling.BOX))
            row += rows
    return outputs
