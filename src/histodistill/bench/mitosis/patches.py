"""Patches centred on level-0 points at the protocol's µm/px, read through `histodistill.slides`, and the
patch store: every annotation's centred patch in a tile store, so the `embed` rule embeds them (dataset
`mitosis`) like any cohort.

Patches are `patch_px` (224) pixels at `mpp` (0.25 µm/px, the published sets' native resolution) centred on
the point, read from the best pyramid level (`slides.best_level`, `slides.read_rgb`) and resized (a slide up
to 10% coarser than `mpp` is upsampled: MIDOG's GT450 scans at 0.26 µm/px); pixels outside the slide are
white. Random tissue patches (the LoRA sampler's third kind) are placed on `tissue.tissue_mask` of a
thumbnail read by `slides.read_scaled`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from PIL import Image

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.data import read_dataset
from histodistill.errors import SlideError
from histodistill.provenance import provenance
from histodistill.slides import best_level, checked_mpp, open_slide, read_rgb, read_scaled
from histodistill.tilestore import create_tiles_array, write_index
from histodistill.tissue import MaskConfig, tissue_mask

log = logging.getLogger(__name__)

UPSAMPLE_TOLERANCE = 0.10  # a slide at most 10% coarser than the target µm/px is upsampled, not refused


@dataclass(frozen=True)
class _Geometry:
    level: int
    footprint0: float  # patch side in level-0 px
    read_px: int  # patch side at `level`
    width0: int
    height0: int
    mpp: float  # slide µm/px (level 0)
    mpp_source: str  # where that µm/px came from (slides.Mpp.source)


class PatchReader:
    """Reads patches centred on level-0 points at a target µm/px, each patch on its own (bounded memory).

    `slides` maps slide id → path, `slide_mpps` slide id → µm/px override (None or absent: the slide's
    own, as `slides.resolve_mpp` finds it); patches are `patch_px` square at `mpp` µm/px; random tissue
    points come from a mask at `mask_mpp` µm/px. Slides are opened lazily and kept open (a handle costs
    little; pixels are never cached), so a sampler can read batches from many slides without reopening
    them. Use as a context manager.
    """

    def __init__(
        self,
        slides: Mapping[str, str | os.PathLike],
        slide_mpps: Mapping[str, float | None] | None = None,
        patch_px: int = 224,
        mpp: float = 0.25,
        mask_mpp: float = 4.0,
    ):
        self.slides = {str(k): Path(v) for k, v in slides.items()}
        self.slide_mpps = dict(slide_mpps or {})
        self.patch_px = int(patch_px)
        self.mpp = float(mpp)
        self.mask_mpp = float(mask_mpp)
        self._open: dict[str, Any] = {}
        self._geometry: dict[str, _Geometry] = {}
        self._tissue: dict[str, tuple[np.ndarray, float]] = {}

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()

    def _slide(self, slide_id: str):
        if slide_id not in self._open:
            if slide_id not in self.slides:
                raise BenchmarkError(f"slide {slide_id!r} is annotated but not in the sample sheet")
            self._open[slide_id] = open_slide(self.slides[slide_id])
        return self._open[slide_id]

    def geometry(self, slide_id: str) -> _Geometry:
        """Pyramid level, level-0 footprint (px) and read size (px at that level) of a patch on this slide."""
        if slide_id not in self._geometry:
            slide = self._slide(slide_id)
            name = f"slide '{slide_id}' ({self.slides[slide_id]})"
            resolved = checked_mpp(slide, self.slide_mpps.get(slide_id), slide_name=name)
            mpp = resolved.mean
            if mpp > self.mpp * (1 + UPSAMPLE_TOLERANCE):
                raise SlideError(
                    f"{name}: scanned at {mpp:g} µm/px, more than {UPSAMPLE_TOLERANCE:.0%} coarser than the "
                    f"benchmark's {self.mpp:g} µm/px; patches would be upsampled. Lower the resolution "
                    "(mitosis.mpp) or leave the slide out."
                )
            level = best_level(slide, mpp, self.mpp)
            footprint0 = self.patch_px * self.mpp / mpp
            read_px = max(1, round(footprint0 / slide.level_downsamples[level]))
            width0, height0 = slide.dimensions
            self._geometry[slide_id] = _Geometry(
                level, footprint0, read_px, width0, height0, mpp, resolved.source
            )
        return self._geometry[slide_id]

    def read(self, slide_id: str, points: np.ndarray) -> np.ndarray:
        """uint8 [n, patch_px, patch_px, 3] patches centred on level-0 points [n, 2] (x, y).

        Each patch is read alone from the best level (never the whole slide), then resized to `patch_px`.
        Raises BenchmarkError for a slide not given or a point outside the slide, SlideError for a slide
        scanned more than UPSAMPLE_TOLERANCE coarser than `mpp` (or unreadable), MppError without µm/px.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        g = self.geometry(slide_id)
        outside = np.flatnonzero(
            (points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] >= g.width0) | (points[:, 1] >= g.height0)
        )
        if outside.size:
            x, y = points[outside[0]]
            raise BenchmarkError(
                f"slide {slide_id!r}: point ({x:g}, {y:g}) lies outside the slide ({g.width0} x {g.height0} px)"
            )
        slide = self._slide(slide_id)
        out = np.empty((len(points), self.patch_px, self.patch_px, 3), np.uint8)
        for i, (x, y) in enumerate(points):
            x0, y0 = round(x - g.footprint0 / 2), round(y - g.footprint0 / 2)
            patch = read_rgb(slide, x0, y0, g.level, g.read_px, g.read_px)
            if g.read_px != self.patch_px:
                patch = np.asarray(
                    Image.fromarray(patch).resize((self.patch_px, self.patch_px), Image.Resampling.BILINEAR)
                )
            out[i] = patch
        return out

    def _tissue_pixels(self, slide_id: str) -> tuple[np.ndarray, float]:
        """Tissue pixel coordinates (row, col) of the slide's mask thumbnail and level-0 px per mask px."""
        if slide_id not in self._tissue:
            g = self.geometry(slide_id)
            mask_mpp = max(self.mask_mpp, g.mpp)
            thumb = read_scaled(self._slide(slide_id), g.mpp, mask_mpp)
            # The default clean-up sizes suit WSIs; on a small ROI (MIDOG, the demo) they would erase the
            # tissue, so objects/holes of 2% of the image area count too.
            area_um2 = g.width0 * g.height0 * g.mpp**2
            defaults = MaskConfig()
            params = MaskConfig(
                mask_mpp=mask_mpp,
                min_object_um2=min(defaults.min_object_um2, 0.02 * area_um2),
                min_hole_um2=min(defaults.min_hole_um2, 0.005 * area_um2),
            )
            mask = tissue_mask(thumb, params)
            if not mask.any():
                log.warning("slide %s: no tissue found; random patches come from the whole slide", slide_id)
                mask = np.ones_like(mask)
            self._tissue[slide_id] = (np.argwhere(mask), g.width0 / mask.shape[1])
        return self._tissue[slide_id]

    def random_points(
        self, slide_id: str, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """`n` level-0 points in tissue whose patches lie inside the slide and contain no `exclude` point."""
        g = self.geometry(slide_id)
        pixels, px0 = self._tissue_pixels(slide_id)
        half = g.footprint0 / 2
        exclude = np.zeros((0, 2)) if exclude is None else np.asarray(exclude, np.float64).reshape(-1, 2)
        found: list[np.ndarray] = []
        have = 0
        for _ in range(50):
            pick = pixels[rng.integers(0, len(pixels), size=4 * max(n, 8))]
            cand = (pick[:, ::-1] + rng.random((len(pick), 2))) * px0  # (x, y) level 0
            ok = (cand[:, 0] >= half) & (cand[:, 0] < g.width0 - half)
            ok &= (cand[:, 1] >= half) & (cand[:, 1] < g.height0 - half)
            if len(exclude):
                cheb = np.abs(cand[:, None, :] - exclude[None, :, :]).max(-1)
                ok &= (cheb > half).all(1)
            found.append(cand[ok])
            have += int(ok.sum())
            if have >= n:
                return np.concatenate(found)[:n]
        raise BenchmarkError(
            f"slide {slide_id!r}: cannot place {n} random tissue patches away from its {len(exclude)} "
            "annotations; the slide is too small or crowded for random patches"
        )


def iter_annotation_patches(
    reader: PatchReader, annotations: pd.DataFrame, rows: np.ndarray, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row positions, centred patches) in batches, slide by slide (bounded memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    slides = annotations["slide_id"].to_numpy()[rows]
    xy = annotations[["x", "y"]].to_numpy(dtype=np.float64)
    for slide_id in dict.fromkeys(slides.tolist()):
        mine = rows[slides == slide_id]
        for s in range(0, len(mine), batch_size):
            chunk = mine[s : s + batch_size]
            yield chunk, reader.read(slide_id, xy[chunk])


def pack_patch_store(
    samples: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    patch_px: int = 224,
    mpp: float = 0.25,
    chunk_tiles: int = 64,
) -> int:
    """Every annotation's centred patch → a tile store at `out`, row i = annotation row i; returns N.

    `samples` is the sample sheet (TSV) of the annotated slides, `annotations` their CSV (see
    `data.read_dataset`). The store is the one `histodistill.tilestore` writes (uint8 `tiles`
    [N, patch_px, patch_px, 3] and the index arrays: `tile_id` = annotation row, `x0`, `y0` = the patch's
    level-0 top-left corner, `level` = the level read), with attrs `tile_px`, `mpp`, `slides` and the
    provenance, so `histodistill.embed.extract_embeddings` embeds it as dataset `mitosis`. Rows are
    written in annotation order, `chunk_tiles` at a time (memory holds one chunk). Raises what
    `read_dataset` and `PatchReader.read` raise.
    """
    data = read_dataset(samples, annotations)
    table = data.annotations
    slide_ids = list(dict.fromkeys(table["slide_id"]))
    slide_of = table["slide_id"].map({s: i for i, s in enumerate(slide_ids)}).to_numpy(np.int32)
    xy = table[["x", "y"]].to_numpy(np.float64)
    n = len(table)
    with PatchReader(data.paths, data.mpps, patch_px, mpp) as reader:
        geometry = [reader.geometry(s) for s in slide_ids]
        footprint = np.array([g.footprint0 for g in geometry])[slide_of]
        index = {
            "slide_index": slide_of,
            "tile_id": np.arange(n, dtype=np.int64),
            "x0": np.round(xy[:, 0] - footprint / 2).astype(np.int64),
            "y0": np.round(xy[:, 1] - footprint / 2).astype(np.int64),
            "level": np.array([g.level for g in geometry], np.int32)[slide_of],
            "tissue_frac": np.full(n, np.nan, np.float32),
        }
        with atomic_path(out) as tmp:
            root = zarr.open_group(tmp, mode="w", zarr_format=3)
            tiles = create_tiles_array(root, (n,), patch_px, chunk_tiles)
            write_index(root, index)
            for start in range(0, n, chunk_tiles):
                rows = np.arange(start, min(n, start + chunk_tiles))
                tiles[rows[0] : rows[-1] + 1] = _read_rows(reader, table, rows)
            root.attrs.update(
                {
                    "tile_px": int(patch_px),
                    "mpp": float(mpp),
                    "n_tiles": n,
                    "slides": [
                        {
                            "slide_id": s,
                            "path": data.paths[s],
                            "slide_mpp": g.mpp,
                            "mpp_source": g.mpp_source,
                            "n_tiles": int((slide_of == i).sum()),
                        }
                        for i, (s, g) in enumerate(zip(slide_ids, geometry, strict=True))
                    ],
                    "provenance": provenance(
                        {"patch_px": int(patch_px), "mpp": float(mpp), "chunk_tiles": chunk_tiles},
                        samples=str(samples),
                        annotations=str(annotations),
                    ),
                }
            )
    log.info("%d annotated patches of %d slides → %s", n, len(slide_ids), out)
    return n


def _read_rows(reader: PatchReader, annotations: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """uint8 [len(rows), patch_px, patch_px, 3]: the centred patches of these annotation rows, in order."""
    out = np.empty((len(rows), reader.patch_px, reader.patch_px, 3), np.uint8)
    position = {int(r): i for i, r in enumerate(rows)}
    for chunk, patches in iter_annotation_patches(reader, annotations, rows, batch_size=len(rows)):
        out[[position[int(r)] for r in chunk]] = patches
    return out
