"""Tile grid → tile table (Parquet) with a QC image; tile pixel reading for packing into the tile store.

A tile is defined physically: `tile_px` pixels at `mpp` µm/px, i.e. a square of tile_px·mpp µm. Its
pixels are read from the coarsest pyramid level at or finer than `mpp` and resized only when that level is
not exactly at `mpp`. Each tile is one read at that level (OpenSlide's tile cache already decodes a TIFF tile
shared by neighbours once); `iter_tile_pixels` spreads the reads over threads, since OpenSlide's decoding
releases the GIL, and yields them in table order.

A tile table is a Parquet file (one row per tile, TABLE_SCHEMA) whose header is a `TileGrid`: the geometry
its tiles share. `write_tile_table` and `read_tile_table` are the only functions that write and read it,
through `histodistill.provenance.write_parquet/read_parquet` like every other Parquet artifact.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw
from skimage import morphology

from histodistill.atomic import atomic_path
from histodistill.errors import NoTissueError, SlideError
from histodistill.provenance import provenance, read_parquet, write_parquet
from histodistill.slides import (
    best_level,
    checked_mpp,
    open_slide,
    read_rgb,
    read_rgb_image,
    read_scaled_many,
)
from histodistill.tissue import MaskConfig, TissueDetection, detect_tissue, tile_fractions

log = logging.getLogger(__name__)

QC_MAX_PX = 1024  # longest side of the QC image (config key tiling.qc_max_px)
TABLE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("tile_id", pa.int64()),
        ("x0", pa.int64()),
        ("y0", pa.int64()),
        ("level", pa.int32()),
        ("read_px", pa.int32()),
        ("mpp", pa.float64()),
        ("tissue_frac", pa.float32()),
    ]
)
READ_CHUNK_TILES = 8  # tiles one reader task reads (neighbours in table order share TIFF tiles and cache)


@dataclass(frozen=True)
class TilingConfig:
    """Every setting that changes the tile table (stored in its metadata and hashed)."""

    mpp: float = 0.5
    tile_px: int = 224
    min_tissue: float = 0.5
    mask_mpp: float = 8.0
    min_object_um2: float = 20000.0
    min_hole_um2: float = 5000.0
    min_saturation: float = 0.05
    min_brightness: float = 0.12
    max_brightness: float = 0.9
    remove_ink: bool = True
    min_od: float = 0.05
    tissue_method: str = "classical"
    tissue_weights: str | None = None
    on_no_tissue: str = "warn"

    @property
    def mask(self) -> MaskConfig:
        """The tissue-mask settings, with min_object_um2 and min_hole_um2 capped at one tile's area (µm²):
        a piece of tissue as large as a tile is never removed (a slide one tile large keeps its tile), and a
        hole as large as a tile is never filled."""
        tile_um2 = (self.tile_px * self.mpp) ** 2
        values = {f.name: getattr(self, f.name) for f in fields(MaskConfig)}
        values["min_object_um2"] = min(self.min_object_um2, tile_um2)
        values["min_hole_um2"] = min(self.min_hole_um2, tile_um2)
        return MaskConfig(**values)


@dataclass(frozen=True)
class TileGrid:
    """The header of a tile table: the geometry all its tiles share (stored in its Parquet metadata).

    - `slide_id`, `slide_path` (absolute): the slide the tiles are cut from;
    - `mpp` (µm/px) and `tile_px` (px): a tile is `tile_px` pixels at `mpp`, a square of `tile_um` µm;
    - `level`, `read_px`: the pyramid level the pixels are read from and the tile side (px) there; tiles are
      resized to `tile_px` when `read_px != tile_px`;
    - `slide_mpp_x`, `slide_mpp_y` (µm per level-0 px) and `mpp_source`: the slide's resolution and where it
      came from (`histodistill.slides.resolve_mpp`);
    - `footprint_px0`: the tile side in level-0 px (tile_px · mpp / slide µm/px; not rounded).
    """

    slide_id: str
    slide_path: str
    mpp: float
    tile_px: int
    level: int
    read_px: int
    slide_mpp_x: float
    slide_mpp_y: float
    mpp_source: str
    footprint_px0: float

    @property
    def tile_um(self) -> float:
        """Side of a tile in µm."""
        return self.tile_px * self.mpp

    def to_metadata(self) -> dict[str, Any]:
        """The grid as top-level keys of a tile table's metadata (plain JSON types)."""
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> TileGrid:
        """The grid stored in a tile table's metadata by `to_metadata`.

        Raises SlideError naming the missing keys for metadata without a grid (e.g. a tile table written by
        an older histodistill: tile the slide again).
        """
        missing = [f.name for f in fields(cls) if f.name not in metadata]
        if missing:
            raise SlideError(
                f"tile table metadata of slide {metadata.get('slide_id', '?')!r} lacks the grid key(s) "
                f"{missing}; tile the slide again with this version of histodistill"
            )
        return cls(**{f.name: metadata[f.name] for f in fields(cls)})

    @classmethod
    def of(cls, grid_or_metadata: TileGrid | Mapping[str, Any]) -> TileGrid:
        """`grid_or_metadata` as a TileGrid: a TileGrid as is, a tile table's metadata through `from_metadata`."""
        if isinstance(grid_or_metadata, TileGrid):
            return grid_or_metadata
        return cls.from_metadata(grid_or_metadata)


