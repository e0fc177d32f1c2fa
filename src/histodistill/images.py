"""Images of any mode → uint8 RGB: the one conversion every path that reads image files or pixel arrays uses.

Probe datasets (`bench.datasets.pack_image_dataset`), HEST patch files (`bench.datasets.pack_hest_task`) and
TIFFs that OpenSlide cannot open (`slides.TiffFileSlide`) all go through `as_rgb8` (arrays) or
`read_image_rgb` (files), so every mode gives the same, correct pixels:

- grey (1 channel, or PIL "L"/"1"/"I;16"/"I"/"F") is repeated into R = G = B;
- palette ("P", "PA") is expanded through its palette (with its transparency, if any);
- an alpha channel (grey + alpha, RGBA, premultiplied "RGBa"/"La") is composited on white:
  out = colour · α + 255 · (1 − α) with α in [0, 1] (glass is white in brightfield);
- 16-bit is scaled to 8-bit as round(v · 255 / 65535) = round(v / 257) (the full range maps onto the full
  range); floats must lie in [0, 1] and are scaled by 255; bool is 0 / 255;
- CMYK, YCbCr, LAB and HSV files are converted to RGB by Pillow.

Deliberate deviation: Pillow opens a 16-bit *colour* PNG as 8-bit RGB keeping the high byte (v >> 8, at most
one level below round(v / 257)); histodistill uses that rather than a PNG decoder of its own. TIFFs are read
with tifffile, which keeps all 16 bits, so a 16-bit colour TIFF is scaled exactly.

An unreadable or unsupported file raises ImageReadError naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodistill.errors import HistodistillError

TIFF_SUFFIXES = (".tif", ".tiff")


class ImageReadError(HistodistillError):
    """An image file cannot be read, or its pixels are of a kind histodistill cannot convert to RGB."""


def _unit_scale(pixels: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """(pixels as float64 in [0, 1], whether they were already uint8) for one dtype."""
    dtype = pixels.dtype
    if dtype == np.uint8:
        return pixels, True
    if dtype == np.bool_:
        return pixels.astype(np.float64), False
    if dtype == np.uint16:
        return pixels / 65535.0, False
    if np.issubdtype(dtype, np.integer):
        # PIL's "I" mode (int32) holds 16-bit greyscale PNGs; other ranges have no defined white.
        lo, hi = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageReadError(
                f"{name}: {dtype} pixels range {lo}–{hi}, beyond 16 bits; convert the image to 8 or 16 bits"
            )
        return pixels / 65535.0, False
    if np.issubdtype(dtype, np.floating):
        lo, hi = (float(np.nanmin(pixels)), float(np.nanmax(pixels))) if pixels.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):
            raise ImageReadError(
                f"{name}: floating-point pixels range {lo:g}–{hi:g}; only [0, 1] has a defined white. "
                "Convert the image to 8 or 16 bits"
            )
        return np.nan_to_num(pixels.astype(np.float64)), False
    raise ImageReadError(f"{name}: pixels of type {dtype} cannot be converted to RGB")


def as_rgb8(pixels: np.ndarray, name: str = "image", has_channels: bool | None = None) -> np.ndarray:
    """Any image array → uint8 [..., H, W, 3] (see the module docstring for each mode).

    `pixels` is [H, W] (grey), [H, W, C] with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA), or a
    batch of either ([N, H, W], [N, H, W, C]). `has_channels` says whether the last axis is C; None guesses
    (it is when the array has ≥ 3 axes and the last is at most 4 long). Dtypes: uint8, uint16, other
    integers within 0–65535, float in [0, 1], bool. Raises ImageReadError naming `name` for any other shape
    or value range. uint8 RGB input is returned as is (no copy).
    """
    pixels = np.asarray(pixels)
    if has_channels is None:
        has_channels = pixels.ndim >= 3 and pixels.shape[-1] <= 4
    if has_channels and pixels.ndim >= 3 and 1 <= pixels.shape[-1] <= 4:
        channels = pixels.shape[-1]
    elif not has_channels and pixels.ndim >= 2:
        pixels, channels = pixels[..., None], 1
    else:
        raise ImageReadError(f"{name}: pixel array of shape {pixels.shape} is not an image")
    if channels == 3 and pixels.dtype == np.uint8:
        return pixels
    values, is_uint8 = _unit_scale(pixels, name)
    if channels in (2, 4):
        colour = values[..., : channels - 1]
        alpha = values[..., channels - 1 :]
        if is_uint8:
            colour, alpha = colour / 255.0, alpha / 255.0
        values, is_uint8 = colour * alpha + (1.0 - alpha), False
    if channels in (1, 2):
        values = np.repeat(values, 3, axis=-1)
    if is_uint8:
        return np.ascontiguousarray(values)
    return np.rint(values * 255.0).astype(np.uint8)


def _pil_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        elif mode == "1":
            image = image.convert("L")
        elif mode in ("RGBa", "La"):  # premultiplied alpha
            image = image.convert("RGBA" if mode == "RGBa" else "LA")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB")
        return np.asarray(image)


def _tiff_rgb(path: Path) -> np.ndarray:
    import tifffile

    known = (
        tifffile.PHOTOMETRIC.MINISBLACK,
        tifffile.PHOTOMETRIC.MINISWHITE,
        tifffile.PHOTOMETRIC.RGB,
        tifffile.PHOTOMETRIC.PALETTE,
    )
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if page.photometric not in known:
            return _pil_rgb(path)  # YCbCr, CMYK, …: Pillow converts these
        pixels = page.asarray()
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            colormap = np.asarray(page.colormap)  # [3, 2**bits], 16-bit
            pixels = np.moveaxis(colormap[:, pixels], 0, -1)
        elif page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            pixels = np.iinfo(pixels.dtype).max - pixels if pixels.dtype.kind == "u" else 1.0 - pixels
        elif page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and pixels.ndim == 3:
            pixels = np.moveaxis(pixels, 0, -1)  # [S, H, W] → [H, W, S]
        if pixels.ndim == 3 and pixels.shape[-1] > 4:  # extra samples beyond RGBA: keep the colour
            pixels = pixels[..., :3]
        return pixels


def read_image_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3], whatever its mode (grey, palette, alpha, 16-bit, …).

    TIFFs are read with tifffile (all bits kept), other formats with Pillow. Raises ImageReadError naming the
    file when it is missing, unreadable, truncated or of an unsupported kind.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            pixels = _tiff_rgb(path)
        else:
            pixels = _pil_rgb(path)
    except ImageReadError:
        raise
    except Exception as exc:  # Pillow and tifffile raise OSError, ValueError, SyntaxError, …
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    return as_rgb8(pixels, str(path))
