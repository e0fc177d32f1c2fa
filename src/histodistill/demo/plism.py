"""The PLISM-like demo set: one tissue under several scanners and stainings, each with a known warp."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodistill.atomic import atomic_path
from histodistill.demo.slides import (
    BACKGROUND_RGB,
    DemoSlideConfig,
    render_tissue,
    restain,
    scan,
    seed_for,
    write_pyramid_tiff,
)

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
class PlismDemoConfig:
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


def _random_warp(rng: np.random.Generator, spec: PlismDemoConfig, size_um: tuple[float, float]) -> dict:
    """A moving→reference map u ↦ A·u + t + d(u) (µm), with d a sum of smooth sinusoids."""
    angle = np.deg2rad(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
    scale = 1 + rng.uniform(-spec.max_scale, spec.max_scale, 2)
    shear = rng.uniform(-0.01, 0.01)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a = rot @ np.array([[scale[0], shear], [0.0, scale[1]]])
    center = np.array(size_um) / 2
    t = center - a @ center + rng.uniform(-spec.max_shift_um, spec.max_shift_um, 2)
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


def make_plism_demo(out_dir: str | Path, seed: int = 0, spec: PlismDemoConfig = PlismDemoConfig()) -> Path:
    """Write a PLISM-like set of slides, its manifest `plism.tsv` and the ground-truth warps `truth.json`.

    Slide ids are `{staining}_{scanner}`; the reference (GMH on S60) is the unwarped tissue. Each other
    slide is the same tissue re-stained, warped by a known affine + elastic map, resampled at its scanner's
    µm/px and passed through the scanner's colour response, blur and JPEG.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    canvas_mpp = DEMO_SCANNERS[DEMO_REFERENCE[1]]["mpp"]
    canvas = render_tissue(
        DemoSlideConfig(spec.width_px, spec.height_px, mpp=canvas_mpp), seed_for("plism", seed)
    )
    size_um = (spec.width_px * canvas_mpp, spec.height_px * canvas_mpp)
    rows, truth = ["slide_id\tpath\tscanner\tstaining"], {"reference": "_".join(DEMO_REFERENCE), "slides": {}}
    for staining in spec.stainings:
        stained = restain(canvas, DEMO_STAININGS[staining])
        for scanner in spec.scanners:
            slide_id = f"{staining}_{scanner}"
            params = DEMO_SCANNERS[scanner]
            is_ref = (staining, scanner) == DEMO_REFERENCE
            rng = np.random.default_rng(seed_for(f"plism-warp:{slide_id}", seed))
            warp = _identity_warp() if is_ref else _random_warp(rng, spec, size_um)
            shape = (round(size_um[1] / params["mpp"]), round(size_um[0] / params["mpp"]))
            pixels = stained if is_ref else _resample(stained, canvas_mpp, warp, shape, params["mpp"])
            pixels = scan(pixels, params)
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