class TileTable(NamedTuple):
    """A tile table as `read_tile_table` returns it: unpacks as (frame, metadata); `.grid` is its header."""

    frame: pd.DataFrame  # one row per tile, the columns of TABLE_SCHEMA
    metadata: dict[str, Any]  # provenance (params = the TilingConfig, config_hash, …) and the grid's keys

    @property
    def grid(self) -> TileGrid:
        return TileGrid.from_metadata(self.metadata)


@dataclass
class TilePlan:
    """A slide's tile table before it is written, with what the tissue mask was computed from.

    `thumbnail` (uint8 [h, w, 3]) is the slide at the mask's µm/px and `mask` (bool [h, w]) its tissue;
    `tissue` holds the rejected pixels (pen ink, dark background) too; `qc_image` (uint8, longest side
    ≈ qc_max_px) is the QC image's background when `plan_tiles` was asked for one, read in the same pass.
    """

    table: pd.DataFrame
    grid: TileGrid
    metadata: dict  # everything `write_tile_table` stores: provenance, the grid's keys, slide facts
    thumbnail: np.ndarray
    mask: np.ndarray
    tissue: TissueDetection | None = None
    qc_image: np.ndarray | None = None


def plan_tiles(
    slide_path: str | Path,
    slide_id: str,
    params: TilingConfig,
    slide_mpp: float | None = None,
    qc_max_px: int | None = None,
) -> TilePlan:
    """Compute the tissue mask and the tile grid of one slide, decoding each pyramid level at most once.

    The mask comes from a thumbnail at `mask_mpp` (`histodistill.tissue.detect_tissue`). With `qc_max_px`
    the QC image's background (longest side ≈ qc_max_px) is read in the same pass over the slide
    (`read_scaled_many`): a single-level slide is decoded once, not once for the mask and once for QC.
    Logs a warning for a greyscale slide, and for a slide without tiles with the reason (thinner than a
    tile, no tissue found, or tissue too sparse for `min_tissue`); raises NoTissueError for the latter
    when `on_no_tissue` is `error`, SlideError for a target µm/px finer than the scan.
    """
    name = f"slide '{slide_id}' ({slide_path})"
    with open_slide(slide_path) as slide:
        mpp = checked_mpp(slide, slide_mpp, slide_name=name)
        if params.mpp < mpp.mean * (1 - 0.01):
            raise SlideError(
                f"slide '{slide_id}': target {params.mpp} µm/px is finer than the scan ({mpp.mean:g} µm/px); "
                "tiles would be upsampled. Choose tiling.mpp ≥ the slide's µm/px."
            )
        width0, height0 = slide.dimensions
        level = best_level(slide, mpp.mean, params.mpp)
        downsample = slide.level_downsamples[level]
        footprint0 = params.tile_px * params.mpp / mpp.mean  # tile side in level-0 px
        read_px = round(footprint0 / downsample)
        mask_mpp = max(params.mask_mpp, mpp.mean)
        targets = [mask_mpp]
        if qc_max_px is not None:
            targets.append(max(mpp.mean * max(width0, height0) / qc_max_px, mpp.mean))
        images = read_scaled_many(slide, mpp.mean, targets)
        thumbnail = images[0]
        level_count = slide.level_count
    tissue = detect_tissue(thumbnail, replace(params.mask, mask_mpp=mask_mpp))
    mask = tissue.mask
    if tissue.greyscale:
        log.warning(
            "%s looks greyscale (no colour in the thumbnail): tissue is thresholded on optical density "
            "(%.3f) instead of saturation",
            name,
            tissue.threshold,
        )
    px0 = width0 / thumbnail.shape[1]  # level-0 px per mask px (exact for this thumbnail)

    cols, rows = math.floor(width0 / footprint0), math.floor(height0 / footprint0)
    grid_r, grid_c = np.divmod(np.arange(rows * cols, dtype=np.int64), max(cols, 1))
    x0 = np.round(grid_c * footprint0).astype(np.int64)
    y0 = np.round(grid_r * footprint0).astype(np.int64)
    frac = tile_fractions(mask, x0, y0, footprint0, px0) if rows * cols else np.zeros(0)
    keep = frac >= params.min_tissue if params.min_tissue > 0 else np.ones_like(frac, bool)
    table = pd.DataFrame(
        {
            "slide_id": slide_id,
            "tile_id": (grid_r * cols + grid_c)[keep],
            "x0": x0[keep],
            "y0": y0[keep],
            "level": np.int32(level),
            "read_px": np.int32(read_px),
            "mpp": float(params.mpp),
            "tissue_frac": frac[keep].astype(np.float32),
        }
    )
    if table.empty:
        message = f"{name}: no tiles: " + _no_tile_reason(params, tissue, frac, (width0, height0), footprint0)
        if params.on_no_tissue == "error":
            raise NoTissueError(message + "; set tiling.on_no_tissue: warn to keep an empty table instead")
        log.warning("%s; writing an empty tile table", message)
    grid = TileGrid(
        slide_id=slide_id,
        slide_path=str(Path(slide_path).resolve()),
        mpp=float(params.mpp),
        tile_px=int(params.tile_px),
        level=int(level),
        read_px=int(read_px),
        slide_mpp_x=mpp.x,
        slide_mpp_y=mpp.y,
        mpp_source=mpp.source,
        footprint_px0=footprint0,
    )
    metadata = tile_table_metadata(
        grid,
        asdict(params),
        slide_dimensions=[width0, height0],
        level_count=level_count,
        grid=[rows, cols],
        n_tiles=len(table),
        tissue_found=not table.empty,
        tissue_cue=tissue.cue,
        greyscale=tissue.greyscale,
        ink_fraction=float(tissue.ink.mean()),
        dark_fraction=float(tissue.dark.mean()),
    )
    return TilePlan(table, grid, metadata, thumbnail, mask, tissue, images[1] if qc_max_px else None)


