"""Deterministic synthetic H&E-like whole-slide images for the demo and the tests.

Tissue is rendered in optical-density space (Beer–Lambert) from two stain concentration maps, so colours
behave like real H&E: haematoxylin on nuclei, eosin on a fibrous stroma, fat as empty holes, glass as a
bright grey background. The result is a tiled, pyramidal, deflate-compressed TIFF with its µm/px in the
TIFF resolution tags, which OpenSlide opens as a generic TIFF.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
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


def seed_for(name: str, base_seed: int = 0) -> int:
    """A stable per-slide seed from the global seed and the slide id."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{name}".encode()).digest()[:8], "little")


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int], blur: float = 1.0
):
    """Low-frequency noise in [0, 1]: a small random grid, blurred, upsampled with bicubic interpolation."""
    small = Image.fromarray((rng.random(cells) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    big = np.asarray(small.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), np.float32) / 255.0
    lo, hi = float(big.min()), float(big.max())
    return (big - lo) / max(hi - lo, 1e-6)


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


def render_tissue_maps(spec: DemoSlideConfig, seed: int) -> TissueMaps:
    """The latent maps of a synthetic H&E slide (what `render_tissue` turns into RGB), from a seed.

    The generator's ground truth: what the tissue is, independent of how it is stained or scanned.
    """
    rng = np.random.default_rng(seed)
    h, w = spec.height_px, spec.width_px
    um = 1.0 / (spec.mpp or 0.25)  # px per µm
    noise = rng.normal(0.0, 2.5, (h, w, 1)).astype(np.float32)
    if spec.blank:
        empty = np.zeros((h, w), np.float32)
        none = np.zeros((h, w), bool)
        return TissueMaps(none, none, empty, empty, empty, empty, noise)

    # Tissue region: smooth noise inside an elliptical envelope, so the glass shows around it.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    envelope = 1 - (((xx - w / 2) / (0.48 * w)) ** 2 + ((yy - h / 2) / (0.46 * h)) ** 2)
    shape = _smooth_noise(rng, (h, w), (6, 9), blur=0.8) + 0.9 * envelope
    tissue = shape > 0.75
    cellularity = _smooth_noise(rng, (h, w), (8, 12), blur=1.0)
    fat_region = _smooth_noise(rng, (h, w), (5, 7), blur=0.8) > 0.62

    # Fat: empty adipocyte holes (40–90 µm) with thin eosinophilic membranes between them.
    holes = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(holes)
    step = int(55 * um)
    fy, fx = np.nonzero(fat_region[::step, ::step])
    for cy, cx in zip(fy * step, fx * step, strict=True):
        r = rng.uniform(17, 27) * um
        jitter = rng.uniform(-7, 7, 2) * um
        draw.polygon(
            ellipse(cx + jitter[0], cy + jitter[1], r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)),
            fill=255,
        )
    fat = np.asarray(holes) > 0

    # Nuclei: rotated ellipses, 5–9 µm, denser where cellularity is high; a few large atypical ones.
    nuclei = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(nuclei)
    n_candidates = int(h * w / (12 * um) ** 2)
    cx, cy = rng.uniform(0, w, n_candidates), rng.uniform(0, h, n_candidates)
    ix, iy = cx.astype(int), cy.astype(int)
    keep = tissue[iy, ix] & ~fat[iy, ix] & (rng.random(n_candidates) < 0.25 + 0.75 * cellularity[iy, ix])
    for x, y in zip(cx[keep], cy[keep], strict=True):
        a = rng.uniform(2.5, 4.5) * um * (1.8 if rng.random() < 0.03 else 1.0)
        draw.polygon(
            ellipse(x, y, a, a * rng.uniform(0.5, 0.95), rng.uniform(0, np.pi)),
            fill=int(rng.uniform(150, 255)),
        )
    nuclei_map = np.asarray(nuclei.filter(ImageFilter.GaussianBlur(0.6 * um)), np.float32) / 255.0

    # Stroma: eosin with an oriented fibrous texture (noise stretched along x, then rotated per slide).
    fibres = Image.fromarray((rng.random((max(h // 48, 2), max(w // 6, 2))) * 255).astype(np.uint8))
    fibres = (
        fibres.filter(ImageFilter.GaussianBlur(0.7))
        .resize((w, h), Image.Resampling.BICUBIC)
        .rotate(rng.uniform(-40, 40), resample=Image.Resampling.BILINEAR, expand=False, fillcolor=128)
    )
    fibres = np.asarray(fibres, np.float32) / 255.0

    body = tissue & ~fat
    eosin = np.where(body, 0.12 + 0.3 * fibres + 0.1 * (1 - cellularity), 0.0)
    eosin = np.where(tissue & fat, 0.0, eosin).astype(np.float32)
    hema = np.where(body, 0.02 + 0.05 * cellularity, 0.0) + 1.1 * nuclei_map * body
    chromatin = 1 + 0.25 * noise[..., 0] / 2.5 * (nuclei_map > 0.2)
    hema = (hema * chromatin).astype(np.float32)
    return TissueMaps(tissue, fat, cellularity, nuclei_map, hema, eosin, noise)


def compose_rgb(maps: TissueMaps) -> np.ndarray:
    """Beer–Lambert: stain concentrations → RGB (uint8 [H, W, 3]) with the maps' sensor noise."""
    density = maps.hema[..., None] * HEMATOXYLIN + maps.eosin[..., None] * EOSIN
    rgb = BACKGROUND_RGB * np.exp(-2.3 * density) + maps.noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def render_tissue(spec: DemoSlideConfig, seed: int) -> np.ndarray:
    """Level-0 RGB pixels of a synthetic H&E slide (uint8 [H, W, 3])."""
    if spec.blank:
        h, w = spec.height_px, spec.width_px
        noise = np.random.default_rng(seed).normal(0.0, 2.5, (h, w, 1)).astype(np.float32)
        return np.clip(BACKGROUND_RGB + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    return compose_rgb(render_tissue_maps(spec, seed))


def write_pyramid_tiff(
    pixels: np.ndarray, path: str | Path, mpp: float | None, levels: int = 4, tile: int = 256
) -> None:
    """Write a tiled pyramidal TIFF (one IFD per level, 2× steps) that OpenSlide reads as generic-tiff."""
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=pixels.nbytes > 2**31) as tif:
            level = pixels
            for i in range(levels):
                if i and min(level.shape[:2]) < 64:  # no level smaller than a thumbnail needs
                    break
                extra = {}
                if mpp is not None:
                    res = 1e4 / (mpp * 2**i)  # pixels per centimetre
                    extra = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
                else:
                    extra = {"resolution": (1, 1), "resolutionunit": "NONE"}
                tif.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="zlib",
                    compressionargs={"level": 6},
                    subfiletype=1 if i else 0,
                    metadata=None,
                    **extra,
                )
                level = np.asarray(Image.fromarray(level).reduce(2))


def make_demo_slide(path: str | Path, seed: int, spec: DemoSlideConfig = DemoSlideConfig()) -> Path:
    """Render and write one demo slide; the same seed and spec give byte-identical files."""
    write_pyramid_tiff(render_tissue(spec, seed), path, spec.mpp, spec.levels, spec.tile)
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
