"""Deterministic synthetic H&E-like whole-slide images for the demo and the tests.

Tissue is rendered in optical-density space (Beer–Lambert) from two stain concentration maps, so colours
behave like real H&E: haematoxylin on nuclei, eosin on a fibrous stroma, fat as empty holes, glass as a
bright grey background. The result is a tiled, pyramidal, deflate-compressed TIFF with its µm/px in the
TIFF resolution tags, which OpenSlide opens as a generic TIFF.

Streaming (histodistill issue 19): a slide is rendered in bands of BAND_ROWS level-0 rows and written tile
row by tile row (`make_demo_slide`, `write_pyramid_bands`), so memory is a few tile rows of the slide's
width whatever its size (12,288 × 9,216 px: 4 min 10 s and 9.7 GiB with whole levels in memory before).
This changed the pixels a seed gives (deliberately; the same seed still gives the same bytes): the
whole-level renderer drew every random number from one stream in whole-image order (per-pixel noise first,
then nuclei positions over the whole slide) and used whole-image operations (a normalization by the
upsampled fields' range, a rotation of the whole fibre image, Gaussian blurs), none of which a band can
reproduce without rendering everything above it. Now each draw is tied to where it lands (sensor noise per
band, nuclei per 512 px cell, fat holes per lattice row, fibres by a hash of their lattice point), the
low-frequency fields are evaluated separably, and blurs get a margin. The tissue model is the same
(envelope, fields, thresholds, sizes and densities); the demo teacher trains on `render_tissue_maps`, which
concatenates the same bands, so it sees exactly what the demo slides hold.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from histodistill.atomic import atomic_path
from histodistill.ids import check_id, inside

# Stain optical-density vectors (Ruifrok & Johnston), normalised.
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], np.float32)
EOSIN = np.array([0.092, 0.954, 0.283], np.float32)
BACKGROUND_RGB = 242.0


@dataclass(frozen=True)
class DemoSlideConfig:
    width_px: int = 4096
    height_px: int = 3072
    mpp: float | None = 0.25  # None writes no physical resolution (a slide "without MPP")
    levels: int = 4
    tile: int = 256
    blank: bool = False  # glass only: no tissue at all


@dataclass(frozen=True)
class SiteRanges:
    """Ranges a random staining and scanner ("a site") are drawn from, uniformly: factors on the
    haematoxylin / eosin amounts, ± degrees of stain-vector hue, ± colour gain per channel, gamma, blur
    (µm, Gaussian σ) and JPEG quality. One home of the demo's ranges: the demo teacher's training renderings
    (`DemoTeacherConfig`, whose defaults are these), the latent tasks' crops and the multi-site demo slides
    (`draw_site`) all draw from them, so they cover the PLISM and mitosis demo domains alike."""

    hema: tuple[float, float] = (0.7, 1.4)
    eosin: tuple[float, float] = (0.7, 1.4)
    hue_deg: float = 10.0
    gain: float = 0.04
    gamma: tuple[float, float] = (0.85, 1.25)
    blur_um: tuple[float, float] = (0.0, 0.4)
    jpeg: tuple[int, int] = (70, 95)


SITE_RANGES = SiteRanges()


def random_staining(rng: np.random.Generator, r) -> dict:
    """A staining for `restain` drawn from `r` (a `SiteRanges` or anything with its fields): hema, eosin,
    hue_deg, in that draw order (the demo teacher's crops depend on it)."""
    return {
        "hema": rng.uniform(*r.hema),
        "eosin": rng.uniform(*r.eosin),
        "hue_deg": rng.uniform(-1, 1) * r.hue_deg,
    }


def random_scanner(rng: np.random.Generator, r, mpp: float) -> dict:
    """A scanner for `scan` at `mpp` µm/px drawn from `r`: gain (3 channels), gamma, blur_um, jpeg, in that
    draw order (the demo teacher's crops depend on it)."""
    return {
        "mpp": mpp,
        "gain": tuple(1 + rng.uniform(-r.gain, r.gain, 3)),
        "gamma": rng.uniform(*r.gamma),
        "blur_um": rng.uniform(*r.blur_um),
        "jpeg": int(rng.integers(r.jpeg[0], r.jpeg[1] + 1)),
    }


def draw_site(seed: int, mpp: float, ranges: SiteRanges = SITE_RANGES) -> tuple[dict, dict]:
    """(staining, scanner) of a multi-site demo slide of generator seed `seed` (`seed_for(slide_id, seed)`)
    scanned at `mpp` µm/px: drawn from `ranges` with the stream `[seed, 3]`, which no tissue draw of the
    generator uses (streams `seed`, `[seed, 0..2, ...]`), so the tissue of a seed is the same with or
    without a site, and the site is reproducible from the seed alone."""
    rng = np.random.default_rng([seed, 3])
    return random_staining(rng, ranges), random_scanner(rng, ranges, mpp)


def seed_for(name: str, base_seed: int = 0) -> int:
    """A stable per-slide seed from the global seed and the slide id."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{name}".encode()).digest()[:8], "little")


def ellipse(cx: float, cy: float, a: float, b: float, angle: float, n: int = 14) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = np.cos(angle), np.sin(angle)
    x, y = a * np.cos(t), b * np.sin(t)
    return list(zip(cx + ca * x - sa * y, cy + sa * x + ca * y, strict=True))


@dataclass(frozen=True)
class TissueMaps:
    """The latent maps a demo slide is rendered from (level 0, all [H, W]; see `render_tissue_maps`).

    `tissue`, `fat`: bool masks (fat = adipocyte holes inside tissue); `cellularity`: the smooth field in
    [0, 1] that sets nuclear density; `nuclei`: nuclear mask in [0, 1] (blurred edges); `hema`, `eosin`:
    stain concentrations (optical density per unit stain vector, before any re-staining); `noise`: the
    sensor noise added to the RGB (grey levels, [H, W, 1]).
    """

    tissue: np.ndarray
    fat: np.ndarray
    cellularity: np.ndarray
    nuclei: np.ndarray
    hema: np.ndarray
    eosin: np.ndarray
    noise: np.ndarray

    @property
    def body(self) -> np.ndarray:
        """Tissue that is not fat: where nuclei and stroma are."""
        return self.tissue & ~self.fat


BAND_ROWS = (
    128  # level-0 rows rendered at a time: fixed, so a slide's pixels never depend on how it is written
)
_NUCLEUS_CELL = 512  # nuclei are drawn per cell of this many level-0 px (each cell its own random stream)
_NUCLEUS_MARGIN = 16  # px rendered above and below a band so the nuclei's blur is seamless
_MASK64 = np.uint64(2**64 - 1)


def _keys_weights(out_size: int, in_size: int, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic (Keys, a = -0.5, as PIL's BICUBIC) taps for output pixels `coords` of an `in_size` → `out_size`
    upscaling with PIL's pixel-centre convention: (indices [n, 4] clamped to the input, weights float32 [n, 4])."""
    src = (coords.astype(np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    d = np.stack([1 + t, t, 1 - t, 2 - t], axis=1)  # distance of each of the 4 taps
    a = -0.5
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    weights = np.where(d <= 1, near, far)
    weights /= weights.sum(1, keepdims=True)
    index = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return index, weights.astype(np.float32)


class _SmoothField:
    """Low-frequency noise in ≈[0, 1] over a slide: a small random grid, blurred, bicubic-upsampled to the
    slide (`cells` grid points over the slide, like PIL's resize), normalized by its range (sampled on 257 rows).

    Evaluated separably: the grid is interpolated along x once for the whole slide width, then any rows
    (`rows`) or points (`at`) along y, with the same float32 operations in the same order for a pixel
    whichever band or point set asks for it, so a band and a point lookup agree bit for bit.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int], blur: float):
        small = Image.fromarray((rng.random(cells) * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(blur)
        )
        grid = np.asarray(small, np.float32) / 255.0
        self.height, width = shape
        index, weights = _keys_weights(width, grid.shape[1], np.arange(width))
        self.along_x = sum(weights[:, k] * grid[:, index[:, k]] for k in range(4))  # [cells_y, W]
        probe = self._raw(np.linspace(0, self.height - 1, min(self.height, 257)).round().astype(np.int64))
        self.lo, self.span = float(probe.min()), max(float(probe.max() - probe.min()), 1e-6)

    def _raw(self, ys: np.ndarray, xs: np.ndarray | None = None) -> np.ndarray:
        index, weights = _keys_weights(self.height, self.along_x.shape[0], ys)
        cols = self.along_x if xs is None else self.along_x[:, xs]
        if xs is None:
            return sum(weights[:, k, None] * cols[index[:, k]] for k in range(4))
        return sum(weights[:, k] * cols[index[:, k], np.arange(len(xs))] for k in range(4))

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """float32 [y1 - y0, W]."""
        return (self._raw(np.arange(y0, y1)) - np.float32(self.lo)) / np.float32(self.span)

    def at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """float32 [n] at integer pixels (ys, xs); equal to `rows(...)` there."""
        return (self._raw(ys, xs) - np.float32(self.lo)) / np.float32(self.span)


def _hash_u8(seed: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A uint8 per integer lattice point (i, j): splitmix64 of (seed, i, j), independent of any range asked."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & (2**64 - 1)) ^ (i.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = z ^ (j.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = (z ^ (z >> np.uint64(31))) & _MASK64
    return (z >> np.uint64(56)).astype(np.uint8)


class _TissueModel:
    """Everything slide-wide about a demo slide's tissue, small: the low-frequency fields, the fibre angle,
    and the nuclei and fat holes (made per cell / lattice row from their own seeded streams, on demand)."""

    def __init__(self, spec: DemoSlideConfig, seed: int):
        self.seed, self.h, self.w = seed, spec.height_px, spec.width_px
        self.um = 1.0 / (spec.mpp or 0.25)  # px per µm
        rng = np.random.default_rng(seed)
        shape = (self.h, self.w)
        self.shape = _SmoothField(rng, shape, (6, 9), blur=0.8)
        self.cellularity = _SmoothField(rng, shape, (8, 12), blur=1.0)
        self.fat_region = _SmoothField(rng, shape, (5, 7), blur=0.8)
        self.fibre_angle = np.deg2rad(rng.uniform(-40, 40))
        self.fat_step = int(55 * self.um)
        self.fat_rows, self.fat_cols = (self.h - 1) // self.fat_step + 1, (self.w - 1) // self.fat_step + 1
        self._fat: dict[int, tuple[np.ndarray, ...]] = {}
        self._nuclei: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}

    def fat_row(self, ly: int) -> tuple[np.ndarray, ...]:
        """The fat holes of lattice row `ly` (one per lattice column): centre x, y, semi-axes a, b (px),
        angle, and whether the hole is there (the fat field > 0.62 at the lattice point)."""
        if ly not in self._fat:
            step, lx = self.fat_step, np.arange(self.fat_cols)
            rng = np.random.default_rng([self.seed, 2, ly])
            r = rng.uniform(17, 27, len(lx)) * self.um
            jitter = rng.uniform(-7, 7, (len(lx), 2)) * self.um
            ratio, angle = rng.uniform(0.8, 1.0, len(lx)), rng.uniform(0, np.pi, len(lx))
            present = self.fat_region.at(np.full(len(lx), ly * step), lx * step) > 0.62
            self._fat[ly] = (lx * step + jitter[:, 0], ly * step + jitter[:, 1], r, r * ratio, angle, present)
        return self._fat[ly]

    def in_fat_hole(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """bool [n]: whether points fall inside a fat hole (the ellipse its 14-gon approximates)."""
        out = np.zeros(len(ys), bool)
        ly0, lx0 = (
            np.round(ys / self.fat_step).astype(np.int64),
            np.round(xs / self.fat_step).astype(np.int64),
        )
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ly, lx = ly0 + dy, lx0 + dx
                valid = (ly >= 0) & (ly < self.fat_rows) & (lx >= 0) & (lx < self.fat_cols)
                for row in np.unique(ly[valid]):
                    sel = np.flatnonzero(valid & (ly == row))
                    cx, cy, a, b, angle, present = (v[lx[sel]] for v in self.fat_row(int(row)))
                    ddx, ddy = xs[sel] - cx, ys[sel] - cy
                    u = np.cos(angle) * ddx + np.sin(angle) * ddy
                    v = -np.sin(angle) * ddx + np.cos(angle) * ddy
                    out[sel] |= present & ((u / a) ** 2 + (v / b) ** 2 < 1)
        return out

    def envelope(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """An elliptical envelope (positive inside), so the glass shows around the tissue; broadcasts."""
        h, w = np.float32(self.h), np.float32(self.w)
        dx = (xs.astype(np.float32) - w / 2) / (np.float32(0.48) * w)
        dy = (ys.astype(np.float32) - h / 2) / (np.float32(0.46) * h)
        return 1 - (dx * dx + dy * dy)

    def tissue_at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return self.shape.at(ys, xs) + np.float32(0.9) * self.envelope(ys, xs) > 0.75

    def nuclei_of_cell(self, cy: int, cx: int) -> tuple[np.ndarray, ...]:
        """The kept nuclei whose centres fall in one cell: x, y, semi-axis a (px), b/a, angle, grey value."""
        if (cy, cx) not in self._nuclei:
            rng = np.random.default_rng([self.seed, 1, cy, cx])
            n = rng.poisson(_NUCLEUS_CELL**2 / (12 * self.um) ** 2)
            x = cx * _NUCLEUS_CELL + rng.uniform(0, _NUCLEUS_CELL, n)
            y = cy * _NUCLEUS_CELL + rng.uniform(0, _NUCLEUS_CELL, n)
            draw = rng.random(n)
            atypical = np.where(rng.random(n) < 0.03, 1.8, 1.0)
            a = rng.uniform(2.5, 4.5, n) * self.um * atypical
            ratio, angle, grey = rng.uniform(0.5, 0.95, n), rng.uniform(0, np.pi, n), rng.uniform(150, 255, n)
            inside = (x < self.w) & (y < self.h)
            ix, iy = x.astype(np.int64)[inside], y.astype(np.int64)[inside]
            keep = np.zeros(n, bool)
            keep[inside] = (
                self.tissue_at(iy, ix)
                & ~self.in_fat_hole(iy, ix)
                & (draw[inside] < 0.25 + 0.75 * self.cellularity.at(iy, ix))
            )
            self._nuclei[(cy, cx)] = tuple(v[keep] for v in (x, y, a, ratio, angle, grey))
        return self._nuclei[(cy, cx)]

    def forget_above(self, y: float) -> None:
        """Drop cached nuclei cells and fat rows that end above row `y` (no later band needs them)."""
        for key in [k for k in self._nuclei if (k[0] + 1) * _NUCLEUS_CELL < y]:
            del self._nuclei[key]
        for ly in [ly for ly in self._fat if (ly + 1) * self.fat_step + 35 * self.um < y]:
            del self._fat[ly]


def _fat_holes(model: _TissueModel, y0: int, y1: int) -> np.ndarray:
    """bool [y1 - y0, W]: adipocyte holes (40–90 µm, on a 55 µm lattice where the fat field is high)."""
    step = model.fat_step
    canvas = Image.new("L", (model.w, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    reach = 35 * model.um  # largest radius + jitter
    for ly in range(
        max(0, int((y0 - reach) // step)), min(model.fat_rows - 1, int((y1 + reach) // step)) + 1
    ):
        cx, cy, a, b, angle, present = model.fat_row(ly)
        for i in np.flatnonzero(present):
            draw.polygon(ellipse(cx[i], cy[i] - y0, a[i], b[i], angle[i]), fill=255)
    return np.asarray(canvas) > 0


def _nuclei(model: _TissueModel, y0: int, y1: int) -> np.ndarray:
    """float32 [y1 - y0, W] in [0, 1]: nuclei (rotated ellipses, 5–9 µm, a few large atypical ones), blurred."""
    margin = _NUCLEUS_MARGIN
    top = y0 - margin
    canvas = Image.new("L", (model.w, y1 - y0 + 2 * margin), 0)
    draw = ImageDraw.Draw(canvas)
    reach = 4.5 * 1.8 * model.um + margin
    cell = _NUCLEUS_CELL
    first, last = max(0, int((y0 - reach) // cell)), min((model.h - 1) // cell, int((y1 + reach) // cell))
    model.forget_above(y0 - reach)
    for cy in range(first, last + 1):
        for cx in range((model.w - 1) // cell + 1):
            for x, y, a, ratio, angle, grey in zip(*model.nuclei_of_cell(cy, cx), strict=True):
                if y0 - reach <= y < y1 + reach:
                    draw.polygon(ellipse(x, y - top, a, a * ratio, angle), fill=int(grey))
    blurred = canvas.filter(ImageFilter.GaussianBlur(0.6 * model.um))
    return np.asarray(blurred, np.float32)[margin : margin + y1 - y0] / 255.0


def _fibres(model: _TissueModel, y0: int, y1: int) -> np.ndarray:
    """float32 [y1 - y0, W] in [0, 1]: the stroma's fibrous texture, random values on a lattice 6 px × 48 px
    rotated by the slide's fibre angle, blurred and bicubic-interpolated (PIL affine transform)."""
    cos, sin = np.cos(model.fibre_angle), np.sin(model.fibre_angle)
    xs, ys = np.array([0, model.w, 0, model.w]), np.array([y0, y0, y1, y1])
    u, v = (xs * cos + ys * sin) / 6, (-xs * sin + ys * cos) / 48
    u0, v0 = int(np.floor(u.min())) - 4, int(np.floor(v.min())) - 4
    nu, nv = int(np.ceil(u.max())) - u0 + 5, int(np.ceil(v.max())) - v0 + 5
    iu, iv = np.meshgrid(np.arange(u0, u0 + nu), np.arange(v0, v0 + nv))
    lattice = Image.fromarray(_hash_u8(model.seed, iu, iv)).filter(ImageFilter.GaussianBlur(0.7))
    # output px (x, y) → lattice px; PIL samples at pixel centres (+0.5) on both sides
    data = (cos / 6, sin / 6, y0 * sin / 6 - u0 + 0.5, -sin / 48, cos / 48, y0 * cos / 48 - v0 + 0.5)
    out = lattice.transform((model.w, y1 - y0), Image.Transform.AFFINE, data, Image.Resampling.BICUBIC)
    return np.asarray(out, np.float32) / 255.0


def _band_maps(model: _TissueModel, spec: DemoSlideConfig, y0: int, y1: int) -> TissueMaps:
    """The latent maps of level-0 rows [y0, y1) (see `iter_tissue_bands`)."""
    band = y0 // BAND_ROWS
    noise = np.random.default_rng([model.seed, 0, band]).normal(0.0, 2.5, (y1 - y0, model.w, 1))
    noise = noise.astype(np.float32)
    if spec.blank:
        empty = np.zeros((y1 - y0, model.w), np.float32)
        none = np.zeros((y1 - y0, model.w), bool)
        return TissueMaps(none, none, empty, empty, empty, empty, noise)
    ys, xs = np.arange(y0, y1)[:, None], np.arange(model.w)[None, :]
    tissue = model.shape.rows(y0, y1) + np.float32(0.9) * model.envelope(ys, xs) > 0.75
    cellularity = model.cellularity.rows(y0, y1)
    fat = _fat_holes(model, y0, y1)
    nuclei_map = _nuclei(model, y0, y1)
    fibres = _fibres(model, y0, y1)
    body = tissue & ~fat
    eosin = np.where(body, 0.12 + 0.3 * fibres + 0.1 * (1 - cellularity), 0.0)
    eosin = np.where(tissue & fat, 0.0, eosin).astype(np.float32)
    hema = np.where(body, 0.02 + 0.05 * cellularity, 0.0) + 1.1 * nuclei_map * body
    chromatin = 1 + 0.25 * noise[..., 0] / 2.5 * (nuclei_map > 0.2)
    hema = (hema * chromatin).astype(np.float32)
    return TissueMaps(tissue, fat, cellularity, nuclei_map, hema, eosin, noise)


def iter_tissue_bands(spec: DemoSlideConfig, seed: int) -> Iterator[tuple[int, TissueMaps]]:
    """(first row, latent maps of BAND_ROWS level-0 rows) from the top of a demo slide to its bottom.

    Memory holds one band (all maps [≤ BAND_ROWS, W]) and the slide-wide model, which is small: three
    random grids of ≤ 12 × 12 points interpolated along x ([≤ 12, W]), the fibre angle, and the nuclei of
    the cells of ≤ 3 cell rows. Every random draw is tied to where it lands (the band for the sensor noise,
    a 512 px cell for nuclei, a lattice row for fat holes and fibres), so a band's pixels are the same
    whichever bands were rendered before it.
    """
    model = _TissueModel(spec, seed)
    for y0 in range(0, spec.height_px, BAND_ROWS):
        yield y0, _band_maps(model, spec, y0, min(y0 + BAND_ROWS, spec.height_px))


def render_tissue_maps(spec: DemoSlideConfig, seed: int) -> TissueMaps:
    """The latent maps of a whole synthetic H&E slide (what `render_tissue` turns into RGB), from a seed.

    The generator's ground truth: what the tissue is, independent of how it is stained or scanned. Holds
    the whole slide in memory (the demo teacher's training slides); `make_demo_slide` streams the same
    maps band by band (`iter_tissue_bands`).
    """
    bands = [maps for _, maps in iter_tissue_bands(spec, seed)]
    return TissueMaps(
        *(np.concatenate(parts) for parts in zip(*(astuple_maps(b) for b in bands), strict=True))
    )


def astuple_maps(maps: TissueMaps) -> tuple[np.ndarray, ...]:
    return tuple(getattr(maps, f.name) for f in fields(TissueMaps))


def compose_rgb(maps: TissueMaps) -> np.ndarray:
    """Beer–Lambert: stain concentrations → RGB (uint8 [H, W, 3]) with the maps' sensor noise."""
    density = maps.hema[..., None] * HEMATOXYLIN + maps.eosin[..., None] * EOSIN
    rgb = BACKGROUND_RGB * np.exp(-2.3 * density) + maps.noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _blank_rgb(maps: TissueMaps) -> np.ndarray:
    return np.clip(BACKGROUND_RGB + maps.noise, 0, 255).astype(np.uint8).repeat(3, axis=2)


def iter_rgb_bands(spec: DemoSlideConfig, seed: int) -> Iterator[np.ndarray]:
    """Level-0 RGB of a demo slide, uint8 [≤ BAND_ROWS, W, 3] bands from top to bottom."""
    for _, maps in iter_tissue_bands(spec, seed):
        yield _blank_rgb(maps) if spec.blank else compose_rgb(maps)


def render_tissue(spec: DemoSlideConfig, seed: int) -> np.ndarray:
    """Level-0 RGB pixels of a whole synthetic H&E slide (uint8 [H, W, 3]); the bands of `iter_rgb_bands`."""
    return np.concatenate(list(iter_rgb_bands(spec, seed)))


def pyramid_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(height, width) of each level written: 2× steps (PIL's `reduce(2)`, rounding up), at most `levels`,
    and no level after the first whose shorter side is under 64 px (no thumbnail needs one)."""
    shapes = [(height, width)]
    while len(shapes) < levels:
        h, w = shapes[-1]
        h, w = -(-h // 2), -(-w // 2)
        if min(h, w) < 64:
            break
        shapes.append((h, w))
    return shapes


def _channel_axes(channels: int) -> tuple[int, ...]:
    """The trailing axes of a band: (3,) for RGB, () for one channel."""
    if channels not in (1, 3):
        raise ValueError(f"a pyramid has 1 (labels, grey) or 3 (RGB) channels, not {channels}")
    return () if channels == 1 else (channels,)


def _box_reduce2(band: np.ndarray) -> np.ndarray:
    """2× box downsampling (PIL `reduce(2)`, rounding the size up): the RGB levels."""
    return np.asarray(Image.fromarray(band).reduce(2))


def _tiles(bands: Iterable[np.ndarray], width: int, tile: int, channels: int = 3) -> Iterator[np.ndarray]:
    """Row-major `tile` × `tile` tiles of an image given as row bands ([rows, W, 3], or [rows, W] when
    `channels` is 1); edge tiles zero-padded (as tifffile pads an array). Holds one row of tiles."""
    row = np.zeros((tile, -(-width // tile) * tile, *_channel_axes(channels)), np.uint8)
    filled = 0
    for band in bands:
        start = 0
        while start < len(band):
            take = min(tile - filled, len(band) - start)
            row[filled : filled + take, :width] = band[start : start + take]
            filled, start = filled + take, start + take
            if filled == tile:
                yield from (row[:, c : c + tile].copy() for c in range(0, row.shape[1], tile))
                filled = 0
    if filled:
        row[filled:] = 0
        yield from (row[:, c : c + tile].copy() for c in range(0, row.shape[1], tile))


def write_pyramid_bands(
    bands: Iterable[np.ndarray],
    shape: tuple[int, int],
    path: str | Path,
    mpp: float | None,
    levels: int = 4,
    tile: int = 256,
    *,
    channels: int = 3,
    reduce: Callable[[np.ndarray], np.ndarray] = _box_reduce2,
) -> None:
    """Write a tiled pyramidal TIFF (one IFD per level, 2× steps) that OpenSlide reads as generic-tiff, from
    level-0 RGB row bands (uint8 [rows, W, 3], top to bottom, even `rows` except the last band).

    `channels` 1 writes one-channel bands (uint8 [rows, W], photometric minisblack; the demo's mask slides,
    `histodistill.demo.masks`); `reduce` makes the next level of a band ([rows, W(, 3)] → [⌈rows/2⌉,
    ⌈W/2⌉(, 3)]; default a 2× box average, which labels must never get: they pass a mode/nearest reducer).

    Streams: level 0 is compressed tile row by tile row as the bands arrive; each band is reduced by
    `reduce` (PIL `reduce(2)` by default, as a whole level would be) into the next levels, which wait uncompressed in temporary
    files beside `path` (a third of level 0's size on disk, none in memory) and are written after it. Memory
    holds a band, its reductions and one row of tiles per level, whatever the slide's size.
    Levels: `pyramid_shapes`. Raises ValueError when the bands do not cover `shape`.
    """
    height, width = shape
    trailing = _channel_axes(channels)
    shapes = pyramid_shapes(height, width, levels)
    path = Path(path)
    with (
        atomic_path(path) as tmp,
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid-") as scratch,
    ):
        spills = [open(Path(scratch) / f"level{i}.raw", "w+b") for i in range(1, len(shapes))]  # noqa: SIM115
        try:
            rows_seen = 0

            def level0() -> Iterator[np.ndarray]:
                nonlocal rows_seen
                for band in bands:
                    band = np.asarray(band, np.uint8)
                    if band.shape[1:] != (width, *trailing):
                        raise ValueError(
                            f"band of shape {band.shape}; expected {[None, width, *trailing]} (rows first)"
                        )
                    rows_seen += len(band)
                    reduced = band  # reduced before the band is handed on: tifffile stops at the last tile
                    for spill in spills:
                        reduced = np.ascontiguousarray(reduce(reduced), np.uint8)
                        spill.write(reduced.tobytes())
                    yield band

            def spilled(i: int) -> Iterator[np.ndarray]:
                h, w = shapes[i]
                spill = spills[i - 1]
                spill.seek(0)
                for y in range(0, h, tile):
                    rows = min(tile, h - y)
                    yield np.frombuffer(spill.read(rows * w * channels), np.uint8).reshape(rows, w, *trailing)

            with tifffile.TiffWriter(tmp, bigtiff=height * width * channels > 2**31) as tif:
                for i, (h, w) in enumerate(shapes):
                    extra = {"resolution": (1, 1), "resolutionunit": "NONE"}
                    if mpp is not None:
                        res = 1e4 / (mpp * 2**i)  # pixels per centimetre
                        extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
                    tif.write(
                        _tiles(level0() if i == 0 else spilled(i), w, tile, channels),
                        shape=(h, w, *trailing),
                        dtype=np.uint8,
                        tile=(tile, tile),
                        photometric="rgb" if channels == 3 else "minisblack",
                        compression="zlib",
                        compressionargs={"level": 6},
                        subfiletype=1 if i else 0,
                        metadata=None,
                        **extra,
                    )
                    if i == 0 and rows_seen != height:
                        raise ValueError(f"the bands hold {rows_seen} rows; the slide has {height}")
        finally:
            for spill in spills:
                spill.close()


def write_pyramid_tiff(
    pixels: np.ndarray, path: str | Path, mpp: float | None, levels: int = 4, tile: int = 256
) -> None:
    """Write level-0 pixels (uint8 [H, W, 3]) as a tiled pyramidal TIFF (`write_pyramid_bands`)."""
    bands = (pixels[y : y + BAND_ROWS] for y in range(0, pixels.shape[0], BAND_ROWS))
    write_pyramid_bands(bands, pixels.shape[:2], path, mpp, levels, tile)


def make_demo_slide(
    path: str | Path,
    seed: int,
    spec: DemoSlideConfig = DemoSlideConfig(),
    site: tuple[dict, dict] | None = None,
) -> Path:
    """Render and write one demo slide, band by band; the same seed and spec give byte-identical files.

    `site`: (staining, scanner) (`draw_site`): each level-0 band is re-stained (`restain`) and scanned
    (`scan`: gain, gamma, blur, JPEG) as a slide of another lab and scanner; None keeps the generator's own
    staining, unscanned (the demo cohort's). Deviation from a real scanner: blur and JPEG act per band of
    `BAND_ROWS` (a multiple of JPEG's 8-px blocks), so the blur (σ ≤ 1.6 px at 0.25 µm/px) sees the band's
    edge rows repeated at its top and bottom.

    Memory is bounded by a few tile rows whatever the slide's height (`iter_tissue_bands`,
    `write_pyramid_bands`); level 0 equals `render_tissue(spec, seed)`.
    """
    shape = (spec.height_px, spec.width_px)
    bands = iter_rgb_bands(spec, seed)
    if site is not None:
        staining, scanner = site
        bands = (scan(restain(band, staining), scanner) for band in bands)
    write_pyramid_bands(bands, shape, path, spec.mpp, spec.levels, spec.tile)
    return Path(path)


def make_demo_cohort(
    out_dir: str | Path,
    n_slides: int = 3,
    seed: int = 0,
    spec: DemoSlideConfig = DemoSlideConfig(),
    cohort: str = "demo",
) -> Path:
    """Write `n_slides` demo slides and a sample sheet `samples.tsv` beside them; return the sheet's path.

    Raises IdError when `cohort` (which also names the slides) is not a valid id (`histodistill.ids`).
    """
    check_id(cohort, "cohort")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id\tpath\tcohort"]
    for i in range(n_slides):
        slide_id = f"{cohort}_{i:02d}"
        path = make_demo_slide(inside(out_dir, f"{slide_id}.tiff"), seed_for(slide_id, seed), spec)
        rows.append(f"{slide_id}\t{path.resolve()}\t{cohort}")
    sheet = out_dir / "samples.tsv"
    with atomic_path(sheet) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return sheet


def restain(rgb: np.ndarray, staining: dict) -> np.ndarray:
    """Re-stain an H&E image: unmix into H and E optical densities, rescale them, remix with rotated vectors."""
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / BACKGROUND_RGB)
    basis = np.stack([HEMATOXYLIN, EOSIN, np.cross(HEMATOXYLIN, EOSIN)])
    conc = od.reshape(-1, 3) @ np.linalg.pinv(basis)
    theta = np.deg2rad(staining["hue_deg"])
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    hema, eosin = rot @ HEMATOXYLIN, rot.T @ EOSIN
    new_basis = np.stack([hema / np.linalg.norm(hema), eosin / np.linalg.norm(eosin), basis[2]])
    conc[:, 0] *= staining["hema"]
    conc[:, 1] *= staining["eosin"]
    out = BACKGROUND_RGB * np.exp(-(conc @ new_basis))
    return np.clip(out, 0, 255).reshape(rgb.shape).astype(np.uint8)


def scan(rgb: np.ndarray, scanner: dict) -> np.ndarray:
    """Scanner optics and electronics: colour gain + gamma, blur, JPEG compression."""
    gain = np.asarray(scanner["gain"], np.float32)
    img = 255.0 * np.clip(rgb.astype(np.float32) / 255.0 * gain, 0, 1) ** scanner["gamma"]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if scanner["blur_um"] > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(scanner["blur_um"] / scanner["mpp"]))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=scanner["jpeg"])
    return np.asarray(Image.open(buffer).convert("RGB"))
