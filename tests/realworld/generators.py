"""Small synthetic slides that reproduce real-world tissue-detection faults (issue 13), one per fault kind.

Every generator writes a real slide file that OpenSlide opens (a tiled TIFF, deflate-compressed, with its
µm/px in the resolution tags; pyramidal when large enough) and returns its ground truth. Tissue is laid
out on the tile grid of `GRID` (224 px tiles at `SLIDE_MPP`, tiling at the same µm/px): whole grid cells
are tissue, so the right tile set is known exactly, not estimated.

- `pen_ink_slide`: tissue next to blue, green, red and black marker strokes on the glass (fault 1);
- `dark_background_slide`: tissue on a near-black tinted background RGB ≈ (6, 4, 12) with JPEG noise (2);
- `grey_slide`: the tissue slide in 8-bit or 16-bit greyscale (single channel) (3);
- `one_tile_slide`, `strip_slide`: a slide exactly one tile large, full of tissue; strips 1–10 px high (5).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from histodistill.demo.slides import EOSIN, HEMATOXYLIN
from histodistill.tiling import TilingConfig

SLIDE_MPP = 2.0  # µm/px of level 0: a 5 mm slide stays small (2,688 px), pen strokes are 0.3–0.6 mm wide
TILE_PX = 224
GRID = TilingConfig(mpp=SLIDE_MPP, tile_px=TILE_PX, min_tissue=0.5)  # one tile = 224 level-0 px
GLASS = 242.0
INK_RGB = {  # marker ink on glass as a scanner renders it
    "blue": (55, 85, 175),
    "green": (40, 140, 95),
    "red": (200, 30, 32),
    "black": (36, 36, 42),
}


@dataclass(frozen=True)
class Truth:
    """A generated slide and what it holds: `tissue_cells` (row, col) of the 224-px grid that are tissue;
    `ink` and `dark` bool [H, W] level-0 masks of pen ink and dark background (None when absent)."""

    path: Path
    tissue_cells: frozenset[tuple[int, int]]
    ink: np.ndarray | None = None
    dark: np.ndarray | None = None


def write_slide(
    pixels: np.ndarray, path: Path, mpp: float = SLIDE_MPP, tile: int = 256, levels: int = 8
) -> Path:
    """Write uint8/uint16 [H, W] (grey) or [H, W, 3] (RGB) as a tiled TIFF with up to `levels` 2× pyramid
    levels down to 64 px and the µm/px in the resolution tags (px per cm), as OpenSlide's generic-TIFF
    reader expects."""
    photometric = "minisblack" if pixels.ndim == 2 else "rgb"
    with tifffile.TiffWriter(path) as tif:
        level, i = pixels, 0
        while i == 0 or (min(level.shape[:2]) >= 64 and i < levels):
            res = 1e4 / (mpp * 2**i)
            tif.write(
                level,
                tile=(tile, tile),
                photometric=photometric,
                compression="zlib",
                compressionargs={"level": 1},
                subfiletype=1 if i else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            i += 1
            level = level[: level.shape[0] // 2 * 2, : level.shape[1] // 2 * 2]
            level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, *level.shape[2:])
            level = level.mean(axis=(1, 3), dtype=np.float32).round().astype(pixels.dtype)
    return path


def he_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """H&E-like tissue (uint8 [h, w, 3]) by Beer–Lambert: eosin stroma with haematoxylin nuclei."""
    coarse = rng.random((max(h // 24, 2), max(w // 24, 2))).astype(np.float32)
    field = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    )
    eosin = 0.25 + 0.25 * field.astype(np.float32) / 255
    nuclei = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(nuclei)
    for x, y in rng.uniform(0, 1, (h * w // 150, 2)) * (w, h):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=255)
    hema = 0.08 + 0.9 * np.asarray(nuclei.filter(ImageFilter.GaussianBlur(0.8)), np.float32) / 255
    density = hema[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
    rgb = GLASS * np.exp(-2.3 * density) + rng.normal(0, 2.5, (h, w, 1)).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _tissue_layout(rows: int, cols: int, cells: list[tuple[int, int, int, int]], seed: int):
    """Glass [rows·224, cols·224, 3] with H&E tissue on the grid cells of `cells` (r0, r1, c0, c1)."""
    rng = np.random.default_rng(seed)
    h, w = rows * TILE_PX, cols * TILE_PX
    rgb = (
        np.clip(GLASS + rng.normal(0, 2.5, (h, w, 1)).astype(np.float32), 0, 255)
        .astype(np.uint8)
        .repeat(3, 2)
    )
    tissue = set()
    for r0, r1, c0, c1 in cells:
        rgb[r0 * TILE_PX : r1 * TILE_PX, c0 * TILE_PX : c1 * TILE_PX] = he_texture(
            (r1 - r0) * TILE_PX, (c1 - c0) * TILE_PX, rng
        )
        tissue |= {(r, c) for r in range(r0, r1) for c in range(c0, c1)}
    return rgb, frozenset(tissue), rng


def _jpeg(rgb: np.ndarray, quality: int = 70) -> np.ndarray:
    """`rgb` after a JPEG round trip: the 8×8 block noise of a JPEG-compressed scan."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def pen_ink_slide(path: Path, seed: int = 0) -> Truth:
    """Fault 1: 10 × 12 tiles; tissue on cells rows 3–7 × cols 4–8; on the glass around it, wide strokes
    of blue, green, red and black marker, each at least one tile away from the tissue."""
    rgb, tissue, rng = _tissue_layout(10, 12, [(3, 7, 4, 8)], seed)
    h, w = rgb.shape[:2]
    ink_img = Image.new("L", (w, h), 0)
    canvas = Image.fromarray(rgb)
    draw, ink_draw = ImageDraw.Draw(canvas), ImageDraw.Draw(ink_img)
    t = TILE_PX
    strokes = {  # (points in tile units, width in px): a circle around the tissue, a line, a scribble
        "blue": ([(0.3, 0.4), (2.6, 0.5), (2.8, 2.4), (1.0, 9.6)], 220),
        "green": ([(9.5, 0.3), (11.6, 1.5), (11.7, 5.0)], 180),
        "red": ([(10.0, 8.6), (11.7, 9.7)], 150),
        "black": ([(4.0, 8.7), (8.2, 9.5), (3.5, 9.7)], 200),
    }
    for name, (points, width) in strokes.items():
        xy = [(x * t, y * t) for x, y in points]
        draw.line(xy, fill=INK_RGB[name], width=width, joint="curve")
        ink_draw.line(xy, fill=255, width=width, joint="curve")
    pixels = np.asarray(canvas).astype(np.float32) + rng.normal(0, 3.0, (h, w, 1)).astype(np.float32)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    ink = np.asarray(ink_img) > 0
    assert not any(ink[r * t : (r + 1) * t, c * t : (c + 1) * t].any() for r, c in tissue)
    write_slide(pixels, path)
    return Truth(path, tissue, ink=ink)


