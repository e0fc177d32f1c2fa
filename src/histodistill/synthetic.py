"""Deterministic synthetic H&E-like whole-slide images for the demo and the tests.

Tissue is rendered in optical-density space (Beer–Lambert) from two stain concentration maps, so colours
behave like real H&E: haematoxylin on nuclei, eosin on a fibrous stroma, fat as empty holes, glass as a
bright grey background. The result is a tiled, pyramidal, deflate-compressed TIFF with its µm/px in the
TIFF resolution tags, which OpenSlide opens as a generic TIFF.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

from histodistill.atomic import atomic_path

# Stain optical-density vectors (Ruifrok & Johnston), normalised.
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], np.float32)
EOSIN = np.array([0.092, 0.954, 0.283], np.float32)
BACKGROUND_RGB = 242.0


@dataclass(frozen=True)
class SlideSpec:
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


def _ellipse(
    cx: float, cy: float, a: float, b: float, angle: float, n: int = 14
) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = np.cos(angle), np.sin(angle)
    x, y = a * np.cos(t), b * np.sin(t)
    return list(zip(cx + ca * x - sa * y, cy + sa * x + ca * y, strict=True))


def render_tissue(spec: SlideSpec, seed: int) -> np.ndarray:
    """Level-0 RGB pixels of a synthetic H&E slide (uint8 [H, W, 3])."""
    rng = np.random.default_rng(seed)
    h, w = spec.height_px, spec.width_px
    um = 1.0 / (spec.mpp or 0.25)  # px per µm
    noise = rng.normal(0.0, 2.5, (h, w, 1)).astype(np.float32)
    if spec.blank:
        return np.clip(BACKGROUND_RGB + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)

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
            _ellipse(cx + jitter[0], cy + jitter[1], r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)),
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
            _ellipse(x, y, a, a * rng.uniform(0.5, 0.95), rng.uniform(0, np.pi)),
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
    density = hema[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
    rgb = BACKGROUND_RGB * np.exp(-2.3 * density) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


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


def make_demo_slide(path: str | Path, seed: int, spec: SlideSpec = SlideSpec()) -> Path:
    """Render and write one demo slide; the same seed and spec give byte-identical files."""
    write_pyramid_tiff(render_tissue(spec, seed), path, spec.mpp, spec.levels, spec.tile)
    return Path(path)


def make_demo_cohort(
    out_dir: str | Path, n_slides: int = 3, seed: int = 0, spec: SlideSpec = SlideSpec(), cohort: str = "demo"
) -> Path:
    """Write `n_slides` demo slides and a sample sheet `samples.tsv` beside them; return the sheet's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id\tpath\tcohort"]
    for i in range(n_slides):
        slide_id = f"{cohort}_{i:02d}"
        path = make_demo_slide(out_dir / f"{slide_id}.tiff", seed_for(slide_id, seed), spec)
        rows.append(f"{slide_id}\t{path.resolve()}\t{cohort}")
    sheet = out_dir / "samples.tsv"
    with atomic_path(sheet) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return sheet


# --- PLISM-like demo: one tissue under several scanners and stainings, each with a known warp -----------

# Stainings change how much of each stain binds and its hue (a rotation of the stain OD vector).
DEMO_STAININGS = {
    "GMH": {"hema": 1.00, "eosin": 1.00, "hue_deg": 0.0},
    "GIV": {"hema": 1.30, "eosin": 0.75, "hue_deg": 6.0},
    "KR": {"hema": 0.80, "eosin": 1.25, "hue_deg": -5.0},
}
# Scanners differ in resolution, colour response, optics (blur) and compression.
DEMO_SCANNERS = {
    "S60": {"mpp": 0.25, "gain": (1.00, 1.00, 1.00), "gamma": 1.00, "blur_um": 0.0, "jpeg": 95},
    "AT2": {"mpp": 0.2527, "gain": (1.01, 0.985, 1.015), "gamma": 1.10, "blur_um": 0.25, "jpeg": 80},
    "GT450": {"mpp": 0.263, "gain": (0.98, 1.00, 1.02), "gamma": 0.92, "blur_um": 0.35, "jpeg": 75},
    "P": {"mpp": 0.22, "gain": (1.02, 1.01, 0.975), "gamma": 1.05, "blur_um": 0.2, "jpeg": 85},
}
DEMO_REFERENCE = ("GMH", "S60")


