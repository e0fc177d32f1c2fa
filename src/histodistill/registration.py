"""Register a slide to a reference slide with elastix (SimpleITK-SimpleElastix) and map points through it.

Both slides are read downsampled to the same physical scale (`fine_mpp` µm/px; level 0 is never read), as
optical density so that glass is 0 and tissue is bright whatever the stain or the scanner. Images carry their
spacing in µm, so elastix works in physical units and the transform maps reference µm → moving µm directly.
One elastix run chains an affine stage (a coarse pyramid: `affine_schedule` × `fine_mpp`) and a B-spline
stage (finer pyramid levels, control points every `grid_spacing_um`); mutual information copes with
differences in stain and colour response. The parameter maps are saved, so the mapping can be re-applied
(`map_points`) without registering again.

Quality control uses the reference's tile centres: normalised cross-correlation (NCC) of each tile window
before registration (same µm coordinates) and after, and the residual shift left after registration
(phase correlation of each tile window). A registration whose median NCC or residual misses the thresholds
fails QC: a moving slide of different tissue cannot pass silently.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image
from skimage.registration import phase_cross_correlation

from histodistill.atomic import atomic_path
from histodistill.errors import HistodistillError
from histodistill.provenance import provenance
from histodistill.slides import open_slide, read_scaled, resolve_mpp
from histodistill.tiling import TileGrid, read_tile_table

log = logging.getLogger(__name__)

TRANSFORM_FILES = ("affine.txt", "bspline.txt")


class RegistrationError(HistodistillError):
    """A registration failed (elastix error) or its result failed quality control."""


@dataclass(frozen=True)
class RegistrationConfig:
    """Every setting that changes a registration (stored with it and hashed)."""

    fine_mpp: float = 2.0  # µm/px of the images elastix sees (the B-spline's finest level)
    affine_schedule: tuple[int, ...] = (16, 8, 4)  # pyramid shrink factors of the affine stage
    bspline_schedule: tuple[int, ...] = (4, 2, 1)  # pyramid shrink factors of the B-spline stage
    grid_spacing_um: float = 150.0  # B-spline control point spacing
    iterations: int = 500  # per pyramid level
    spatial_samples: int = 4096
    seed: int = 0
    min_ncc: float = 0.5  # QC: median NCC of the tile windows after registration must reach this
    max_residual_um: float = 4.0  # QC: median residual shift after registration must stay below this


@dataclass
class SlideImage:
    """A slide at registration scale: optical density (sitk, spacing in µm) and the RGB it came from."""

    image: sitk.Image
    rgb: np.ndarray
    slide_mpp: float
    mpp_source: str


def load_registration_image(path: str | Path, name: str, fine_mpp: float, slide_mpp: float | None = None):
    """Read a whole slide at `fine_mpp` µm/px (from the best pyramid level, in strips)."""
    with open_slide(path) as slide:
        mpp = resolve_mpp(dict(slide.properties), slide_mpp, slide_name=f"slide '{name}' ({path})")
        width0, height0 = slide.dimensions
        rgb = read_scaled(slide, mpp.mean, fine_mpp)
    background = np.percentile(rgb.reshape(-1, 3), 99, axis=0).clip(1, 255).astype(np.float32)
    od = -np.log(np.clip(rgb.astype(np.float32) / background, 1e-3, 1.0)).sum(axis=2)
    image = sitk.GetImageFromArray(od.astype(np.float32))
    # Exact physical size of one thumbnail pixel; pixel centres sit half a pixel in from the slide's edge.
    spacing = (width0 * mpp.x / rgb.shape[1], height0 * mpp.y / rgb.shape[0])
    image.SetSpacing(spacing)
    image.SetOrigin((spacing[0] / 2, spacing[1] / 2))
    return SlideImage(image, rgb, mpp.mean, mpp.source)


def _parameter_maps(params: RegistrationConfig) -> list:
    affine = sitk.GetDefaultParameterMap("affine", len(params.affine_schedule))
    bspline = sitk.GetDefaultParameterMap("bspline", len(params.bspline_schedule), params.grid_spacing_um)
    for pm, schedule in ((affine, params.affine_schedule), (bspline, params.bspline_schedule)):
        pm["ImagePyramidSchedule"] = [str(s) for level in schedule for s in (level, level)]
        pm["MaximumNumberOfIterations"] = [str(params.iterations)]
        pm["NumberOfSpatialSamples"] = [str(params.spatial_samples)]
        pm["RandomSeed"] = [str(params.seed)]
        pm["WriteResultImage"] = ["false"]
        pm["ResultImagePixelType"] = ["float"]
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    bspline["GridSpacingSchedule"] = [str(s) for level in params.bspline_schedule for s in (level, level)]
    # The bending penalty keeps the grid smooth where the slides differ (debris, folds, missing cores).
    bspline["Metric1Weight"] = ["0.1"]
    return [affine, bspline]


def run_elastix(fixed: sitk.Image, moving: sitk.Image, params: RegistrationConfig, workdir: Path) -> list:
    """Register `moving` onto `fixed`; returns elastix's transform parameter maps (affine, B-spline)."""
    elastix = sitk.ElastixImageFilter()
    elastix.SetFixedImage(fixed)
    elastix.SetMovingImage(moving)
    elastix.SetParameterMap(sitk.VectorOfParameterMap(_parameter_maps(params)))
    elastix.SetOutputDirectory(str(workdir))
    elastix.LogToConsoleOff()
    elastix.LogToFileOn()
    try:
        elastix.Execute()
    except RuntimeError as exc:
        raise RegistrationError(f"elastix failed: {str(exc).strip().splitlines()[-1]}") from exc
    return list(elastix.GetTransformParameterMap())


