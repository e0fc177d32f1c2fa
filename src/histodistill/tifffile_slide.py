"""OME-TIFF and other TIFFs OpenSlide cannot read, through tifffile, with the part of OpenSlide's API we use.

OpenSlide (4.0) reads a TIFF only as "generic-tiff" and only when it is tiled: it refuses a stripped TIFF,
and in a tiled OME-TIFF it sees level 0 alone (OME pyramids live in SubIFDs, which it does not follow) and
none of the OME-XML. tifffile reads both kinds, with their SubIFD pyramids, any photometric, 16-bit and
grey pixels. `histodistill.slides.open_slide` therefore opens `*.ome.tif(f)` and every TIFF that OpenSlide
refuses as a `TiffFileSlide`: the attributes and methods of `openslide.OpenSlide` that histodistill calls
(`properties`, `dimensions`, `level_count`, `level_dimensions`, `level_downsamples`, `read_region`,
`close`, context manager), with pixels converted by `histodistill.images.as_rgb8` (16-bit scaled, grey
expanded, alpha composited on white). Regions are read lazily through tifffile's Zarr store, so a region
costs the tiles or strips it touches, never the whole level.

`properties` holds `tiff.ImageDescription` (the OME-XML, which `slides.resolve_mpp` parses for
`PhysicalSizeX/Y` and its unit), `tiff.XResolution/YResolution/ResolutionUnit` as OpenSlide names them,
and `openslide.vendor` = "tifffile".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import zarr

from histodistill.errors import SlideError
from histodistill.images import ImageReadError, as_rgb8

_UNITS = {1: "none", 2: "inch", 3: "centimeter"}  # TIFF ResolutionUnit → OpenSlide's tiff.ResolutionUnit


def _rational(tag) -> str | None:
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple) and len(value) == 2 and value[1]:
        return repr(value[0] / value[1])
    return repr(float(value))


class TiffFileSlide:
    """One TIFF (its first image series and the series' pyramid levels) read with tifffile.

    Raises SlideError naming the file when it is not a TIFF, or its first series is not a 2-D image
    (axes Y, X and at most one channel axis of 1–4 samples; other axes must have length 1).
    """

    def __init__(self, path: str | Path):
        self._filename = str(path)
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as exc:
            raise SlideError(f"not a TIFF tifffile can read: {path} ({exc})") from exc
        try:
            series = self._tif.series[0]
            self._index, self._channels_last = self._layout(series.axes, series.shape)
            self._levels = [
                zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))
            ]
            first = self._tif.pages.first
            self.properties = {"openslide.vendor": "tifffile"}
            if first.description:
                self.properties["tiff.ImageDescription"] = first.description
            unit = first.tags.get("ResolutionUnit")
            for key, tag in (("tiff.XResolution", "XResolution"), ("tiff.YResolution", "YResolution")):
                if (value := _rational(first.tags.get(tag))) is not None:
                    self.properties[key] = value
            if unit is not None:
                self.properties["tiff.ResolutionUnit"] = _UNITS.get(int(unit.value), "none")
        except SlideError:
            self._tif.close()
            raise
        except Exception as exc:  # tifffile's errors on a broken file vary (IndexError, ValueError, …)
            self._tif.close()
            raise SlideError(
                f"TIFF {path} has no image tifffile can read ({type(exc).__name__}: {exc})"
            ) from exc
        dims = [self._size(level.shape) for level in self._levels]
        self.level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in dims)  # as OpenSlide computes them

    def _layout(self, axes: str, shape: tuple[int, ...]) -> tuple[tuple, bool]:
        """Index that drops singleton axes, and whether a channel axis remains (moved last by `_read`)."""
        if "Y" not in axes or "X" not in axes:
            raise SlideError(f"{self._filename}: TIFF series has axes {axes!r}, no Y and X")
        index, kept = [], []
        for axis, size in zip(axes, shape, strict=True):
            if axis in "YX":
                index.append(slice(None))
                kept.append(axis)
            elif axis in "SC" and size in (2, 3, 4) and not any(a in "SC" for a in kept):
                index.append(slice(None))
                kept.append("C")
            elif size == 1:
                index.append(0)
            else:
                raise SlideError(
                    f"{self._filename}: TIFF series has axes {axes!r} of shape {shape}; histodistill reads 2-D "
                    "brightfield images (Y, X and at most one colour axis of ≤ 4 samples)"
                )
        self._kept = "".join(kept)
        return tuple(index), "C" in kept

    def _size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        dims = [s for s, i in zip(shape, self._index, strict=True) if isinstance(i, slice)]
        return dims[self._kept.index("X")], dims[self._kept.index("Y")]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._levels)

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        index = list(self._index)
        slot = [k for k, i in enumerate(index) if isinstance(i, slice)]
        for k, axis in zip(slot, self._kept, strict=True):
            if axis == "Y":
                index[k] = slice(y0, y1)
            elif axis == "X":
                index[k] = slice(x0, x1)
        pixels = np.asarray(self._levels[level][tuple(index)])
        order = [self._kept.index(a) for a in "YX"] + ([self._kept.index("C")] if self._channels_last else [])
        pixels = np.transpose(pixels, order)
        try:
            return as_rgb8(pixels, self._filename, has_channels=self._channels_last)
        except ImageReadError as exc:
            raise SlideError(str(exc)) from exc

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 RGBA [h, w, 4] of `size` (w, h) at `level`, top-left `location` in level-0 px.

        As OpenSlide: pixels outside the image are transparent (alpha 0), the rest opaque.
        """
        (x, y), (w, h) = location, size
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self._filename}: no pyramid level {level} (levels 0–{self.level_count - 1})")
        ds = self.level_downsamples[level]
        lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
        lw, lh = self.level_dimensions[level]
        out = np.zeros((h, w, 4), np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x1 > x0 and y1 > y0:
            try:
                rgb = self._read(level, x0, y0, x1, y1)
            except SlideError:
                raise
            except Exception as exc:  # codec errors of any library (zlib.error, …), truncated data
                raise SlideError(
                    f"corrupt slide {self._filename}: cannot read {w}x{h} px at ({x}, {y}) level {level} ({exc})"
                ) from exc
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx, :3] = rgb
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx, 3] = 255
        return out

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> TiffFileSlide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
