"""PLISM registration and matched-tile cutting: time, accuracy and memory, each against a baseline run here.

registration: ours registers at `--fine-mpp` (2 µm/px, read from a pyramid level); the baseline registers the
              same pairs at half that (1 µm/px, 4× the pixels). Prints seconds per slide pair and the
              error of mapped tile centres against the demo's ground-truth warps for both.
cutting:      ours reads each tile's bounding box from the best pyramid level, box-reduces, then applies the
              local affine; the baseline reads the bounding box from level 0 and applies the affine there.
              Prints matched tiles/s for both and the ratio.
Memory: the registration images are a few MB where level 0 would be hundreds; peak RSS of each phase is
measured in its own child process.
Usage: python benchmarks/registration.py [--width-px 4096 --height-px 3072 --pairs 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from histodistill.demo.plism import PlismDemoConfig, make_plism_demo, reference_to_moving
from histodistill.matched_tiles import cut_tile, local_frames, read_manifest
from histodistill.registration import (
    RegistrationConfig,
    load_transform,
    map_points,
    register_slides,
    tile_centers_um,
)
from histodistill.slides import open_slide, read_rgb, resolve_mpp
from histodistill.tiling import TilingConfig, plan_tiles

REF = "GMH_S60"


def _centers(ref_path: Path) -> np.ndarray:
    plan = plan_tiles(ref_path, REF, TilingConfig(min_tissue=0.25))
    return tile_centers_um(plan.table, plan.metadata)


def register_phase(demo: Path, slides: list[str], fine_mpp: float, out: Path) -> dict:
    """Child process: register every pair, report seconds per pair, errors and peak RSS."""
    truth = json.loads((demo / "truth.json").read_text())["slides"]
    centers = _centers(demo / f"{REF}.tiff")
    params = RegistrationConfig(fine_mpp=fine_mpp)
    times, errors = [], []
    for slide in slides:
        start = time.perf_counter()
        register_slides(demo / f"{REF}.tiff", demo / f"{slide}.tiff", out / slide, centers, 112.0, params)
        times.append(time.perf_counter() - start)
        mapped = map_points(load_transform(out / slide), centers)
        errors.append(np.linalg.norm(mapped - reference_to_moving(truth[slide]["warp"], centers), axis=1))
    err = np.concatenate(errors)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"s_per_pair": float(np.mean(times)), "err_mean": err.mean(), "err_max": err.max(), "rss": rss}


def cut_phase(demo: Path, slides: list[str], transforms: Path, level0: bool) -> dict:
    """Child process: cut every reference tile from every slide; report tiles/s and peak RSS."""
    centers = _centers(demo / f"{REF}.tiff")
    frames = [local_frames(load_transform(transforms / s), centers, 56.0) for s in slides]
    start, n = time.perf_counter(), 0
    for slide_id, (mapped, jac) in zip(slides, frames, strict=True):
        with open_slide(demo / f"{slide_id}.tiff") as slide:
            mpp = resolve_mpp(dict(slide.properties)).mean
            for c, j in zip(mapped, jac, strict=True):
                tile = naive_cut(slide, mpp, c, j) if level0 else cut_tile(slide, mpp, c, j, 224, 0.5)
                n += tile.shape[0] == 224
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tiles_per_s": n / elapsed, "tiles": n, "rss": rss}


def naive_cut(slide, slide_mpp: float, center_um, jac, tile_px: int = 224, mpp: float = 0.5) -> np.ndarray:
    """Baseline: the tile's bounding box from level 0, the affine applied at full resolution."""
    lin = jac * mpp / slide_mpp
    offset = np.asarray(center_um) / slide_mpp - lin @ np.array([tile_px / 2, tile_px / 2])
    corners = np.array([[0, 0], [tile_px, 0], [0, tile_px], [tile_px, tile_px]], np.float64) @ lin.T + offset
    lo, hi = np.floor(corners.min(0)).astype(int) - 2, np.ceil(corners.max(0)).astype(int) + 2
    region = Image.fromarray(read_rgb(slide, lo[0], lo[1], 0, *(hi - lo)))
    b = offset - lo
    data = (lin[0, 0], lin[0, 1], b[0], lin[1, 0], lin[1, 1], b[1])
    return np.asarray(
        region.transform((tile_px, tile_px), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    )


def in_child(target, *args) -> dict:
    """Run one phase in a fresh process (its own peak RSS); its exceptions propagate."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(target, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width-px", type=int, default=4096)
    parser.add_argument("--height-px", type=int, default=3072)
    parser.add_argument("--pairs", type=int, default=3, help="slide pairs registered")
    parser.add_argument("--fine-mpp", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        spec = PlismDemoConfig(args.width_px, args.height_px, scanners=("S60", "AT2", "GT450", "P"))
        # Rendered in a child: Linux keeps a process's peak RSS across fork + exec, so the parent stays small
        # and each phase's child reports its own peak.
        manifest = read_manifest(in_child(make_plism_demo, demo, 0, spec), REF)
        slides = [s for s in manifest["slide_id"] if s != REF][: args.pairs]
        ours = in_child(register_phase, demo, slides, args.fine_mpp, Path(tmp) / "ours")
        base = in_child(register_phase, demo, slides, args.fine_mpp / 2, Path(tmp) / "base")
        cut_ours = in_child(cut_phase, demo, slides, Path(tmp) / "ours", False)
        cut_base = in_child(cut_phase, demo, slides, Path(tmp) / "ours", True)
    level0_mb = args.width_px * args.height_px * 4 / 2**20
    reg_mb = level0_mb * (0.25 / args.fine_mpp) ** 2
    print(f"demo: reference {args.width_px}x{args.height_px} px at 0.25 µm/px, {len(slides)} slide pairs")
    for name, r, mpp in (("ours", ours, args.fine_mpp), ("base", base, args.fine_mpp / 2)):
        print(
            f"register {name} ({mpp:g} µm/px): {r['s_per_pair']:6.1f} s/pair  error mean {r['err_mean']:.2f} µm, "
            f"max {r['err_max']:.2f} µm  peak RSS {r['rss']:.0f} MB"
        )
    print(f"register ratio base/ours (time): {base['s_per_pair'] / ours['s_per_pair']:.2f}x")
    for name, r in (("ours", cut_ours), ("level-0 baseline", cut_base)):
        print(
            f"cut {name}: {r['tiles_per_s']:7.1f} matched tiles/s ({r['tiles']} tiles)  peak RSS {r['rss']:.0f} MB"
        )
    print(f"cut ratio ours/baseline: {cut_ours['tiles_per_s'] / cut_base['tiles_per_s']:.2f}x")
    print(
        f"memory: one registration image ≈ {reg_mb:.1f} MB of RGBA vs level 0 {level0_mb:.0f} MB (never read)"
    )


if __name__ == "__main__":
    main()
