"""The mask store: per-pixel label masks of slides, read tile by tile in the tile store's coordinates.

Layout: one *mask slide* per slide id, `masks/{cohort}/{slide_id}.tiff` (under the results directory): a
tiled pyramidal one-channel uint8 TIFF whose level 0 has exactly the slide's level-0 pixel grid (same width,
height and µm/px) and whose levels have the slide's level sizes, lower levels made by a mode or nearest
reduction (never an average of labels). Pixel values are class indices; what each means is the dataset's
(the demo's: `histodistill.demo.masks.DEMO_MASK_CLASSES`; 0 is always background).

A tile-table row (`x0`, `y0` in level-0 px, `level`, `read_px`; `histodistill.tiling.TileGrid`) reads its
labels with `read_mask_tile(mask_path, x0, y0, read_px, level)`, the same region `tiling.tile_pixels` reads of
the slide (OpenSlide's `read_region` convention: the level's top-left pixel is ⌊x0 / downsample⌋, the
downsample OpenSlide derives from the level sizes). `MaskSlide.tile` resizes to the tile size by nearest
neighbour where the RGB tile is resized (bilinear) from `read_px`. Pixels outside the mask read as 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import zarr
from PIL import Image

from histodistill.errors import SlideError


class MaskSlide:
    """One mask slide (module docstring), open for reading regions; a context manager.

    Raises SlideError naming the file when it is not a TIFF or not a one-channel uint8 image.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as exc:
            raise SlideError(f"mask slide {path}: not a TIFF tifffile can read ({exc})") from exc
        series = self._tif.series[0]
        if series.dtype != np.uint8 or len(series.shape) != 2:
            self._tif.close()
            raise SlideError(
                f"mask slide {path}: a mask is one-channel uint8 [H, W], not {series.dtype} {series.shape}; "
                "write it with histodistill.demo.masks.make_demo_mask_slide or the same layout"
            )
        self._levels = [zarr.open_array(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        self.level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)  # OpenSlide's

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in px."""
        return self.level_dimensions[0]

    def read(self, x: int, y: int, size: int, level: int = 0) -> np.ndarray:
        """uint8 labels [size, size]: the `size`-px square at `level` whose top-left corner is (x, y) level-0
        px; 0 outside the mask. Raises SlideError for a level the mask does not have."""
        if not 0 <= level < len(self._levels):
            raise SlideError(f"mask slide {self.path}: no level {level} (levels 0–{len(self._levels) - 1})")
        ds = self.level_downsamples[level]
        lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
        lw, lh = self.level_dimensions[level]
        out = np.zeros((size, size), np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + size, lw), min(ly + size, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._levels[level][y0:y1, x0:x1]
        return out

    def tile(self, row: pd.Series | dict, tile_px: int) -> np.ndarray:
        """uint8 labels [tile_px, tile_px] of one tile-table row (x0, y0, level, read_px): `read`, resized by
        nearest neighbour when `read_px != tile_px` (as `tiling.tile_pixels` resizes the RGB)."""
        read_px = int(row["read_px"])
        labels = self.read(int(row["x0"]), int(row["y0"]), read_px, int(row["level"]))
        if read_px == tile_px:
            return labels
        return np.asarray(Image.fromarray(labels).resize((tile_px, tile_px), Image.Resampling.NEAREST))

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> MaskSlide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_mask_tile(mask_path: str | Path, x: int, y: int, size: int, level: int = 0) -> np.ndarray:
    """uint8 labels [size, size] of the mask slide at `mask_path`: the square the tile row (x0=x, y0=y,
    level, read_px=size) covers (`MaskSlide.read`). Opens and closes the file; use `MaskSlide` for many."""
    with MaskSlide(mask_path) as mask:
        return mask.read(x, y, size, level)


def mask_path(masks_dir: str | Path, cohort: str, slide_id: str) -> Path:
    """Where the mask store keeps a slide's mask slide: `{masks_dir}/{cohort}/{slide_id}.tiff`."""
    return Path(masks_dir) / cohort / f"{slide_id}.tiff"
