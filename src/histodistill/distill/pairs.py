"""Paired views for distillation: the teacher sees the rich input, the student the routine one.

Farndale et al., "More From Less: Self-Supervised Knowledge Distillation for Routine Histopathology Data"
pair *different* inputs in the two branches. A pair here is (teacher-side image, student-side image) of one
tile row of the tile store, from one of these sources (`PairingConfig.source`, the run's `pairing` setting):

- `registered`: matched tiles of registered slides. The tile store is a matched-tile store ([slide, tile,
  H, W, 3], `histodistill.matched_tiles`: PLISM's scanners × stainings, or any registered pair such as an
  H&E section and its IHC/IF restain). The teacher side is the reference slide's row (`reference`, default
  the store's PLISM reference, else its first slide), the student side the same tile of another slide
  (`slides`, default all others), drawn per (seed, row, epoch); `slides: [<reference>]` is the unpaired
  control on the same rows (the student sees the reference tile). Only the reference slide's rows train,
  minus the held-out tissues' (`tissue_holdout`: plism.tissue_holdout, `histodistill.holdout`).
- `context`: the student sees the centre crop of `crop_fraction` of the tile's side, zero padded back to
  the tile's size (so its pixels stay where they were); the teacher the full tile (the seed's "wider
  context" pair).
- `downsample`: the student sees the tile shrunk to `downsample_px` (antialiased bilinear) and brought back
  to full size (bilinear); the teacher the full resolution (the seed's 7×7 pair).
- `mask`: the student sees a label mask of the tile rendered as grey (0 background → 0, 1 tissue → 128,
  2 nucleus → 255, all three channels); the teacher the tile (the seed's nuclear-segmentation pair). Masks
  come from a mask store (`mask_dir`, documented in `read_mask_tile`).

Geometry. The teacher cache stores, per tile and view, the view's parameters (`augment.py`: crop box,
flip, colour ops). Every source above keeps the paired image on the tile's pixel grid, so the student's
view is rendered from the paired image with the *same* stored parameters as the teacher's cached view: both
branches see the same tissue at the same place and only the photometric or modality difference remains.
A mask is rendered with the geometric parameters only (`geometric_params`: a label image has no colour).
`symmetric` gives both branches the student-side image (the seed's symmetric pairs; it needs a teacher
that is run on the fly: online or co-trained).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from histodistill.augment import VIEW_FIELDS
from histodistill.errors import HistodistillError
from histodistill.holdout import TissueHoldoutConfig, held_out_positions

PAIR_SOURCES = ("none", "registered", "context", "downsample", "mask")
MASK_GREY = np.array([0, 128, 255], np.uint8)  # label 0 background, 1 tissue, 2 nucleus
PHOTOMETRIC_FIELDS = ("jitter", "grayscale", "blur_sigma", "solarize", "hed")


@dataclass(frozen=True)
class PairingConfig:
    """A run's pairing (the `pairing` mapping of distill.runs.<run>; unset keys take these defaults).

    source: one of PAIR_SOURCES (`none`: the student sees the teacher's image, unpaired distillation).
    symmetric: both branches see the student-side image (seed: symmetric pairs) instead of teacher side =
        rich, student side = routine (asymmetric).
    crop_fraction: `context`: side of the centre crop the student sees, as a fraction of the tile (0–1).
    downsample_px: `downsample`: side (px) the student's image is shrunk to (the seed: 7).
    reference: `registered`: slide id of the teacher side (None: the store's PLISM reference, else slide 0).
    slides: `registered`: slide ids of the student side (empty: every slide but the reference).
    mask_dir: `mask`: the mask store (see `read_mask_tile`).
    tissue_holdout: `registered`: the plism.tissue_holdout mapping (`histodistill.holdout`); the held-out
        tissues' tiles never train (the positions come from the store's own index, with the same function
        that restricts `score_plism` to them).
    """

    source: str = "none"
    symmetric: bool = False
    crop_fraction: float = 0.5
    downsample_px: int = 7
    reference: str | None = None
    slides: tuple[str, ...] = ()
    mask_dir: str | None = None
    tissue_holdout: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, params: dict[str, Any] | None) -> PairingConfig:
        """A run's `pairing` mapping → PairingConfig. HistodistillError naming unknown keys, an unknown
        source, a crop_fraction outside (0, 1], a downsample_px < 1, or `mask` without `mask_dir`."""
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise HistodistillError(f"pairing has no key(s) {unknown} (it takes: {sorted(known)})")
        if "slides" in params:
            params["slides"] = tuple(params["slides"])
        cfg = cls(**params)
        if cfg.source not in PAIR_SOURCES:
            raise HistodistillError(f"pairing.source must be one of {PAIR_SOURCES}, not {cfg.source!r}")
        if not 0 < cfg.crop_fraction <= 1:
            raise HistodistillError(f"pairing.crop_fraction must lie in (0, 1], not {cfg.crop_fraction}")
        if cfg.downsample_px < 1:
            raise HistodistillError(f"pairing.downsample_px must be ≥ 1, not {cfg.downsample_px}")
        if cfg.source == "mask" and not cfg.mask_dir:
            raise HistodistillError("pairing.source mask needs pairing.mask_dir (the mask store)")
        if cfg.tissue_holdout.get("method", "none") != "none" and cfg.source != "registered":
            raise HistodistillError(
                "pairing.tissue_holdout (held-out tissues) applies to source registered only"
            )
        return cfg


def context_image(tile: np.ndarray, crop_fraction: float) -> np.ndarray:
    """The centre crop of `crop_fraction` of the side of a uint8 [H, W, 3] tile, zero padded back to
    [H, W, 3] in place (pixels keep their coordinates; the seed's "patch with its context" pair)."""
    h, w = tile.shape[:2]
    ch, cw = max(1, round(h * crop_fraction)), max(1, round(w * crop_fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = np.zeros_like(tile)
    out[top : top + ch, left : left + cw] = tile[top : top + ch, left : left + cw]
    return out


def downsample_image(tile: np.ndarray, px: int) -> np.ndarray:
    """A uint8 [H, W, 3] tile shrunk to [px, px] (antialiased bilinear) and resized back to [H, W]
    (bilinear): the seed's low-resolution pair. torchvision's functional resize."""
    x = torch.as_tensor(np.asarray(tile)).permute(2, 0, 1)
    small = F.resize(x, [px, px], interpolation=InterpolationMode.BILINEAR, antialias=True)
    back = F.resize(small, list(tile.shape[:2]), interpolation=InterpolationMode.BILINEAR, antialias=False)
    return back.permute(1, 2, 0).numpy()


def mask_image(labels: np.ndarray) -> np.ndarray:
    """uint8 labels [H, W] (0 background, 1 tissue, 2 nucleus) → uint8 grey RGB [H, W, 3] (`MASK_GREY`).
    HistodistillError for a label above 2."""
    if labels.size and int(labels.max()) > 2:
        raise HistodistillError(
            f"mask label {int(labels.max())} is not 0, 1 or 2 (background, tissue, nucleus)"
        )
    return np.repeat(MASK_GREY[labels][..., None], 3, axis=2)


def geometric_params(params: np.ndarray) -> np.ndarray:
    """View parameters with the photometric operations off (crop box, output size and flip kept)."""
    out = np.array(params, dtype=np.float64, copy=True)
    for name in PHOTOMETRIC_FIELDS:
        out[..., VIEW_FIELDS.index(name)] = 0
    return out


@lru_cache(maxsize=64)
def _mask_slide(path: str):
    from histodistill.masks import MaskSlide

    return MaskSlide(path)


def mask_path(mask_dir: str | Path, slide_id: str) -> Path:
    """The mask file of a slide in a mask store: `{mask_dir}/{slide_id}.tiff`."""
    return Path(mask_dir) / f"{slide_id}.tiff"


def read_mask_tile(path: str | Path, x0: int, y0: int, size0: int, tile_px: int) -> np.ndarray:
    """The labels of one tile from a mask file: uint8 [tile_px, tile_px].

    Mask store layout (`histodistill.masks`, which reads it; the demo writes it with rule `demo_mask`): one
    single-channel uint8 label TIFF per slide, `{mask_dir}/{slide_id}.tiff` (`mask_dir` = the store's
    `masks/{cohort}`), on the slide's level-0 pixel grid, labels 0 background, 1 tissue, 2 nucleus. The
    tile is the level-0 square of side `size0` px at (x0, y0) (the tile store's index and footprint),
    resized to `tile_px` by nearest neighbour (labels are not blended); pixels beyond the mask's edge are
    background. HistodistillError for a missing file; SlideError (from `MaskSlide`) for a mask that is not
    one channel of uint8.
    """
    path = Path(path)
    if not path.is_file():
        raise HistodistillError(
            f"mask file not found: {path} (the mask store holds one <slide_id>.tiff per slide)"
        )
    labels = _mask_slide(str(path)).read(x0, y0, size0, 0)
    if size0 == tile_px:
        return labels
    return np.asarray(Image.fromarray(labels).resize((tile_px, tile_px), Image.Resampling.NEAREST))


class PairSource:
    """The student-side image of each tile row of a tile store, for one run's pairing.

    `rows()`: the rows that may train (all rows; `registered`: the reference slide's). `student_image(store,
    row, tile, epoch)`: the uint8 [H, W, 3] student-side image of `row` (whose teacher-side pixels are
    `tile`), one extra tile read for `registered` and `mask`, none for `context` and `downsample`.
    `render_params(params)`: the view parameters the student-side image is rendered with (the cached view's
    own; geometric only for masks). Picklable: DataLoader workers rebuild nothing but their file handles.

    HistodistillError for a `registered` pairing on a store that is not a matched-tile store, or whose
    `reference`/`slides` are not slides of the store.
    """

    def __init__(self, cfg: PairingConfig, store, seed: int):
        self.cfg, self.seed = cfg, seed
        slides = [s["slide_id"] for s in store.attrs["slides"]]
        self.n_rows = len(store)
        if cfg.source == "registered":
            if store.per_slide is None:
                raise HistodistillError(
                    f"pairing registered needs a matched-tile store ([slide, tile, H, W, 3]), {store.path} is "
                    "a cohort store: distil on the PLISM matched tiles (results/plism/tiles.zarr) or another "
                    "registered set"
                )
            ref = cfg.reference or (store.attrs.get("plism") or {}).get("reference") or slides[0]
            others = list(cfg.slides) or [s for s in slides if s != ref]
            missing = sorted({ref, *others} - set(slides))
            if missing:
                raise HistodistillError(
                    f"pairing: slide(s) {missing} are not in {store.path} (it has {slides})"
                )
            self.per_slide = store.per_slide
            self.reference = slides.index(ref)
            self.students = np.array([slides.index(s) for s in others])
            self.excluded = np.zeros(0, np.int64)
            holdout = TissueHoldoutConfig.parse(cfg.tissue_holdout)
            if holdout.method != "none":  # the held-out tissues' tiles, on the store's reference grid
                index = pd.DataFrame({k: store.root[k][: self.per_slide] for k in ("tile_id", "x0", "y0")})
                self.excluded = held_out_positions(index.assign(slide_id=slides[0]), holdout)[0]
        if cfg.source == "mask":
            self.slide_ids = slides
            self.tile_px = int(store.attrs["tile_px"])
            self.footprint0 = [
                round(self.tile_px * float(store.attrs["mpp"]) / float(s["slide_mpp"]))
                for s in store.attrs["slides"]
            ]

    def rows(self) -> np.ndarray:
        """Rows whose tile may be a teacher-side sample (sorted int64)."""
        if self.cfg.source == "registered":
            keep = np.setdiff1d(np.arange(self.per_slide), self.excluded)
            return (self.reference * self.per_slide + keep).astype(np.int64)
        return np.arange(self.n_rows, dtype=np.int64)

    def student_slide(self, row: int, epoch: int) -> int:
        """`registered`: the student-side slide index of (row, epoch), a seeded draw (no RNG state)."""
        draw = np.random.default_rng([self.seed, int(row), int(epoch), 0x9A1]).integers(len(self.students))
        return int(self.students[draw])

    def student_image(
        self, store, index: dict[str, np.ndarray], row: int, tile: np.ndarray, epoch: int
    ) -> np.ndarray:
        """The student-side image of `row` (`index`: the store's slide_index, tile_id, x0, y0 arrays)."""
        source = self.cfg.source
        if source == "none":
            return tile
        if source == "context":
            return context_image(tile, self.cfg.crop_fraction)
        if source == "downsample":
            return downsample_image(tile, self.cfg.downsample_px)
        if source == "registered":
            tile_index = int(row) - self.reference * self.per_slide
            return store.tiles[self.student_slide(row, epoch), tile_index]
        slide = int(index["slide_index"][row])
        labels = read_mask_tile(
            mask_path(self.cfg.mask_dir, self.slide_ids[slide]),
            int(index["x0"][row]),
            int(index["y0"][row]),
            self.footprint0[slide],
            self.tile_px,
        )
        return mask_image(labels)

    def render_params(self, params: np.ndarray) -> np.ndarray:
        return geometric_params(params) if self.cfg.source == "mask" else params
