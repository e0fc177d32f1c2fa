"""Open a slide, resolve its microns-per-pixel (and where that came from), read regions at a target µm/px.

Physical scale, not pyramid level: callers ask for µm/px; this module picks the pyramid level with the
coarsest resolution that is still at least as fine as the target, and reads it in bounded strips.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
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


def read_rgb(slide: openslide.OpenSlide, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
    """read_region as uint8 RGB; transparent pixels (outside the scanned area) become white.

    A decoding failure (corrupt tile data) becomes a SlideError naming the slide and the region.
    """
    try:
        rgba = np.asarray(slide.read_region((int(x0), int(y0)), level, (int(width), int(height))))
    except openslide.OpenSlideError as exc:
        name = getattr(slide, "_filename", "slide")
        raise SlideError(
            f"corrupt slide {name}: cannot read {width}x{height} px at ({x0}, {y0}) level {level} ({exc})"
        ) from exc
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb


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
