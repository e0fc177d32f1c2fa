"""PLISM matched tiles: the same tissue tiles, at the same physical place, cut from every scanner × staining.

Two sources give the same artifact:
- `slides`: the reference slide's tissue grid is mapped through each slide's elastix registration
  (`histodistill.registration`) and cut there, each tile resampled through the registration's local affine
  (so rotation and scale between scanners are undone) at the target µm/px;
- `h5`: the public pre-registered tiles (one HDF5 file per slide, value uint8 224×224×3). The key ends in
  `level_x_y`: plismbench (owkin/plism-benchmark `engine/extract/utils.py`, commit b4f32b7) parses a key as
  `key.split("_")[1:]` → three integers (level, x, y) after a leading field and sorts rows by (x, y); so both
  `{prefix}_level_x_y` (plismbench's form) and a bare `level_x_y` are read, rows sorted by (x, y) alike.

The artifact is a tile store (`histodistill.tilestore`) whose `tiles` array is [slide, tile, H, W, 3]
(row i is the same tissue in every slide; one shard per slide × `chunk_tiles` tiles, so slides are written
in parallel), plus a Parquet table with one row per slide × tile: slide_id, scanner, staining, tile_id,
x0, y0 (level-0 px of that slide), residual_um.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import zarr
from PIL import Image

from histodistill.atomic import atomic_path
from histodistill.config import PLISM_MANIFEST_COLUMNS as MANIFEST_COLUMNS  # noqa: F401 (re-exported)
from histodistill.config import read_plism_manifest as read_manifest  # noqa: F401 (re-exported)
from histodistill.errors import HistodistillError, SlideError
from histodistill.images import as_rgb8
from histodistill.provenance import provenance, read_parquet, write_parquet
from histodistill.registration import load_transform, map_points, tile_centers_um
from histodistill.slides import best_level, checked_mpp, open_slide, parse_mpp, read_rgb
from histodistill.tilestore import create_tiles_array, write_index
from histodistill.tiling import read_tile_table

log = logging.getLogger(__name__)

_TILE_ID = re.compile(r"^(?:[^_]+_)?(\d+)_(\d+)_(\d+)$")  # [prefix_]level_x_y, see the docstring


class PlismError(HistodistillError):
    """The PLISM manifest, a registration or the pre-registered tiles are unusable."""


@dataclass
class SlideJob:
    """What one worker needs to cut one slide's matched tiles."""

    index: int
    slide_id: str
    path: str
    slide_mpp: float | None
    transform_dir: str | None  # None: the reference itself (identity)


