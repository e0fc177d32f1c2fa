"""Tiling throughput: ours vs a naive loop, on one demo slide, in the same run.

ours  = tissue mask + grid (`plan_tiles`) and batched pixel reading (`iter_tile_pixels`: the coarsest
        level at or finer than the target, one read_region per run of neighbouring tiles)
naive = the same tiles, one `read_region` per tile at level 0 followed by a resize to tile_px

Prints tiles/s for both, the ratio (target ≥ 3×), that both give the same tile count, and peak memory.
Usage: python benchmarks/tiling.py [--width-px 8192 --height-px 6144 --repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from histodistill.slides import open_slide, read_rgb
from histodistill.tiling import MAX_RUN_TILES, TilingConfig, iter_tile_pixels, plan_tiles


def ours(path: Path, params: TilingConfig) -> int:
    plan = plan_tiles(path, "bench", params)
    n = 0
    with open_slide(path) as slide:
        for _, tile in iter_tile_pixels(slide, plan.table, plan.grid):
            n += tile.shape[0] > 0
    return n


def naive(path: Path, params: TilingConfig) -> int:
    plan = plan_tiles(path, "bench", params)  # same tile set; the difference is how pixels are read
    side0 = round(plan.grid.footprint_px0)
    n = 0
    with open_slide(path) as slide:
        for x0, y0 in zip(plan.table["x0"], plan.table["y0"], strict=True):
            region = read_rgb(slide, int(x0), int(y0), 0, side0, side0)
            tile = np.asarray(
                Image.fromarray(region).resize((params.tile_px, params.tile_px), Image.Resampling.BILINEAR)
            )
            n += tile.shape[0] > 0
    return n


def best_of(fn, repeats: int, *args) -> tuple[float, int]:
    times, n = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width-px", type=int, default=8192)
    parser.add_argument("--height-px", type=int, default=6144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    args = parser.parse_args()
    params = TilingConfig(mpp=0.5, tile_px=224, min_tissue=args.min_tissue)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.tiff"
        spec = DemoSlideConfig(args.width_px, args.height_px, mpp=0.25)
        # Rendered in a child process, so the peak RSS below is the tiling's alone.
        child = multiprocessing.get_context("spawn").Process(target=make_demo_slide, args=(path, 1, spec))
        child.start()
        child.join()
        assert child.exitcode == 0, "slide rendering failed"
        t_ours, n_ours = best_of(ours, args.repeats, path, params)
        t_naive, n_naive = best_of(naive, args.repeats, path, params)
    assert n_ours == n_naive, (n_ours, n_naive)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slide_mb = args.width_px * args.height_px * 4 / 2**20
    run_mb = MAX_RUN_TILES * 224 * 224 * 4 * (1 + 1 / MAX_RUN_TILES) / 2**20
    print(f"slide {args.width_px}x{args.height_px} px at 0.25 µm/px → {n_ours} tiles of 224 px at 0.5 µm/px")
    print(f"ours : {n_ours / t_ours:8.1f} tiles/s  ({t_ours:.2f} s, best of {args.repeats})")
    print(f"naive: {n_naive / t_naive:8.1f} tiles/s  ({t_naive:.2f} s, best of {args.repeats})")
    print(f"ratio ours/naive: {t_naive / t_ours:.2f}x  (target ≥ 3x)")
    print(
        f"memory: largest read ≤ {run_mb:.1f} MB (one run of ≤ {MAX_RUN_TILES} tiles); level 0 RGBA would be "
        f"{slide_mb:.0f} MB; process peak RSS {rss_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