def _transformix(maps: list, moving: sitk.Image, points_um: np.ndarray | None, workdir: Path):
    maps = [dict(pm, WriteResultImage=["false"]) for pm in maps]  # results stay in memory
    transformix = sitk.TransformixImageFilter()
    transformix.SetTransformParameterMaps(sitk.VectorOfParameterMap([_to_map(pm) for pm in maps]))
    transformix.SetMovingImage(moving)
    transformix.SetOutputDirectory(str(workdir))
    transformix.LogToConsoleOff()
    if points_um is not None:
        points_file = workdir / "points.txt"
        lines = ["point", str(len(points_um))] + [f"{x:.6f} {y:.6f}" for x, y in points_um]
        points_file.write_text("\n".join(lines) + "\n")
        transformix.SetFixedPointSetFileName(str(points_file))
    transformix.Execute()
    return transformix


def _to_map(values: dict):
    pm = sitk.ParameterMap()
    for key, value in values.items():
        pm[key] = list(value)
    return pm


_OUTPUT_POINT = re.compile(r"OutputPoint = \[\s*([-+0-9.eE]+)\s+([-+0-9.eE]+)\s*\]")


def map_points(maps: list, points_um: np.ndarray) -> np.ndarray:
    """Reference-slide µm → moving-slide µm through the registration (elastix's fixed → moving map)."""
    points_um = np.asarray(points_um, np.float64).reshape(-1, 2)
    if len(points_um) == 0:
        return points_um.copy()
    dummy = sitk.Image(8, 8, sitk.sitkFloat32)
    with tempfile.TemporaryDirectory(prefix="transformix-") as tmp:
        _transformix(maps, dummy, points_um, Path(tmp))
        text = (Path(tmp) / "outputpoints.txt").read_text()
    out = np.array([(float(x), float(y)) for x, y in _OUTPUT_POINT.findall(text)], np.float64)
    if out.shape != points_um.shape:
        raise RegistrationError(f"transformix returned {len(out)} points for {len(points_um)}")
    return out