def local_frames(maps: list | None, centers_um: np.ndarray, half_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Map each tile centre into the moving slide, with the local linear part of the map (a 2×2 Jacobian).

    The Jacobian comes from mapping the centre nudged by half a tile along x and along y.
    """
    n = len(centers_um)
    if maps is None:
        return centers_um.copy(), np.tile(np.eye(2), (n, 1, 1))
    probes = np.concatenate([centers_um, centers_um + [half_um, 0.0], centers_um + [0.0, half_um]])
    mapped = map_points(maps, probes)
    c, px, py = mapped[:n], mapped[n : 2 * n], mapped[2 * n :]
    jac = np.stack([(px - c) / half_um, (py - c) / half_um], axis=2)  # columns: d/dx, d/dy
    return c, jac


def cut_tile(slide, slide_mpp: float, center_um, jac, tile_px: int, mpp: float) -> np.ndarray:
    """Resample one tile of `tile_px` at `mpp` µm/px centred at `centre_um` through the local map `jac`.

    Reads only the tile's bounding box at the best pyramid level, box-reduces it close to `mpp`, then applies
    the affine (bilinear). Pixel centres sit at +0.5 (PIL's convention).
    """
    level = best_level(slide, slide_mpp, mpp)
    level_mpp = slide_mpp * slide.level_downsamples[level]
    reduce = max(1, int(mpp / level_mpp + 1e-6))
    # output continuous (x, y) → level px: (centre + jac @ ((x, y) - tile_px/2) * mpp) / level_mpp
    lin = jac * mpp / level_mpp
    offset = np.asarray(center_um) / level_mpp - lin @ np.array([tile_px / 2, tile_px / 2])
    corners = np.array([[0, 0], [tile_px, 0], [0, tile_px], [tile_px, tile_px]], np.float64)
    spots = corners @ lin.T + offset
    lo = np.floor(spots.min(axis=0)).astype(int) - 2 * reduce
    hi = np.ceil(spots.max(axis=0)).astype(int) + 2 * reduce
    size = hi - lo
    size = size + (-size) % reduce
    downsample = slide.level_downsamples[level]
    region = read_rgb(slide, round(lo[0] * downsample), round(lo[1] * downsample), level, size[0], size[1])
    image = Image.fromarray(region)
    if reduce > 1:
        image = image.reduce(reduce)
    a = lin / reduce
    b = (offset - lo) / reduce
    data = (a[0, 0], a[0, 1], b[0], a[1, 0], a[1, 1], b[1])
    return np.asarray(
        image.transform((tile_px, tile_px), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    )


def _slide_mpp(slide, job: SlideJob) -> tuple[float, str]:
    mpp = checked_mpp(slide, job.slide_mpp, slide_name=f"PLISM slide '{job.slide_id}' ({job.path})")
    return mpp.mean, mpp.source


def _map_slide(job: SlideJob, centers_um: np.ndarray, half_um: float) -> dict:
    """Phase 1 for one slide: mapped centres, local frames, and which tiles lie inside the slide."""
    maps = load_transform(job.transform_dir) if job.transform_dir else None
    centers, jac = local_frames(maps, centers_um, half_um)
    with open_slide(job.path) as slide:
        slide_mpp, source = _slide_mpp(slide, job)
        width_um, height_um = (d * slide_mpp for d in slide.dimensions)
    reach = np.abs(jac).sum(axis=2) * half_um  # half extent of the tile's footprint along x and y
    inside = np.all((centers - reach >= 0) & (centers + reach <= [width_um, height_um]), axis=1)
    return {"centers": centers, "jac": jac, "inside": inside, "slide_mpp": slide_mpp, "mpp_source": source}


def _cut_slide(job: SlideJob, frames: dict, store: str, tile_px: int, mpp: float, chunk_tiles: int) -> None:
    """Phase 2 for one slide: cut every kept tile and write them into the slide's row of the store."""
    tiles = zarr.open_array(f"{store}/tiles", mode="r+")
    buffer = np.empty((chunk_tiles, tile_px, tile_px, 3), np.uint8)
    n = len(frames["centers"])
    with open_slide(job.path) as slide:
        for start in range(0, n, chunk_tiles):
            stop = min(n, start + chunk_tiles)
            for k, i in enumerate(range(start, stop)):
                buffer[k] = cut_tile(
                    slide, frames["slide_mpp"], frames["centers"][i], frames["jac"][i], tile_px, mpp
                )
            tiles[job.index, start:stop] = buffer[: stop - start]
    log.info("cut %d matched tiles from %s", n, job.slide_id)


def _create_store(tmp: Path, n_slides: int, n_tiles: int, tile_px: int, chunk_tiles: int, zstd_level: int):
    root = zarr.open_group(tmp, mode="w", zarr_format=3)
    create_tiles_array(root, (n_slides, n_tiles), tile_px, chunk_tiles, zstd_level)
    return root


def _write_index(root, table: pd.DataFrame, n_slides: int, n_tiles: int) -> None:
    """Flat index arrays (slide-major), the same ones a cohort tile store has, so `embed` reads it as is."""
    index = {
        "slide_index": np.repeat(np.arange(n_slides, dtype=np.int32), n_tiles),
        "tile_id": np.tile(np.arange(n_tiles, dtype=np.int64), n_slides),
        "x0": table["x0"].to_numpy(np.int64),
        "y0": table["y0"].to_numpy(np.int64),
        "level": np.zeros(n_slides * n_tiles, np.int32),
        "tissue_frac": table["tissue_frac"].to_numpy(np.float32),
    }
    write_index(root, index)


def read_matched_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    return read_parquet(path, "matched-tile table", PlismError)


def as_manifest(manifest: pd.DataFrame | list[dict]) -> pd.DataFrame:
    """A manifest frame indexed by slide_id: `manifest` itself, or one built from its records (rule params
    hold the manifest as a list of dicts, one per slide, with the `MANIFEST_COLUMNS` and `mpp`)."""
    if isinstance(manifest, pd.DataFrame):
        return manifest
    return pd.DataFrame(list(manifest)).set_index("slide_id", drop=False)


def cut_matched_tiles(
    manifest: pd.DataFrame | list[dict],
    reference: str,
    grid_table: str | Path,
    transforms: dict[str, str],
    qc: dict[str, dict],
    out_store: str | Path,
    out_table: str | Path,
    chunk_tiles: int = 64,
    zstd_level: int = 3,
    workers: int = 1,
    params: dict | None = None,
) -> pd.DataFrame:
    """Cut the reference grid (`grid_table`, a tile table of the reference) from every slide.

    `transforms` maps each non-reference slide to its saved registration; `qc` holds each registration's QC
    record: slides that failed it are left out (and named in the metadata). A tile whose footprint leaves
    any kept slide is dropped from every slide, so rows stay aligned. `manifest`: see `as_manifest`.
    Returns the slide QC summary.
    """
    manifest = as_manifest(manifest)
    reference_tiles = read_tile_table(grid_table)
    grid, header = reference_tiles.frame, reference_tiles.grid
    if header.slide_id != reference:
        raise PlismError(
            f"the tile grid {grid_table} is of '{header.slide_id}', not the reference '{reference}'"
        )
    tile_px, mpp = header.tile_px, header.mpp
    half_um = header.tile_um / 2
    excluded = sorted(s for s, record in qc.items() if not record.get("passed", False))
    for s in excluded:
        log.warning("PLISM slide %s failed registration QC and is left out: %s", s, qc[s])
    kept = [s for s in manifest["slide_id"] if s not in excluded]
    missing = [s for s in kept if s != reference and s not in transforms]
    if missing:
        raise PlismError(f"no registration for PLISM slide(s) {missing}")
    for s in kept:
        if not Path(manifest.loc[s, "path"]).is_file():
            raise SlideError(f"PLISM slide '{s}': file not found: {manifest.loc[s, 'path']}")
    jobs = [
        SlideJob(
            i,
            s,
            manifest.loc[s, "path"],
            parse_mpp(manifest.loc[s, "mpp"]),
            transforms.get(s) if s != reference else None,
        )
        for i, s in enumerate(kept)
    ]
    centers_um = tile_centers_um(grid, header)
    frames = [_map_slide(job, centers_um, half_um) for job in jobs]
    inside = np.logical_and.reduce([f["inside"] for f in frames]) if frames else np.zeros(0, bool)
    if (~inside).any():
        log.warning(
            "%d of %d reference tiles fall outside some slide; dropped from all", (~inside).sum(), len(inside)
        )
    for f in frames:
        for key in ("centers", "jac"):
            f[key] = f[key][inside]
    grid = grid[inside].reset_index(drop=True)
    n_slides, n_tiles = len(jobs), len(grid)

    rows = []
    for job, f in zip(jobs, frames, strict=True):
        residual = qc.get(job.slide_id, {}).get("tile_residual_um")
        residual = np.asarray(residual, np.float64)[inside] if residual is not None else np.zeros(n_tiles)
        footprint = half_um / f["slide_mpp"]
        rows.append(
            pd.DataFrame(
                {
                    "slide_id": job.slide_id,
                    "scanner": manifest.loc[job.slide_id, "scanner"],
                    "staining": manifest.loc[job.slide_id, "staining"],
                    "tile_index": np.arange(n_tiles, dtype=np.int64),
                    "tile_id": [f"0_{x}_{y}" for x, y in zip(grid["x0"], grid["y0"], strict=True)],
                    "x0": np.round(f["centers"][:, 0] / f["slide_mpp"] - footprint).astype(np.int64),
                    "y0": np.round(f["centers"][:, 1] / f["slide_mpp"] - footprint).astype(np.int64),
                    "residual_um": residual,
                    "tissue_frac": grid["tissue_frac"].to_numpy(np.float32),
                }
            )
        )
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    metadata = provenance(
        params or {},
        source="slides",
        reference=reference,
        tile_px=tile_px,
        mpp=mpp,
        slides=kept,
        excluded=excluded,
        dropped_tiles=int((~inside).sum()),
        mpp_source={job.slide_id: f["mpp_source"] for job, f in zip(jobs, frames, strict=True)},
    )
    with atomic_path(out_store) as tmp:
        root = _create_store(tmp, n_slides, n_tiles, tile_px, chunk_tiles, zstd_level)
        _write_index(root, table, n_slides, n_tiles)
        args = [(job, f, str(tmp), tile_px, mpp, chunk_tiles) for job, f in zip(jobs, frames, strict=True)]
        if workers > 1 and len(args) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(_cut_slide, *a) for a in args]:
                    future.result()
        else:
            for a in args:
                _cut_slide(*a)
        root.attrs.update(_store_attrs(manifest, jobs, frames, tile_px, mpp, n_tiles, metadata))
    write_parquet(table, out_table, metadata)
    return summarize_qc(qc, excluded)


def cut_registered(
    manifest: pd.DataFrame | list[dict],
    reference: str,
    grid_table: str | Path,
    transform_dirs: list[str | Path],
    qc_files: list[str | Path],
    out_store: str | Path,
    out_table: str | Path,
    out_summary: str | Path,
    chunk_tiles: int = 64,
    zstd_level: int = 3,
    workers: int = 1,
    params: dict | None = None,
) -> pd.DataFrame:
    """`cut_matched_tiles` from the registration stage's files, then the QC summary as a TSV `out_summary`.

    `transform_dirs`: one saved registration per non-reference slide, named by the slide id;
    `qc_files`: its QC records, `<slide_id>.json`. Returns the summary (one row per slide, see
    `summarize_qc`); raises what `cut_matched_tiles` raises, and ValueError on an unreadable QC file.
    """
    transforms = {Path(t).name: str(t) for t in transform_dirs}
    qc = {Path(q).stem: json.loads(Path(q).read_text()) for q in qc_files}
    summary = cut_matched_tiles(
        manifest,
        reference,
        grid_table,
        transforms,
        qc,
        out_store,
        out_table,
        chunk_tiles=chunk_tiles,
        zstd_level=zstd_level,
        workers=workers,
        params=params,
    )
    with atomic_path(out_summary) as tmp:
        summary.to_csv(tmp, sep="\t", index=False)
    return summary


def _store_attrs(manifest, jobs, frames, tile_px, mpp, n_tiles, metadata) -> dict:
    return {
        "tile_px": tile_px,
        "mpp": mpp,
        "n_tiles": n_tiles * len(jobs),
        "tiles_per_slide": n_tiles,
        "slides": [
            {
                "slide_id": job.slide_id,
                "path": str(job.path),
                "scanner": manifest.loc[job.slide_id, "scanner"],
                "staining": manifest.loc[job.slide_id, "staining"],
                "slide_mpp": f["slide_mpp"] if f else None,
                "mpp_source": f["mpp_source"] if f else None,
                "n_tiles": n_tiles,
            }
            for job, f in zip(jobs, frames, strict=True)
        ],
        "plism": {k: metadata[k] for k in ("source", "reference", "excluded", "dropped_tiles")},
        "provenance": metadata,
    }


def summarize_qc(qc: dict[str, dict], excluded: list[str]) -> pd.DataFrame:
    keys = (
        "ncc_before_median",
        "ncc_after_median",
        "residual_um_median",
        "residual_um_p90",
        "residual_um_max",
    )
    return pd.DataFrame(
        [
            {"slide_id": s, "passed": s not in excluded, **{k: r.get(k) for k in keys}}
            for s, r in sorted(qc.items())
        ]
    )


# --- the public pre-registered tiles (HDF5) -------------------------------------------------------------


def h5_path(h5_dir: str | Path, slide_id: str, reference: str) -> Path:
    return Path(h5_dir) / f"{slide_id}_to_{reference}.tif.h5"


def _sorted_tile_ids(ids) -> list[str]:
    parsed = []
    for tid in ids:
        m = _TILE_ID.match(tid)
        if not m:
            raise PlismError(f"unexpected tile id '{tid}' (expected level_x_y or prefix_level_x_y, integers)")
        parsed.append((int(m.group(2)), int(m.group(3)), tid))
    return [tid for _, _, tid in sorted(parsed)]


def ingest_h5(
    manifest: pd.DataFrame | list[dict],
    reference: str,
    h5_dir: str | Path,
    out_store: str | Path,
    out_table: str | Path,
    chunk_tiles: int = 64,
    zstd_level: int = 3,
    params: dict | None = None,
) -> int:
    """Read the public pre-registered PLISM tiles into the matched-tile layout; rows sorted by (x, y).

    Every file must hold exactly the reference file's tile ids: a missing or extra id is an error naming the
    slide and the ids. `manifest`: see `as_manifest`. Returns the number of tiles per slide.
    """
    manifest = as_manifest(manifest)
    slides = manifest["slide_id"].tolist()
    paths = {s: h5_path(h5_dir, s, reference) for s in slides}
    absent = [str(p) for p in paths.values() if not p.is_file()]
    if absent:
        raise PlismError(f"PLISM h5 source: file(s) not found: {absent}")
    with h5py.File(paths[reference], "r") as f:
        tile_ids = _sorted_tile_ids(list(f.keys()))
        first = f[tile_ids[0]] if tile_ids else None
        tile_px = int(first.shape[0]) if first is not None else 224
    if not tile_ids:
        raise PlismError(f"{paths[reference]}: no tiles")
    expected = set(tile_ids)
    for s in slides:
        with h5py.File(paths[s], "r") as f:
            found = set(f.keys())
        if found != expected:
            lack, extra = sorted(expected - found), sorted(found - expected)
            raise PlismError(
                f"PLISM h5 slide '{s}' ({paths[s]}) does not match the reference's tiles: "
                f"missing {lack[:5]}{'…' if len(lack) > 5 else ''} ({len(lack)}), "
                f"extra {extra[:5]}{'…' if len(extra) > 5 else ''} ({len(extra)})"
            )
    n = len(tile_ids)
    xy = np.array([[int(v) for v in _TILE_ID.match(t).groups()[1:]] for t in tile_ids], np.int64)
    table = pd.concat(
        [
            pd.DataFrame(
                {
                    "slide_id": s,
                    "scanner": manifest.loc[s, "scanner"],
                    "staining": manifest.loc[s, "staining"],
                    "tile_index": np.arange(n, dtype=np.int64),
                    "tile_id": tile_ids,
                    "x0": xy[:, 0],
                    "y0": xy[:, 1],
                    "residual_um": np.nan,
                    "tissue_frac": np.float32(np.nan),
                }
            )
            for s in slides
        ],
        ignore_index=True,
    )
    metadata = provenance(
        params or {},
        source="h5",
        reference=reference,
        tile_px=tile_px,
        mpp=None,
        slides=slides,
        excluded=[],
        dropped_tiles=0,
    )
    with atomic_path(out_store) as tmp:
        root = _create_store(tmp, len(slides), n, tile_px, chunk_tiles, zstd_level)
        _write_index(root, table, len(slides), n)
        tiles = root["tiles"]
        buffer = np.empty((chunk_tiles, tile_px, tile_px, 3), np.uint8)
        for si, s in enumerate(slides):
            with h5py.File(paths[s], "r") as f:
                for start in range(0, n, chunk_tiles):
                    stop = min(n, start + chunk_tiles)
                    for k, tid in enumerate(tile_ids[start:stop]):
                        raw = f[tid][()]
                        where = f"PLISM h5 slide '{s}' ({paths[s]}), tile {tid}"
                        pixels = as_rgb8(raw, where, has_channels=raw.ndim == 3)  # any mode → uint8 RGB
                        if pixels.shape != (tile_px, tile_px, 3):
                            raise PlismError(
                                f"{where}: {raw.dtype} {raw.shape}, expected ({tile_px}, {tile_px}[, C]) like the reference's"
                            )
                        buffer[k] = pixels
                    tiles[si, start:stop] = buffer[: stop - start]
            log.info("ingested %d tiles of %s", n, s)
        jobs = [SlideJob(i, s, str(paths[s]), None, None) for i, s in enumerate(slides)]
        root.attrs.update(_store_attrs(manifest, jobs, [None] * len(jobs), tile_px, None, n, metadata))
    write_parquet(table, out_table, metadata)
    return n
