"""Mitosis demo slides: mitotic figures and look-alike hard negatives, in visually different domains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from histodistill.atomic import atomic_path
from histodistill.demo.slides import (
    BACKGROUND_RGB,
    EOSIN,
    HEMATOXYLIN,
    DemoSlideConfig,
    ellipse,
    render_tissue,
    restain,
    scan,
    seed_for,
    write_pyramid_tiff,
)

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
class MitosisDemoConfig:
    """Size of the demo slides and how many annotated figures each one holds."""

    width_px: int = 2048
    height_px: int = 1536
    mpp: float = 0.25
    levels: int = 3
    n_mitotic_figures: int = 12
    n_hard_negatives: int = 12
    min_spacing_um: float = 40.0  # between annotated figures: a patch never holds two of them


def _blobs(draw: ImageDraw.ImageDraw, centers: np.ndarray, radii: np.ndarray, value: int) -> None:
    for (x, y), r in zip(centers, radii, strict=True):
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
        centers = c + np.stack([r * np.cos(t), r * np.sin(t)], 1)
        bands = [centers]
    else:
        length, width = rng.uniform(7, 11) * um, rng.uniform(0.8, 1.5) * um
        offsets = [0.0] if kind == "metaphase" else [-rng.uniform(2.5, 4) * um, rng.uniform(2.5, 4) * um]
        bands = []
        for off in offsets:
            n = int(rng.integers(18, 26))
            s = rng.uniform(-length / 2, length / 2, n) * (0.7 if kind == "anaphase" else 1.0)
            w = rng.normal(0, width / 2, n) + off
            bands.append(c + s[:, None] * along + w[:, None] * across)
    for centers in bands:
        _blobs(draw, centers, rng.uniform(0.35, 0.8, len(centers)) * um, 255)
        # chromosome arms: short spikes leaving the plate in random directions
        for start in centers[rng.choice(len(centers), size=min(10, len(centers)), replace=False)]:
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
        draw.polygon(ellipse(c, c, a, a * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), n=48), fill=255)
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
    spec: MitosisDemoConfig, seed: int, domain: str
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Level-0 RGB of one mitosis demo slide in `domain` and its point annotations (x, y, label)."""
    rng = np.random.default_rng(seed)
    um = 1.0 / spec.mpp
    rgb = render_tissue(DemoSlideConfig(spec.width_px, spec.height_px, spec.mpp), seed)
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
    pixels = scan(restain(pixels, style["staining"]), {**style["scanner"], "mpp": spec.mpp})
    return pixels, annotations


def make_mitosis_demo(
    out_dir: str | Path,
    seed: int = 0,
    n_slides_per_domain: int = 3,
    domains: tuple[str, ...] = ("scanner_a", "scanner_b"),
    spec: MitosisDemoConfig = MitosisDemoConfig(),
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