def dark_background_slide(path: Path, seed: int = 1) -> Truth:
    """Fault 2: 8 × 10 tiles of near-black tinted background RGB ≈ (6, 4, 12) with sensor and JPEG noise
    (quality 70), and tissue on rows 2–5 × cols 3–7 surrounded by a band of glass one tile wide."""
    rng = np.random.default_rng(seed)
    rows, cols = 8, 10
    h, w = rows * TILE_PX, cols * TILE_PX
    dark = np.ones((h, w), bool)
    dark[1 * TILE_PX : 7 * TILE_PX, 2 * TILE_PX : 9 * TILE_PX] = False  # the glass (cover slip) region
    base = np.where(dark[..., None], np.array([6.0, 4.0, 12.0]), GLASS) + rng.normal(0, 2.0, (h, w, 1))
    rgb = np.clip(base, 0, 255).astype(np.uint8)
    rgb[2 * TILE_PX : 6 * TILE_PX, 3 * TILE_PX : 8 * TILE_PX] = he_texture(4 * TILE_PX, 5 * TILE_PX, rng)
    tissue = frozenset((r, c) for r in range(2, 6) for c in range(3, 8))
    write_slide(_jpeg(rgb), path)
    return Truth(path, tissue, dark=dark)


def grey_slide(path: Path, bits: int, seed: int = 2) -> Truth:
    """Fault 3: 8 × 10 tiles, tissue on rows 2–5 × cols 2–6 and 6–7 × 7–9, as a single-channel greyscale
    image (luminance of H&E, glass ≈ 242) of 8 or 16 bits (16-bit uses the full range: value · 257)."""
    rgb, tissue, _ = _tissue_layout(8, 10, [(2, 6, 2, 7), (6, 8, 7, 10)], seed)
    grey = np.clip(rgb.astype(np.float32) @ np.array([0.2126, 0.7152, 0.0722], np.float32), 0, 255)
    pixels = grey.round().astype(np.uint8) if bits == 8 else (grey.round() * 257).astype(np.uint16)
    # TIFF tiles of 112 px divide every level written (2240 × 1792 down to 560 × 448): OpenSlide 4.0.1
    # (libtiff's RGBA path) decodes the partial edge tiles of a 16-bit grey TIFF wrongly (zeros and
    # shifted rows), a slide-reading fault outside tissue detection.
    write_slide(pixels, path, tile=112, levels=3)
    return Truth(path, tissue)


def one_tile_slide(path: Path, mpp: float = 0.5, tile_px: int = 224, seed: int = 3) -> Truth:
    """Fault 5: a slide exactly one tile large (tile_px px at `mpp`, tiling at the same µm/px), all tissue."""
    rng = np.random.default_rng(seed)
    write_slide(he_texture(tile_px, tile_px, rng), path, mpp=mpp)
    return Truth(path, frozenset({(0, 0)}))


def strip_slide(path: Path, height: int, width: int = 3000, seed: int = 4) -> tuple[Path, np.ndarray]:
    """Fault 5: a strip `height` px high (1–10) of uniform pink tissue colour at 0.5 µm/px; returns the
    path and the strip's mean colour (float [3]), which every thumbnail pixel must show."""
    rng = np.random.default_rng(seed)
    rgb = np.clip(np.array([205.0, 125.0, 170.0]) + rng.normal(0, 2.0, (height, width, 3)), 0, 255)
    rgb = rgb.astype(np.uint8)
    write_slide(rgb, path, mpp=0.5)
    return path, rgb.reshape(-1, 3).mean(0)
