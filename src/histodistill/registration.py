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
from histodistill.errors import HistodistillError, SlideError
from histodistill.provenance import provenance
from histodistill.slides import checked_mpp, open_slide, read_scaled
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
        mpp = checked_mpp(slide, slide_mpp, slide_name=f"slide '{name}' ({path})")
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


def _log_reason(log_text: str) -> str | None:
    """The last `Description:` line of an elastix log (the reason elastix gives for failing), or None."""
    found = re.findall(r"^Description: (.+)$", log_text, re.M)
    reasons = [r.strip() for r in found if "See elastix log" not in r]
    return reasons[-1] if reasons else None


def run_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    params: RegistrationConfig,
    workdir: Path,
    name: str = "moving",
    log_path: str | Path | None = None,
) -> list:
    """Register `moving` onto `fixed`; returns elastix's transform parameter maps (affine, B-spline).

    elastix logs to `workdir/elastix.log`; when `log_path` is given the log is copied there (atomically),
    whether elastix succeeded or not. Raises RegistrationError naming the slide `name`, elastix's reason
    (from its log) and where the log is kept.
    """
    elastix = sitk.ElastixImageFilter()
    elastix.SetFixedImage(fixed)
    elastix.SetMovingImage(moving)
    elastix.SetParameterMap(sitk.VectorOfParameterMap(_parameter_maps(params)))
    elastix.SetOutputDirectory(str(workdir))
    elastix.LogToConsoleOff()
    elastix.LogToFileOn()
    try:
        elastix.Execute()
        error = None
    except RuntimeError as exc:
        error = exc
    log_file = Path(workdir) / "elastix.log"
    log_text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    if log_path is not None and log_text:
        with atomic_path(log_path) as tmp:
            Path(tmp).write_text(log_text)
    if error is not None:
        reason = _log_reason(log_text) or str(error).strip().splitlines()[-1]
        kept = f"elastix log: {log_path}" if log_path is not None and log_text else "no elastix log kept"
        raise RegistrationError(
            f"elastix failed to register slide '{name}' ({moving.GetSize()[0]} x {moving.GetSize()[1]} px at "
            f"{moving.GetSpacing()[0]:g} µm/px onto {fixed.GetSize()[0]} x {fixed.GetSize()[1]} px): {reason} "
            f"({kept}). Check that the slide shows the reference's tissue and is not much smaller than it, "
            "or set plism.on_failure: exclude (--on-failure exclude) to leave it out."
        ) from error
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
    """QC picture: checkerboard of reference and moving slide, before (left) and after (right) registration,
    each half labelled on a strip above it."""
    before = checkerboard(fixed.rgb, _rgb_on_fixed(moving, fixed.image, None))
    warped = _rgb_on_fixed(moving, fixed.image, maps)
    outside = warped.sum(axis=2) == 0  # transformix fills outside the moving slide with 0
    warped[outside] = 255
    after = checkerboard(fixed.rgb, warped)
    gap = np.full((before.shape[0], 8, 3), 255, np.uint8)
    panel = Image.fromarray(np.concatenate([before, gap, after], axis=1))
    panel.thumbnail((2 * max_px, max_px))
    panel = _label_halves(panel, ("before registration", "after registration"))
    with atomic_path(out) as tmp:
        panel.save(tmp, format="PNG")