def _no_tile_reason(
    params: TilingConfig, tissue: TissueDetection, frac: np.ndarray, size0: tuple[int, int], footprint0: float
) -> str:
    """Why a slide gave no tile, in words: the first of thinner than a tile, no tissue, too little tissue."""
    width0, height0 = size0
    if frac.size == 0:
        return (
            f"the slide ({width0} x {height0} level-0 px) is smaller than one tile ({footprint0:.0f} px: "
            f"{params.tile_px} px at {params.mpp} µm/px); no tissue check was made"
        )
    rejected = f"{tissue.dark.mean():.1%} dark background, {tissue.ink.mean():.1%} pen ink"
    grey = " (greyscale slide, optical density)" if tissue.greyscale else ""
    if not tissue.mask.any():
        return f"no tissue found in the thumbnail{grey} ({rejected})"
    return (
        f"no tile reaches min_tissue={params.min_tissue} (tissue in {tissue.mask.mean():.1%} of the "
        f"thumbnail{grey}, the fullest tile {frac.max():.1%}; {rejected})"
    )


def tile_table_metadata(tile_grid: TileGrid, params: dict[str, Any], /, **extra: Any) -> dict[str, Any]:
    """A tile table's metadata: the provenance of `params` (hashed), the grid's keys and `extra` facts.

    Raises ValueError when a key of `extra` would overwrite one of the grid's.
    """
    header = tile_grid.to_metadata()
    if clash := sorted(set(header) & set(extra)):
        raise ValueError(f"tile table metadata: {clash} are the grid's keys")
    return provenance(params, **header, **extra)