@dataclass(frozen=True)
class PlismDemoSpec:
    """The PLISM-like demo set: every scanner × staining, the reference left unwarped."""

    width_px: int = 4096  # the reference slide (and the rendered tissue) at `DEMO_SCANNERS[S60].mpp`
    height_px: int = 3072
    scanners: tuple[str, ...] = ("S60", "AT2", "GT450", "P")
    stainings: tuple[str, ...] = ("GMH", "GIV")
    max_rotation_deg: float = 3.0
    max_shift_um: float = 40.0
    max_scale: float = 0.02
    elastic_um: float = 6.0  # amplitude of the smooth elastic displacement
    elastic_wavelength_um: float = 500.0


def _random_warp(rng: np.random.Generator, spec: PlismDemoSpec, size_um: tuple[float, float]) -> dict:
    """A moving→reference map u ↦ A·u + t + d(u) (µm), with d a sum of smooth sinusoids."""
    angle = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
    scale = 1 + rng.uniform(-spec.max_scale, spec.max_scale, 2)
    shear = rng.uniform(-0.01, 0.01)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a = rot @ np.array([[scale[0], shear], [0.0, scale[1]]])
    centre = np.array(size_um) / 2
    t = centre - a @ centre + rng.uniform(-spec.max_shift_um, spec.max_shift_um, 2)
    terms = []
    for _ in range(3):
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        amplitude = rng.normal(size=2)
        amplitude *= spec.elastic_um / np.linalg.norm(amplitude) / np.sqrt(3)
        terms.append(
            {
                "frequency": (direction / (spec.elastic_wavelength_um * rng.uniform(0.8, 1.5))).tolist(),
                "phase": float(rng.uniform(0, 2 * np.pi)),
                "amplitude": amplitude.tolist(),
            }
        )
    return {"matrix": a.tolist(), "offset": t.tolist(), "elastic": terms}


def _identity_warp() -> dict:
    return {"matrix": [[1.0, 0.0], [0.0, 1.0]], "offset": [0.0, 0.0], "elastic": []}


def _displacement(warp: dict, u: np.ndarray) -> np.ndarray:
    d = np.zeros_like(u)
    for term in warp["elastic"]:
        s = np.sin(2 * np.pi * (u @ np.asarray(term["frequency"])) + term["phase"])
        d += s[..., None] * np.asarray(term["amplitude"])
    return d


def warp_to_reference(warp: dict, u_um: np.ndarray) -> np.ndarray:
    """Moving-slide µm → reference-slide µm (how the moving slide was rendered)."""
    u = np.asarray(u_um, np.float64)
    return u @ np.asarray(warp["matrix"]).T + np.asarray(warp["offset"]) + _displacement(warp, u)


def reference_to_moving(warp: dict, q_um: np.ndarray, iterations: int = 50) -> np.ndarray:
    """The ground truth: reference µm → moving µm, by fixed-point inversion of `warp_to_reference`.

    Converges because the elastic part is small and smooth (its Lipschitz constant ≪ 1).
    """
    q = np.asarray(q_um, np.float64)
    a_inv = np.linalg.inv(np.asarray(warp["matrix"]))
    offset = np.asarray(warp["offset"])
    u = (q - offset) @ a_inv.T
    for _ in range(iterations):
        u = (q - offset - _displacement(warp, u)) @ a_inv.T
    return u


def _stain(rgb: np.ndarray, staining: dict) -> np.ndarray:
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


def _resample(canvas: np.ndarray, canvas_mpp: float, warp: dict, out_shape: tuple[int, int], mpp: float):
    """Render the moving slide: each output pixel samples the canvas at its reference-space position."""
    from scipy.ndimage import map_coordinates

    h, w = out_shape
    out = np.empty((h, w, 3), np.uint8)
    band = max(1, 2**21 // w)
    xs = (np.arange(w) + 0.5) * mpp
    for y0 in range(0, h, band):
        ys = (np.arange(y0, min(h, y0 + band)) + 0.5) * mpp
        u = np.stack(np.meshgrid(xs, ys), axis=-1)  # [rows, w, 2] as (x, y) µm
        q = warp_to_reference(warp, u) / canvas_mpp - 0.5  # canvas pixel coordinates
        coords = np.stack([q[..., 1], q[..., 0]])
        for c in range(3):
            out[y0 : y0 + len(ys), :, c] = map_coordinates(
                canvas[..., c], coords, order=1, mode="constant", cval=BACKGROUND_RGB
            )
    return out


def _scan(rgb: np.ndarray, scanner: dict) -> np.ndarray:
    """Scanner optics and electronics: colour gain + gamma, blur, JPEG compression."""
    gain = np.asarray(scanner["gain"], np.float32)
    img = 255.0 * np.clip(rgb.astype(np.float32) / 255.0 * gain, 0, 1) ** scanner["gamma"]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if scanner["blur_um"] > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(scanner["blur_um"] / scanner["mpp"]))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=scanner["jpeg"])
    return np.asarray(Image.open(buffer).convert("RGB"))


