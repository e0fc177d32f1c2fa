"""ScoreNet's data: ROI images of any size listed in a manifest, and the demo's synthetic ROIs.

**Manifest** (CSV): `path, label, split` (+ optional `region_y0, region_x0, region_y1, region_x1`: the
pixel box of the pattern that decides the class, which the benchmark uses to score where the scorer looks).
`path` is absolute or relative to the manifest's folder; `label` any string (classes are sorted); `split`
∈ {train, val, test}. Images are read at their native µm/px (`histodistill.images.read_image_rgb`) and
downscaled by the model only for the scorer.

**Published layouts** (no files in this repository; `roi_manifest` writes the manifest of either):
- BRACS (Brancati et al. 2022; the ScoreNet README's layout): `BRACS_RoI/<version>/{train,val,test}/
  <class>/*.png`, seven classes `0_N, 1_PB, 2_UDH, 3_ADH, 4_FEA, 5_DCIS, 6_IC`, ROIs of ~ 0.25 µm/px
  (40×), from a few hundred to over 10,000 px per side.
- BACH (Aresta et al. 2019, ICIAR 2018 part A): `ICIAR2018_BACH_Challenge/Photos/<class>/*.tif`, four
  classes `Benign, InSitu, Invasive, Normal`, 2048 × 1536 px at 0.42 µm/px; no official split (ScoreNet
  uses its own folds): `roi_manifest` assigns a seeded split by image.

**Demo** (`make_demo_rois`): ROIs of varied size (whole multiples of `region_px`) cut from one synthetic H&E
field (`histodistill.demo.slides`, at 0.5 µm/px, the demo student's tile scale), each with a cluster of
nuclei inside a single, randomly chosen region with tissue: small hyperchromatic nuclei (class
`hyperchromatic`) or large pale vesicular ones (class `vesicular`), the same number, their stain density set
so that both absorb the same light. The cluster darkens its region in a low-resolution view in both classes
(the scorer can localise it); which kind it is shows in the nuclei's size and density at full resolution.
The earlier demo's decisive pattern, mitotic figures vs look-alikes at 0.25 µm/px, was invisible to the demo
student (a linear probe on its embedding of the decisive region: 0.44 accuracy), so no selection could help.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError

SPLITS = ("train", "val", "test")
BOX = ("region_y0", "region_x0", "region_y1", "region_x1")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """The manifest as a frame with absolute `path`s; BenchmarkError naming the file for a missing column,
    an unknown split, a missing image, or no train or no test row."""
    path = Path(path)
    frame = pd.read_csv(path)
    missing = sorted({"path", "label", "split"} - set(frame.columns))
    if missing:
        raise BenchmarkError(f"ROI manifest {path} lacks column(s) {missing} (needs path, label, split)")
    bad = sorted(set(frame["split"]) - set(SPLITS))
    if bad:
        raise BenchmarkError(f"ROI manifest {path}: unknown split(s) {bad}; use {SPLITS}")
    frame["path"] = [str(p if Path(p).is_absolute() else path.parent / p) for p in frame["path"]]
    absent = [p for p in frame["path"] if not Path(p).is_file()]
    if absent:
        raise BenchmarkError(f"ROI manifest {path}: {len(absent)} image(s) missing, e.g. {absent[0]}")
    for split in ("train", "test"):
        if not (frame["split"] == split).any():
            raise BenchmarkError(f"ROI manifest {path} has no {split!r} rows")
    frame["label"] = frame["label"].astype(str)
    return frame


def roi_manifest(
    root: str | os.PathLike, layout: str, out: str | os.PathLike, seed: int = 0, test_fraction: float = 0.2
) -> pd.DataFrame:
    """Write the manifest of a BRACS or BACH folder (`layout` "bracs" | "bach"; module docstring), atomically.

    BRACS' split is its folders; BACH's is a seeded draw of `test_fraction` of the images per class for test,
    as many for val. Raises BenchmarkError for an unknown layout or a folder without images.
    """
    from histodistill.atomic import atomic_path

    root = Path(root)
    rows = []
    if layout == "bracs":
        for split in SPLITS:
            for image in sorted((root / split).glob("*/*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append({"path": str(image), "label": image.parent.name, "split": split})
    elif layout == "bach":
        rng = np.random.default_rng(seed)
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            order = rng.permutation(len(images))
            n_test = round(test_fraction * len(images))
            for rank, i in enumerate(order):
                split = "test" if rank < n_test else "val" if rank < 2 * n_test else "train"
                rows.append({"path": str(images[i]), "label": folder.name, "split": split})
    else:
        raise BenchmarkError(f"unknown ROI layout {layout!r}: use 'bracs' or 'bach'")
    if not rows:
        raise BenchmarkError(f"no ROI images under {root} in the {layout} layout (see bench.scorenet.data)")
    frame = pd.DataFrame(rows)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


@dataclass(frozen=True)
class ScoreNetDemoConfig:
    """The demo ROIs: `n_rois` ROIs of (rows, cols) regions drawn from `grids`, regions of `region_px` at
    `mpp` µm/px, cut from one synthetic field of `field_px` (width, height); each ROI has, in one region with
    tissue, a cluster of `n_nuclei` nuclei within `cluster_um` of its centre: small dark nuclei of semi-axis
    `small_um` and haematoxylin OD `small_od` (class `hyperchromatic`) or large pale ones of `large_um` whose
    OD absorbs the same light per nucleus-covered region (class `vesicular`); `test_fraction` of the ROIs are
    test, `val_fraction` val (uncompressed TIFFs)."""

    n_rois: int = 96
    region_px: int = 224
    grids: tuple[tuple[int, int], ...] = ((3, 3), (3, 4), (4, 3), (4, 4))
    mpp: float = 0.5
    field_px: tuple[int, int] = (1344, 1120)
    n_nuclei: int = 60
    cluster_um: float = 40.0
    small_um: float = 2.5
    large_um: float = 5.0
    small_od: float = 2.0
    test_fraction: float = 0.333
    val_fraction: float = 0.0


CLASSES = ("hyperchromatic", "vesicular")
_MIN_TISSUE = 0.6  # the decisive region is one with at least this tissue fraction


def _cluster(rng: np.random.Generator, c: ScoreNetDemoConfig, vesicular: bool, od_large: float) -> np.ndarray:
    """Haematoxylin OD [region_px, region_px] of one cluster of nuclei (rotated ellipses, blurred 0.6 µm as the
    generator's nuclei), centred at random in the region so that the cluster stays inside it."""
    from PIL import Image, ImageDraw
    from scipy.ndimage import gaussian_filter

    from histodistill.demo.slides import ellipse

    um, p = 1.0 / c.mpp, c.region_px
    radius, od = (c.large_um, od_large) if vesicular else (c.small_um, c.small_od)
    scale = 255.0 / max(c.small_od, od_large)
    reach = (c.cluster_um + 1.2 * c.large_um) * um
    if 2 * reach > p:
        raise BenchmarkError(f"ScoreNet demo: a {c.cluster_um} µm cluster does not fit a {p} px region")
    centre = p / 2 + rng.uniform(-1, 1, 2) * (p / 2 - reach)
    canvas = Image.new("L", (p, p), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(c.n_nuclei):
        r, t = c.cluster_um * um * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        a = radius * um * rng.uniform(0.85, 1.15)
        x, y = centre + r * np.array([np.cos(t), np.sin(t)])
        draw.polygon(
            ellipse(x, y, a, a * rng.uniform(0.7, 0.95), rng.uniform(0, np.pi)), fill=round(od * scale)
        )
    return gaussian_filter(np.asarray(canvas, np.float32) / scale, 0.6 * um)


def _absorbed(hema: np.ndarray) -> float:
    """Light a haematoxylin OD map absorbs (Beer–Lambert as the generator's: Σ over pixels and channels of
    1 − e^(−2.3·h·HEMATOXYLIN))."""
    from histodistill.demo.slides import HEMATOXYLIN

    return float((1 - np.exp(-2.3 * hema[..., None] * HEMATOXYLIN)).sum())


def matched_large_od(config: ScoreNetDemoConfig, seed: int = 0, n_draws: int = 4) -> float:
    """The vesicular nuclei's OD at which a vesicular cluster absorbs, on average over `n_draws` seeded
    clusters, the light a hyperchromatic one does (bisection to 1e-3 on [0, small_od]). Overlaps between the
    large nuclei and the blur make the closed form π r_s²(1 − e^(−k h_s)) = π r_l²(1 − e^(−k h_l)) absorb
    ~57% as much at the defaults, a cue a low-resolution view could use."""
    c = config
    target = np.mean(
        [_absorbed(_cluster(np.random.default_rng([seed, d]), c, False, 0.0)) for d in range(n_draws)]
    )
    lo, hi = 0.0, c.small_od
    while hi - lo > 1e-3:
        od = (lo + hi) / 2
        got = np.mean(
            [_absorbed(_cluster(np.random.default_rng([seed, d]), c, True, od)) for d in range(n_draws)]
        )
        lo, hi = (od, hi) if got < target else (lo, od)
    return (lo + hi) / 2


def make_demo_rois(
    out_dir: str | os.PathLike, seed: int = 0, config: ScoreNetDemoConfig | None = None
) -> pd.DataFrame:
    """Write the demo ROIs (module docstring) as TIFFs and `manifest.csv` (with the decisive boxes) into
    `out_dir`, atomically; return the manifest. Classes alternate, so both are equally frequent.

    The two classes hold the same number of nuclei in the same kind of cluster, and the vesicular nuclei's OD
    is `matched_large_od`: a cluster absorbs the same light in both classes, so it darkens its region equally
    (the scorer can find it, not tell which), while the class is in the nuclei's size and stain density
    (what the fine encoder sees).
    """
    import tifffile

    from histodistill.atomic import atomic_path
    from histodistill.demo.slides import (
        BACKGROUND_RGB,
        EOSIN,
        HEMATOXYLIN,
        DemoSlideConfig,
        render_tissue_maps,
    )

    c = config or ScoreNetDemoConfig()
    rng = np.random.default_rng(seed)
    maps = render_tissue_maps(DemoSlideConfig(c.field_px[0], c.field_px[1], c.mpp, levels=1), seed)
    od_large = matched_large_od(c, seed)
    density = maps.hema[..., None] * HEMATOXYLIN + maps.eosin[..., None] * EOSIN
    field = BACKGROUND_RGB * np.exp(-2.3 * density)  # compose_rgb without its noise, which is added last
    p = c.region_px
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for i in range(c.n_rois):
            n_h, n_w = c.grids[int(rng.integers(len(c.grids)))]
            h, w = n_h * p, n_w * p
            if h > field.shape[0] or w > field.shape[1]:
                raise BenchmarkError(f"demo ROI {h}×{w} px does not fit the {c.field_px} px field")
            for _ in range(1000):
                y, x = int(rng.integers(field.shape[0] - h + 1)), int(rng.integers(field.shape[1] - w + 1))
                tissue = maps.tissue[y : y + h, x : x + w].reshape(n_h, p, n_w, p).mean(axis=(1, 3)).ravel()
                if (tissue >= _MIN_TISSUE).any():
                    break
            else:
                raise BenchmarkError("ScoreNet demo: no ROI with a tissue region in the field")
            label = CLASSES[i % 2]
            r = int(rng.choice(np.flatnonzero(tissue >= _MIN_TISSUE)))
            row, col = divmod(r, n_w)
            hema = _cluster(rng, c, label == "vesicular", od_large)
            rgb = field[y : y + h, x : x + w].copy()
            rgb[row * p : (row + 1) * p, col * p : (col + 1) * p] *= np.exp(
                -2.3 * hema[..., None] * HEMATOXYLIN
            )
            rgb += maps.noise[y : y + h, x : x + w]
            if rng.random() < 0.5:
                rgb, row = rgb[::-1], n_h - 1 - row
            pixels = np.clip(rgb, 0, 255).astype(np.uint8)
            name = f"roi_{i:03d}.tif"
            tifffile.imwrite(tmp / name, pixels, photometric="rgb")  # uncompressed: PNG of noise costs 0.5 s
            rows.append(
                {
                    "path": name,
                    "label": label,
                    "region_y0": row * p,
                    "region_x0": col * p,
                    "region_y1": (row + 1) * p,
                    "region_x1": (col + 1) * p,
                }
            )
        frame = pd.DataFrame(rows)
        order = rng.permutation(len(frame))
        n_test, n_val = round(c.test_fraction * len(frame)), round(c.val_fraction * len(frame))
        split = np.array(["train"] * len(frame), dtype=object)
        split[order[:n_test]] = "test"
        split[order[n_test : n_test + n_val]] = "val"
        frame.insert(2, "split", split)
        frame.to_csv(tmp / "manifest.csv", index=False)
    return frame
