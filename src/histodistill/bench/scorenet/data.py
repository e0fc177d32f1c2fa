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
field (`histodistill.demo.slides`), each with a small cluster of `n_figures` figures inside a single,
randomly chosen region: mitotic figures (class `mitotic`) or their look-alikes, pyknotic nuclei and
apoptotic bodies (class `lookalike`) — the figures of the mitosis demo (`histodistill.demo.mitosis`). At the
scorer's resolution (s = 14: a 10 µm figure is 3 px) both clusters are dark specks; only the fine encoder
sees which kind they are, so the class needs the scorer to point at the right region.
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
    `mpp` µm/px, cut from one synthetic field of `field_px` (width, height); `n_figures` figures per ROI (uncompressed TIFFs);
    `test_fraction` of the ROIs are test, `val_fraction` val."""

    n_rois: int = 48
    region_px: int = 224
    grids: tuple[tuple[int, int], ...] = ((3, 3), (3, 4), (4, 3))
    mpp: float = 0.25
    field_px: tuple[int, int] = (1344, 1120)
    n_figures: int = 3
    test_fraction: float = 0.375
    val_fraction: float = 0.0


CLASSES = ("lookalike", "mitotic")


def make_demo_rois(
    out_dir: str | os.PathLike, seed: int = 0, config: ScoreNetDemoConfig | None = None
) -> pd.DataFrame:
    """Write the demo ROIs (module docstring) as PNGs and `manifest.csv` (with the decisive boxes) into
    `out_dir`, atomically; return the manifest. Classes alternate, so both are equally frequent."""
    import tifffile

    from histodistill.atomic import atomic_path
    from histodistill.demo.mitosis import _hard_negative, _mitotic_figure
    from histodistill.demo.slides import (
        BACKGROUND_RGB,
        EOSIN,
        HEMATOXYLIN,
        DemoSlideConfig,
        compose_rgb,
        render_tissue_maps,
    )

    c = config or ScoreNetDemoConfig()
    rng = np.random.default_rng(seed)
    um = 1.0 / c.mpp
    field = compose_rgb(
        render_tissue_maps(DemoSlideConfig(c.field_px[0], c.field_px[1], c.mpp, levels=1), seed)
    )
    field_od = -np.log(np.maximum(field.astype(np.float32), 1.0) / BACKGROUND_RGB)
    size = int(24 * um) | 1
    half = size // 2
    rows = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for i in range(c.n_rois):
            n_h, n_w = c.grids[int(rng.integers(len(c.grids)))]
            h, w = n_h * c.region_px, n_w * c.region_px
            if h > field_od.shape[0] or w > field_od.shape[1]:
                raise BenchmarkError(f"demo ROI {h}×{w} px does not fit the {c.field_px} px field")
            y, x = int(rng.integers(field_od.shape[0] - h + 1)), int(rng.integers(field_od.shape[1] - w + 1))
            od = field_od[y : y + h, x : x + w].copy()
            if rng.random() < 0.5:
                od = od[::-1].copy()
            label = CLASSES[i % 2]
            r, col = int(rng.integers(n_h)), int(rng.integers(n_w))
            y0, x0 = r * c.region_px, col * c.region_px
            # figure centres inside the region, at least half a figure window from its border
            ys = rng.integers(y0 + half, y0 + c.region_px - half, c.n_figures)
            xs = rng.integers(x0 + half, x0 + c.region_px - half, c.n_figures)
            for cy, cx in zip(ys, xs, strict=True):
                window = (slice(cy - half, cy - half + size), slice(cx - half, cx - half + size))
                if label == "mitotic":
                    hema, halo = _mitotic_figure(rng, um, size)
                    od[window] *= 1 - 0.65 * halo[..., None]
                    od[window] += hema[..., None] * HEMATOXYLIN
                else:
                    hema, eosin = _hard_negative(rng, um, size)
                    cleared = np.clip(hema / 1.5, 0, 1)[..., None]
                    od[window] = (
                        od[window] * (1 - cleared) + hema[..., None] * HEMATOXYLIN + eosin[..., None] * EOSIN
                    )
            noise = rng.normal(0.0, 2.0, od.shape[:2] + (1,)).astype(np.float32)
            pixels = np.clip(BACKGROUND_RGB * np.exp(-od) + noise, 0, 255).astype(np.uint8)
            name = f"roi_{i:03d}.tif"
            tifffile.imwrite(tmp / name, pixels, photometric="rgb")  # uncompressed: PNG of noise costs 0.5 s
            rows.append(
                {
                    "path": name,
                    "label": label,
                    "region_y0": y0,
                    "region_x0": x0,
                    "region_y1": y0 + c.region_px,
                    "region_x1": x0 + c.region_px,
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