def _label_halves(panel: Image.Image, labels: tuple[str, str]) -> Image.Image:
    """`panel` with a white strip on top naming its left and right halves (centred over each)."""
    from PIL import ImageDraw, ImageFont

    size = max(12, panel.height // 32)
    font = ImageFont.load_default(size=size)
    strip = size + 12
    out = Image.new("RGB", (panel.width, panel.height + strip), "white")
    out.paste(panel, (0, strip))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        center = panel.width * (2 * i + 1) / 4
        draw.text((center, strip / 2), text, fill="black", font=font, anchor="mm")
    return out


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
    elastix_log: str | Path | None = None,
) -> dict:
    """Register `moving_path` onto `fixed_path`; save the transform to `out_dir`; return the QC record.

    `centres_um` are the reference's tile centres (µm): QC measures NCC and residuals on those windows.
    The QC record says whether the registration `passed`; the caller decides what a failure means.
    elastix's log is kept at `elastix_log` (if given). Raises RegistrationError naming the moving slide
    for every failure of the moving slide's registration (unreadable slide, elastix error, no tile inside
    the image, transformix error); errors of the reference slide are raised as they are (SlideError).
    """
    fixed = load_registration_image(fixed_path, names[0], params.fine_mpp, slide_mpps[0])
    try:
        moving = load_registration_image(moving_path, names[1], params.fine_mpp, slide_mpps[1])
    except SlideError as exc:
        raise RegistrationError(f"PLISM slide '{names[1]}' cannot be registered: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="elastix-") as tmp:
        maps = run_elastix(fixed.image, moving.image, params, Path(tmp), names[1], elastix_log)
    before = sitk.GetArrayFromImage(
        sitk.Resample(moving.image, fixed.image, sitk.Transform(), sitk.sitkLinear)
    )
    try:
        after = sitk.GetArrayFromImage(warp_to_fixed(maps, moving.image, fixed.image))
    except RuntimeError as exc:
        raise RegistrationError(
            f"transformix failed to warp slide '{names[1]}' with its registration: {str(exc).strip()[-300:]}"
        ) from exc
    fixed_arr = sitk.GetArrayFromImage(fixed.image)
    spacing = np.asarray(fixed.image.GetSpacing())
    centers_um = np.asarray(centers_um, np.float64).reshape(-1, 2)
    centers_px = centers_um / spacing - 0.5
    half = max(4, round(tile_um / 2 / spacing.mean()))
    per_tile = tile_qc(fixed_arr, before, after, centers_px, half, float(spacing.mean()))
    valid = per_tile[~np.isnan(per_tile[:, 0])]
    if len(valid) == 0:
        raise RegistrationError(
            f"slide '{names[1]}' ({moving_path}): no tile of the reference '{names[0]}' lies inside the "
            "registration image, so the registration cannot be checked"
        )
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

    A registration that fails (elastix error, unreadable moving slide, no tile inside, transformix error)
    or fails QC raises a RegistrationError naming the slide (`on_failure="error"`); with `"exclude"` every
    one of these is recorded as failed (`passed: false`, `error`: the message) so that the matched tiles
    leave the slide out, and the outputs still exist (a transform folder holding only registration.json
    with the error, and a QC picture stating it). elastix's log is kept next to the QC record:
    `<qc_json without .json>.elastix.log`. Errors of the reference slide or the grid are always raised.
    """
    if on_failure not in ON_FAILURE:
        raise RegistrationError(f"on_failure must be one of {ON_FAILURE}, not {on_failure!r}")
    tiles = read_tile_table(grid_table)
    centers = tile_centers_um(tiles.frame, tiles.grid)
    tile_um = tiles.grid.tile_um
    elastix_log = elastix_log_path(qc_json)
    elastix_log.unlink(missing_ok=True)  # a log of an earlier run must not pass for this run's
    try:
        qc = register_slides(
            fixed_path, moving_path, out_dir, centers, tile_um, params, names, slide_mpps, qc_png, elastix_log
        )
    except RegistrationError as exc:
        if on_failure == "error":
            raise
        log.warning("registration of '%s' failed, the slide will be left out: %s", names[1], exc)
        qc = _failure_record(names, str(exc), params, elastix_log)
        metadata = provenance(asdict(params), slide_id=names[1], reference=names[0], error=str(exc))
        with atomic_path(out_dir) as tmp:
            Path(tmp).mkdir(parents=True)
            (Path(tmp) / "registration.json").write_text(json.dumps(metadata, indent=1, default=str))
        if qc_png is not None:
            _render_failure(str(exc), Path(qc_png))
    qc["on_failure"] = on_failure
    qc["elastix_log"] = str(elastix_log) if Path(elastix_log).is_file() else None
    with atomic_path(qc_json) as tmp:
        Path(tmp).write_text(json.dumps(qc, indent=1))
    if "error" in qc:
        return qc
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
            f"reference? Look at {qc_png or 'its checkerboard QC image'} and {elastix_log}, or set "
            "plism.on_failure: exclude to leave it out."
        )
    else:
        log.warning("registration failed QC, the slide will be left out: %s", summary)
    return qc


ON_FAILURE = ("error", "exclude")


def elastix_log_path(qc_json: str | Path) -> Path:
    """Where elastix's log of a registration is kept: beside its QC record, `<name>.elastix.log`."""
    qc_json = Path(qc_json)
    return qc_json.with_name(qc_json.name.removesuffix(".json") + ".elastix.log")


def _failure_record(
    names: tuple[str, str], error: str, params: RegistrationConfig, elastix_log: Path
) -> dict:
    """The QC record of a registration that did not produce a usable transform."""
    return {
        "slide_id": names[1],
        "reference": names[0],
        "passed": False,
        "error": error,
        "ncc_before_median": None,
        "ncc_after_median": None,
        "residual_um_median": None,
        "n_tiles": 0,
        "thresholds": {"min_ncc": params.min_ncc, "max_residual_um": params.max_residual_um},
    }


def _render_failure(message: str, out: Path, width: int = 900) -> None:
    """The QC picture of a failed registration: the error message on white (there is nothing to overlay)."""
    import textwrap

    from PIL import ImageDraw

    lines = textwrap.wrap("REGISTRATION FAILED: " + message, 140)
    image = Image.new("RGB", (width, 16 + 14 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((8, 8 + 14 * i), line, fill=(180, 0, 0))
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