def warp_to_fixed(maps: list, moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """Resample `moving` onto `fixed`'s grid through the registration."""
    maps = [dict(pm) for pm in maps]
    for pm in maps:
        pm["Size"] = [str(s) for s in fixed.GetSize()]
        pm["Spacing"] = [f"{s:.10g}" for s in fixed.GetSpacing()]
        pm["Origin"] = [f"{s:.10g}" for s in fixed.GetOrigin()]
        pm["ResultImagePixelType"] = ["float"]
        pm["DefaultPixelValue"] = ["0"]
    with tempfile.TemporaryDirectory(prefix="transformix-") as tmp:
        return _transformix(maps, moving, None, Path(tmp)).GetResultImage()


def save_transform(maps: list, out_dir: Path, metadata: dict) -> None:
    """Write the parameter maps (elastix text format) and what made them into `out_dir`.

    The maps are chained by order (`load_transform`), so each is written with `NoInitialTransform`: elastix
    would otherwise record the path of its temporary folder, deleted since, which made the file differ
    between two runs of the same registration."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for pm, name in zip(maps, TRANSFORM_FILES, strict=True):
        pm = dict(pm)
        pm["InitialTransformParameterFileName"] = ["NoInitialTransform"]
        sitk.WriteParameterFile(pm, str(out_dir / name))
    (out_dir / "registration.json").write_text(json.dumps(metadata, indent=1, default=str))


def load_transform(transform_dir: str | Path) -> list:
    """The parameter maps saved by `save_transform`, ready for `map_points`."""
    transform_dir = Path(transform_dir)
    missing = [n for n in TRANSFORM_FILES if not (transform_dir / n).is_file()]
    if missing:
        raise RegistrationError(f"{transform_dir}: not a saved registration (missing {', '.join(missing)})")
    maps = [sitk.ReadParameterFile(str(transform_dir / n)) for n in TRANSFORM_FILES]
    for pm in maps:  # chained by order, not by file name
        pm["InitialTransformParameterFileName"] = ["NoInitialTransform"]
    return maps


def tile_centers_um(table, grid: TileGrid | Mapping[str, Any]) -> np.ndarray:
    """Centres of a tile table's tiles: float64 [N, 2] (x, y) in µm from the slide's top-left corner.

    `grid` is the table's TileGrid (or the tile table metadata it is stored in).
    """
    grid = TileGrid.of(grid)
    half = grid.footprint_px0 / 2
    x = (table["x0"].to_numpy() + half) * grid.slide_mpp_x
    y = (table["y0"].to_numpy() + half) * grid.slide_mpp_y
    return np.stack([x, y], axis=1).astype(np.float64)


def _windows(image: np.ndarray, centers_px: np.ndarray, half: int) -> list[np.ndarray | None]:
    out = []
    for cx, cy in np.round(centers_px).astype(int):
        if cy - half < 0 or cx - half < 0 or cy + half > image.shape[0] or cx + half > image.shape[1]:
            out.append(None)
        else:
            out.append(image[cy - half : cy + half, cx - half : cx + half])
    return out


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equally shaped windows (0 when either is flat)."""
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def tile_qc(fixed: np.ndarray, before: np.ndarray, after: np.ndarray, centers_px: np.ndarray, half: int, mpp):
    """Per tile: NCC before and after registration, and the residual shift (µm) after it."""
    rows = []
    for f, b, a in zip(*(_windows(x, centers_px, half) for x in (fixed, before, after)), strict=True):
        if f is None:
            rows.append((np.nan, np.nan, np.nan))
            continue
        shift, _, _ = phase_cross_correlation(f, a, upsample_factor=10, normalization=None)
        rows.append((ncc(f, b), ncc(f, a), float(np.hypot(*shift)) * mpp))
    return np.array(rows, np.float64).reshape(-1, 3)


def checkerboard(fixed_rgb: np.ndarray, moving_rgb: np.ndarray, squares: int = 8) -> np.ndarray:
    """Alternate squares of two equally shaped images: misalignment shows as broken edges."""
    h, w = fixed_rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    side = max(h, w) / squares
    pick = ((yy // side + xx // side) % 2).astype(bool)
    return np.where(pick[..., None], moving_rgb, fixed_rgb)


def _rgb_on_fixed(moving: SlideImage, fixed: sitk.Image, maps: list | None) -> np.ndarray:
    channels = []
    for c in range(3):
        img = sitk.GetImageFromArray(moving.rgb[..., c].astype(np.float32))
        img.CopyInformation(moving.image)
        if maps is None:  # before registration: the same µm coordinates
            out = sitk.Resample(img, fixed, sitk.Transform(), sitk.sitkLinear, 255.0)
        else:
            out = warp_to_fixed(maps, img, fixed)
            arr = sitk.GetArrayFromImage(out)
            channels.append(arr)
            continue
        channels.append(sitk.GetArrayFromImage(out))
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def render_checkerboards(fixed: SlideImage, moving: SlideImage, maps: list, out: Path, max_px: int = 1024):
    """QC picture: checkerboard of reference and moving slide, before (left) and after (right)."""
    before = checkerboard(fixed.rgb, _rgb_on_fixed(moving, fixed.image, None))
    warped = _rgb_on_fixed(moving, fixed.image, maps)
    outside = warped.sum(axis=2) == 0  # transformix fills outside the moving slide with 0
    warped[outside] = 255
    after = checkerboard(fixed.rgb, warped)
    gap = np.full((before.shape[0], 8, 3), 255, np.uint8)
    panel = Image.fromarray(np.concatenate([before, gap, after], axis=1))
    panel.thumbnail((2 * max_px, max_px))
    with atomic_path(out) as tmp:
        panel.save(tmp, format="PNG")


def register_slides(
    fixed_path: str | Path,
    moving_path: str | Path,
    out_dir: str | Path,
    centers_um: np.ndarray,
    tile_um: float,
    params: RegistrationConfig = RegistrationConfig(),
    names: tuple[str, str] = ("reference", "moving"),
    slide_mpps: tuple[float | None, float | None] = (None, None),
    qc_png: str | Path | None = None,
) -> dict:
    """Register `moving_path` onto `fixed_path`; save the transform to `out_dir`; return the QC record.

    `centres_um` are the reference's tile centres (µm): QC measures NCC and residuals on those windows.
    The QC record says whether the registration `passed`; the caller decides what a failure means.
    """
    fixed = load_registration_image(fixed_path, names[0], params.fine_mpp, slide_mpps[0])
    moving = load_registration_image(moving_path, names[1], params.fine_mpp, slide_mpps[1])
    with tempfile.TemporaryDirectory(prefix="elastix-") as tmp:
        maps = run_elastix(fixed.image, moving.image, params, Path(tmp))
    before = sitk.GetArrayFromImage(
        sitk.Resample(moving.image, fixed.image, sitk.Transform(), sitk.sitkLinear)
    )
    after = sitk.GetArrayFromImage(warp_to_fixed(maps, moving.image, fixed.image))
    fixed_arr = sitk.GetArrayFromImage(fixed.image)
    spacing = np.asarray(fixed.image.GetSpacing())
    centers_um = np.asarray(centers_um, np.float64).reshape(-1, 2)
    centers_px = centers_um / spacing - 0.5
    half = max(4, round(tile_um / 2 / spacing.mean()))
    per_tile = tile_qc(fixed_arr, before, after, centers_px, half, float(spacing.mean()))
    valid = per_tile[~np.isnan(per_tile[:, 0])]
    if len(valid) == 0:
        raise RegistrationError(f"{names[1]}: no reference tile lies inside the registration image")
    ncc_before, ncc_after, residual = (float(np.median(valid[:, i])) for i in range(3))
    passed = ncc_after >= params.min_ncc and residual <= params.max_residual_um
    qc = {
        "slide_id": names[1],
        "reference": names[0],
        "passed": bool(passed),
        "ncc_before_median": ncc_before,
        "ncc_after_median": ncc_after,
        "residual_um_median": residual,
        "residual_um_p90": float(np.percentile(valid[:, 2], 90)),
        "residual_um_max": float(valid[:, 2].max()),
        "n_tiles": int(len(valid)),
        "tile_ncc_after": [round(float(v), 4) for v in per_tile[:, 1]],
        "tile_residual_um": [round(float(v), 3) for v in per_tile[:, 2]],
        "thresholds": {"min_ncc": params.min_ncc, "max_residual_um": params.max_residual_um},
        "slide_mpp": {names[0]: fixed.slide_mpp, names[1]: moving.slide_mpp},
        "mpp_source": {names[0]: fixed.mpp_source, names[1]: moving.mpp_source},
    }
    metadata = provenance(asdict(params), **{k: qc[k] for k in ("slide_id", "reference", "slide_mpp")})
    with atomic_path(out_dir) as tmp:
        save_transform(maps, Path(tmp), metadata)
    if qc_png is not None:
        render_checkerboards(fixed, moving, maps, Path(qc_png))
    return qc


def register_to_grid(
    fixed_path: str | Path,
    moving_path: str | Path,
    grid_table: str | Path,
    out_dir: str | Path,
    qc_json: str | Path,
    qc_png: str | Path | None,
    params: RegistrationConfig = RegistrationConfig(),
    names: tuple[str, str] = ("reference", "moving"),
    slide_mpps: tuple[float | None, float | None] = (None, None),
    on_failure: str = "error",
) -> dict:
    """Register one slide to the reference, QC it on the reference's tile grid, write the QC record.

    A registration that fails QC raises a RegistrationError naming the slide (`on_failure="error"`), or is
    recorded as failed so that the matched tiles leave the slide out (`"exclude"`).
    """
    tiles = read_tile_table(grid_table)
    centers = tile_centers_um(tiles.frame, tiles.grid)
    tile_um = tiles.grid.tile_um
    qc = register_slides(
        fixed_path, moving_path, out_dir, centers, tile_um, params, names, slide_mpps, qc_png
    )
    qc["on_failure"] = on_failure
    with atomic_path(qc_json) as tmp:
        Path(tmp).write_text(json.dumps(qc, indent=1))
    summary = (
        f"{names[1]} → {names[0]}: median NCC {qc['ncc_before_median']:.3f} before, "
        f"{qc['ncc_after_median']:.3f} after; median residual {qc['residual_um_median']:.2f} µm"
    )
    if qc["passed"]:
        log.info("registration passed QC: %s", summary)
    elif on_failure == "error":
        raise RegistrationError(
            f"PLISM slide '{names[1]}' ({moving_path}) failed registration QC ({summary}; thresholds: NCC ≥ "
            f"{params.min_ncc}, residual ≤ {params.max_residual_um} µm). Is it the same tissue as the "
            f"reference? Look at {qc_png or 'its checkerboard QC image'}, or set plism.on_failure: exclude to "
            "leave it out."
        )
    else:
        log.warning("registration failed QC, the slide will be left out: %s", summary)
    return qc