def make_plism_demo(out_dir: str | Path, seed: int = 0, spec: PlismDemoSpec = PlismDemoSpec()) -> Path:
    """Write a PLISM-like set of slides, its manifest `plism.tsv` and the ground-truth warps `truth.json`.

    Slide ids are `{staining}_{scanner}`; the reference (GMH on S60) is the unwarped tissue. Each other
    slide is the same tissue re-stained, warped by a known affine + elastic map, resampled at its scanner's
    µm/px and passed through the scanner's colour response, blur and JPEG.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    canvas_mpp = DEMO_SCANNERS[DEMO_REFERENCE[1]]["mpp"]
    canvas = render_tissue(SlideSpec(spec.width_px, spec.height_px, mpp=canvas_mpp), seed_for("plism", seed))
    size_um = (spec.width_px * canvas_mpp, spec.height_px * canvas_mpp)
    rows, truth = ["slide_id\tpath\tscanner\tstaining"], {"reference": "_".join(DEMO_REFERENCE), "slides": {}}
    for staining in spec.stainings:
        stained = _stain(canvas, DEMO_STAININGS[staining])
        for scanner in spec.scanners:
            slide_id = f"{staining}_{scanner}"
            params = DEMO_SCANNERS[scanner]
            is_ref = (staining, scanner) == DEMO_REFERENCE
            rng = np.random.default_rng(seed_for(f"plism-warp:{slide_id}", seed))
            warp = _identity_warp() if is_ref else _random_warp(rng, spec, size_um)
            shape = (round(size_um[1] / params["mpp"]), round(size_um[0] / params["mpp"]))
            pixels = stained if is_ref else _resample(stained, canvas_mpp, warp, shape, params["mpp"])
            pixels = _scan(pixels, params)
            path = out_dir / f"{slide_id}.tiff"
            write_pyramid_tiff(pixels, path, params["mpp"])
            rows.append(f"{slide_id}\t{path.resolve()}\t{scanner}\t{staining}")
            truth["slides"][slide_id] = {"mpp": params["mpp"], "warp": warp}
    with atomic_path(out_dir / "truth.json") as tmp:
        tmp.write_text(json.dumps(truth, indent=1))
    manifest = out_dir / "plism.tsv"
    with atomic_path(manifest) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return manifest


# --- Mitosis demo: mitotic figures and look-alike hard negatives, in visually different domains ---------

# Each domain is one staining and one scanner: the same kind of tissue looks different (stain hue and
# balance, colour response, optics), as the scanners and tumour types of MIDOG do.
MITOSIS_DOMAINS = {
    "scanner_a": {
        "staining": {"hema": 1.00, "eosin": 1.00, "hue_deg": 0.0},
        "scanner": {"mpp": 0.25, "gain": (1.00, 1.00, 1.00), "gamma": 1.00, "blur_um": 0.0, "jpeg": 95},
    },
    "scanner_b": {
        "staining": {"hema": 1.30, "eosin": 0.70, "hue_deg": 9.0},
        "scanner": {"mpp": 0.25, "gain": (1.03, 0.96, 1.04), "gamma": 1.20, "blur_um": 0.35, "jpeg": 80},
    },
    "scanner_c": {
        "staining": {"hema": 0.85, "eosin": 1.30, "hue_deg": -6.0},
        "scanner": {"mpp": 0.25, "gain": (0.97, 1.01, 0.99), "gamma": 0.90, "blur_um": 0.2, "jpeg": 85},
    },
}
MITOTIC_FIGURE = "mitotic_figure"
HARD_NEGATIVE = "hard_negative"


@dataclass(frozen=True)
class MitosisDemoSpec:
    """Size of the demo slides and how many annotated figures each one holds."""

    width_px: int = 2048
    height_px: int = 1536
    mpp: float = 0.25
    levels: int = 3
    n_mitotic_figures: int = 12
    n_hard_negatives: int = 12
    min_spacing_um: float = 40.0  # between annotated figures: a patch never holds two of them


def _blobs(draw: ImageDraw.ImageDraw, centres: np.ndarray, radii: np.ndarray, value: int) -> None:
    for (x, y), r in zip(centres, radii, strict=True):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=value)


def _mitotic_figure(rng: np.random.Generator, um: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A condensed-chromatin figure (metaphase plate, prometaphase clump or anaphase pair) and its clear halo.

    Returns haematoxylin OD [size, size] and a halo weight in [0, 1]: chromosomes are many small dark
    granules with spiky arms, so the outline is irregular, unlike a pyknotic nucleus.
    """
    c = size / 2
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    kind = rng.choice(["metaphase", "prometaphase", "anaphase"])
    angle = rng.uniform(0, np.pi)
    along, across = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    if kind == "prometaphase":
        n = int(rng.integers(22, 32))
        r = rng.uniform(1.0, 3.8, n) * um
        t = rng.uniform(0, 2 * np.pi, n)
        centres = c + np.stack([r * np.cos(t), r * np.sin(t)], 1)
        bands = [centres]
    else:
        length, width = rng.uniform(7, 11) * um, rng.uniform(0.8, 1.5) * um
        offsets = [0.0] if kind == "metaphase" else [-rng.uniform(2.5, 4) * um, rng.uniform(2.5, 4) * um]
        bands = []
        for off in offsets:
            n = int(rng.integers(18, 26))
            s = rng.uniform(-length / 2, length / 2, n) * (0.7 if kind == "anaphase" else 1.0)
            w = rng.normal(0, width / 2, n) + off
            bands.append(c + s[:, None] * along + w[:, None] * across)
    for centres in bands:
        _blobs(draw, centres, rng.uniform(0.35, 0.8, len(centres)) * um, 255)
        # chromosome arms: short spikes leaving the plate in random directions
        for start in centres[rng.choice(len(centres), size=min(10, len(centres)), replace=False)]:
            direction = rng.normal(size=2)
            direction /= np.linalg.norm(direction)
            end = start + direction * rng.uniform(1.0, 2.5) * um
            draw.line([tuple(start), tuple(end)], fill=255, width=max(1, round(0.4 * um)))
    chromatin = np.asarray(img.filter(ImageFilter.GaussianBlur(0.25 * um)), np.float32) / 255.0
    yy, xx = np.mgrid[0:size, 0:size]
    halo = np.clip(1.3 - np.hypot(xx - c, yy - c) / (7.5 * um), 0, 1).astype(np.float32)
    return rng.uniform(1.7, 2.3) * chromatin, halo