def write_tile_table(table: pd.DataFrame, metadata: dict[str, Any], out: str | Path) -> None:
    """Write a tile table (Parquet, TABLE_SCHEMA) atomically, with `metadata` (see `tile_table_metadata`).

    Raises SlideError when `metadata` holds no TileGrid (so a table without a header is never written).
    """
    TileGrid.from_metadata(metadata)
    write_parquet(table, out, metadata, schema=TABLE_SCHEMA)


def read_tile_table(path: str | Path) -> TileTable:
    """A tile table: (frame, metadata), and `.grid`, its TileGrid.

    Raises SlideError naming the path when it is not a readable Parquet file with histodistill metadata.
    """
    frame, metadata = read_parquet(path, "tile table", SlideError)
    return TileTable(frame, metadata)


QC_COLORS = {  # overlay colors of the QC image, drawn in its legend
    "tissue outline": (0, 160, 0),
    "kept tile": (30, 60, 220),
    "pen ink (removed)": (0, 200, 200),
    "dark background (removed)": (255, 140, 0),
}
_LEGEND_ROW = 14  # px per legend row


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


def render_qc(plan: TilePlan, out: str | Path, max_px: int = QC_MAX_PX) -> None:
    """QC image (PNG): the slide with its tissue outline, the kept tiles and what the mask rejected.

    Tissue is outlined in green and kept tiles in blue; pen ink and dark background that the mask removed
    are tinted in their own colors (`QC_COLORS`); glass is faded. A legend band is added below the slide
    image (whose longest side is ≈ `max_px`). The slide image is `plan.qc_image`, read in the same pass
    as the mask's thumbnail (`plan_tiles(..., qc_max_px=...)`); a plan without one uses its thumbnail.
    The slide is never read again here.
    """
    md, grid = plan.metadata, plan.grid
    width0, height0 = md["slide_dimensions"]
    image = Image.fromarray(plan.qc_image if plan.qc_image is not None else plan.thumbnail)
    if plan.qc_image is None or max(image.size) > max_px:
        factor = max_px / max(image.size)
        image = image.resize(
            (max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.Resampling.BOX
        )
    size = image.size
    mask = _fit(plan.mask, size)
    outline = mask & ~morphology.erosion(mask, morphology.disk(1))
    pixels = np.asarray(image).copy()
    pixels[~mask] = (0.6 * pixels[~mask] + 0.4 * 255).astype(np.uint8)  # fade what is not tissue
    if plan.tissue is not None:
        for key, removed in (
            ("pen ink (removed)", plan.tissue.ink),
            ("dark background (removed)", plan.tissue.dark),
        ):
            where = _fit(removed, size) & ~mask
            pixels[where] = (0.35 * pixels[where] + 0.65 * np.array(QC_COLORS[key])).astype(np.uint8)
    pixels[outline] = QC_COLORS["tissue outline"]
    legend = 4 + _LEGEND_ROW * (len(QC_COLORS) + 1)
    canvas = Image.new("RGB", (max(size[0], 240), size[1] + legend), (255, 255, 255))
    canvas.paste(Image.fromarray(pixels), (0, 0))
    draw = ImageDraw.Draw(canvas)
    per_px0 = size[0] / width0
    side = grid.footprint_px0 * per_px0
    for x0, y0 in zip(plan.table["x0"], plan.table["y0"], strict=True):
        x, y = x0 * per_px0, y0 * per_px0
        draw.rectangle([x, y, x + side, y + side], outline=QC_COLORS["kept tile"], width=1)
    draw.text(
        (4, size[1] + 2),
        f"{grid.slide_id}: {len(plan.table)} tiles of {grid.tile_px} px at {grid.mpp} um/px; "
        f"slide {grid.slide_mpp_x:.4g} um/px ({grid.mpp_source})"
        + ("; greyscale: optical density" if md.get("greyscale") else ""),
        fill=(0, 0, 0),
    )
    for row, (label, rgb) in enumerate(QC_COLORS.items(), start=1):
        y = size[1] + 2 + row * _LEGEND_ROW
        draw.rectangle([4, y + 1, 14, y + 10], fill=rgb)
        draw.text((20, y), label, fill=(0, 0, 0))
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")


def tile_slide(
    slide_path: str | Path,
    slide_id: str,
    out: str | Path,
    params: TilingConfig,
    slide_mpp: float | None = None,
    qc: str | Path | None = None,
    qc_max_px: int = QC_MAX_PX,
) -> pd.DataFrame:
    """Plan the tiles of one slide and write the tile table (and the QC image)."""
    plan = plan_tiles(
        slide_path, slide_id, params, slide_mpp, qc_max_px=qc_max_px if qc is not None else None
    )
    if qc is not None:
        render_qc(plan, qc, qc_max_px)
    write_tile_table(plan.table, plan.metadata, out)
    return plan.table


def tile_pixels(slide, x0: int, y0: int, level: int, read_px: int, tile_px: int) -> np.ndarray:
    """One tile: uint8 [tile_px, tile_px, 3] from a `read_px`-px square at `level` whose top-left corner is
    (x0, y0) level-0 px, resized (PIL bilinear) only when `read_px != tile_px`. One decode and one copy
    (`histodistill.slides.read_rgb`) when no resize is needed; with a resize, the decoded buffer goes to
    PIL in one copy (`read_rgb_image`) and the resized tile to an array in one more.
    """
    if read_px == tile_px:
        return read_rgb(slide, x0, y0, level, read_px, read_px)
    region = read_rgb_image(slide, x0, y0, level, read_px, read_px)
    return np.asarray(region.resize((tile_px, tile_px), Image.Resampling.BILINEAR))


def iter_tile_pixels(
    slide, table: pd.DataFrame, grid: TileGrid | Mapping[str, Any], workers: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row position in `table`, uint8 [tile_px, tile_px, 3]) for every tile, in table order.

    `grid` is the table's TileGrid (or the metadata it is stored in). Each tile is one read of `read_px` px
    at the grid's level (`tile_pixels`), resized to tile_px only if the level is not exactly at the target
    µm/px. `workers` > 1 reads with that many threads sharing `slide` (OpenSlide handles are thread-safe
    and its decoding, like PIL's resize, releases the GIL): tasks of READ_CHUNK_TILES consecutive tiles, at
    most 2 × workers of them in flight, so memory stays bounded whatever the table's size. The pixels are
    the same for every `workers` (tests/unit/test_tiling.py).

    Raises ValueError for `workers` < 1 and SlideError for an unreadable region.
    """
    if workers < 1:
        raise ValueError(f"iter_tile_pixels: workers must be ≥ 1, got {workers}")
    if table.empty:
        return
    grid = TileGrid.of(grid)
    tile_px, level, read_px = grid.tile_px, grid.level, grid.read_px
    x0s, y0s = table["x0"].to_numpy(np.int64), table["y0"].to_numpy(np.int64)
    if workers == 1:
        for i in range(len(table)):
            yield i, tile_pixels(slide, int(x0s[i]), int(y0s[i]), level, read_px, tile_px)
        return

    def read_chunk(start: int) -> list[np.ndarray]:
        stop = min(start + READ_CHUNK_TILES, len(table))
        return [
            tile_pixels(slide, int(x0s[i]), int(y0s[i]), level, read_px, tile_px) for i in range(start, stop)
        ]

    starts = iter(range(0, len(table), READ_CHUNK_TILES))
    pending: deque[tuple[int, Future]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tile-reader")
    try:
        for start in starts:
            pending.append((start, pool.submit(read_chunk, start)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            start, future = pending.popleft()
            tiles = future.result()
            if (nxt := next(starts, None)) is not None:
                pending.append((nxt, pool.submit(read_chunk, nxt)))
            for k, tile in enumerate(tiles):
                yield start + k, tile
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_tile(slide, row: pd.Series, tile_px: int) -> np.ndarray:
    """One tile on its own (the per-item path used by a DataLoader over slides): `tile_pixels` of a row."""
    read_px = int(row["read_px"])
    return tile_pixels(slide, int(row["x0"]), int(row["y0"]), int(row["level"]), read_px, tile_px)