def _hard_negative(rng: np.random.Generator, um: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A look-alike: a pyknotic nucleus (dark, round, smooth) or apoptotic bodies (a few round fragments).

    Returns haematoxylin OD and extra eosin OD (shrunken, hypereosinophilic cytoplasm around it).
    """
    c = size / 2
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.6:  # pyknosis: one smooth, homogeneous, slightly oval disc
        a = rng.uniform(2.6, 3.6) * um
        draw.polygon(_ellipse(c, c, a, a * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), n=48), fill=255)
    else:  # apoptotic bodies: 2–4 round fragments close together
        n = int(rng.integers(2, 5))
        t = rng.uniform(0, 2 * np.pi, n)
        r = rng.uniform(0.5, 2.2, n) * um
        _blobs(draw, c + np.stack([r * np.cos(t), r * np.sin(t)], 1), rng.uniform(1.1, 1.9, n) * um, 255)
    nucleus = np.asarray(img.filter(ImageFilter.GaussianBlur(0.35 * um)), np.float32) / 255.0
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.hypot(xx - c, yy - c) / um
    cytoplasm = np.clip(1 - np.abs(d - 5.0) / 2.5, 0, 1).astype(np.float32)
    return rng.uniform(2.2, 2.8) * nucleus, 0.4 * cytoplasm


def _place_points(
    rng: np.random.Generator, tissue: np.ndarray, n: int, spacing_px: float, margin_px: int
) -> np.ndarray:
    """Up to `n` level-0 points inside tissue, `spacing_px` apart and `margin_px` from the border."""
    h, w = tissue.shape
    ys, xs = np.nonzero(tissue[margin_px : h - margin_px, margin_px : w - margin_px])
    if len(xs) == 0:
        return np.zeros((0, 2))
    order = rng.permutation(len(xs))
    points: list[np.ndarray] = []
    for i in order[: 50 * n]:
        p = np.array([xs[i] + margin_px, ys[i] + margin_px], np.float64)
        if all(np.hypot(*(p - q)) >= spacing_px for q in points):
            points.append(p)
            if len(points) == n:
                break
    return np.array(points).reshape(-1, 2)


def render_mitosis_slide(
    spec: MitosisDemoSpec, seed: int, domain: str
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Level-0 RGB of one mitosis demo slide in `domain` and its point annotations (x, y, label)."""
    rng = np.random.default_rng(seed)
    um = 1.0 / spec.mpp
    rgb = render_tissue(SlideSpec(spec.width_px, spec.height_px, spec.mpp), seed)
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / BACKGROUND_RGB)
    # Tissue: stained (saturated) pixels, smoothed over ~20 µm; fat holes and glass are not tissue.
    sat = (rgb.max(2).astype(np.float32) - rgb.min(2)) / np.maximum(rgb.max(2), 1)
    smooth = np.asarray(
        Image.fromarray((sat > 0.12).astype(np.uint8) * 255).filter(ImageFilter.BoxBlur(int(10 * um))),
        np.float32,
    )
    tissue = smooth > 0.8 * 255
    n_mf, n_hn = spec.n_mitotic_figures, spec.n_hard_negatives
    points = _place_points(rng, tissue, n_mf + n_hn, spec.min_spacing_um * um, int(16 * um))
    labels: list[str] = []  # alternating, so a crowded slide that places fewer points stays balanced
    for i in range(max(n_mf, n_hn)):
        labels += [MITOTIC_FIGURE] * (i < n_mf) + [HARD_NEGATIVE] * (i < n_hn)
    size = int(24 * um) | 1
    half = size // 2
    annotations = []
    for (x, y), label in zip(points, labels[: len(points)], strict=True):
        ix, iy = int(x), int(y)
        window = (slice(iy - half, iy - half + size), slice(ix - half, ix - half + size))
        if label == MITOTIC_FIGURE:
            hema, halo = _mitotic_figure(rng, um, size)
            od[window] *= 1 - 0.65 * halo[..., None]  # cleared cytoplasm around the condensed chromatin
            od[window] += hema[..., None] * HEMATOXYLIN
        else:
            hema, eosin = _hard_negative(rng, um, size)
            cleared = np.clip(hema / 1.5, 0, 1)[..., None]  # the nucleus replaces what was below it
            od[window] = od[window] * (1 - cleared) + hema[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
        annotations.append((float(ix), float(iy), label))
    noise = rng.normal(0.0, 2.0, od.shape[:2] + (1,)).astype(np.float32)
    pixels = np.clip(BACKGROUND_RGB * np.exp(-od) + noise, 0, 255).astype(np.uint8)
    style = MITOSIS_DOMAINS[domain]
    pixels = _scan(_stain(pixels, style["staining"]), {**style["scanner"], "mpp": spec.mpp})
    return pixels, annotations


def make_mitosis_demo(
    out_dir: str | Path,
    seed: int = 0,
    n_slides_per_domain: int = 3,
    domains: tuple[str, ...] = ("scanner_a", "scanner_b"),
    spec: MitosisDemoSpec = MitosisDemoSpec(),
    cohort: str = "mitosis_demo",
) -> tuple[Path, Path]:
    """Write mitosis demo slides, their sample sheet `samples.tsv` and `annotations.csv`; return both paths.

    Every slide is its own case (`case` = slide id); `domain` is the slide's staining/scanner style. The
    annotations are the figures' centres in level-0 px, labelled `mitotic_figure` or `hard_negative`.
    """
    from histodistill.errors import ConfigError

    unknown = [d for d in domains if d not in MITOSIS_DOMAINS]
    if unknown:
        raise ConfigError(
            f"unknown mitosis demo domain {unknown[0]!r}; choose from {sorted(MITOSIS_DOMAINS)}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet_rows, ann_rows = ["slide_id\tpath\tcohort"], ["slide_id,x,y,label,domain,case"]
    for domain in domains:
        for i in range(n_slides_per_domain):
            slide_id = f"{domain}_{i:02d}"
            pixels, annotations = render_mitosis_slide(spec, seed_for(f"mitosis:{slide_id}", seed), domain)
            path = out_dir / f"{slide_id}.tiff"
            write_pyramid_tiff(pixels, path, spec.mpp, spec.levels)
            sheet_rows.append(f"{slide_id}\t{path.resolve()}\t{cohort}")
            ann_rows += [f"{slide_id},{x:g},{y:g},{label},{domain},{slide_id}" for x, y, label in annotations]
    sheet, table = out_dir / "samples.tsv", out_dir / "annotations.csv"
    with atomic_path(sheet) as tmp:
        tmp.write_text("\n".join(sheet_rows) + "\n")
    with atomic_path(table) as tmp:
        tmp.write_text("\n".join(ann_rows) + "\n")
    return sheet, table
