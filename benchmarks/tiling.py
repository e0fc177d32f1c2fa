"""Tile pixel reading: ours vs the obvious loop a competent user writes, on two slides, in the same run.

baseline = one `OpenSlide.read_region` per tile at the *same* level ours reads (the coarsest level at or
           finer than the target µm/px), `.convert("RGB")`, resized to tile_px only when that level is not
           at the target (PIL bilinear, as ours), `np.asarray`: one thread, the tiles of the same table
ours     = `histodistill.tiling.iter_tile_pixels(..., workers=k)`: OpenSlide decodes straight into an array
           (one copy to RGB, no PIL round trip), k reader threads sharing the handle (OpenSlide's decoding
           and PIL's resize release the GIL), tiles yielded in table order

Slides (written to a temporary directory, deleted at the end):
- demo:  a demo slide (pyramidal tiled TIFF, 0.25 µm/px): tiles read at level 1, exactly 0.5 µm/px;
- large: a large single-level demo slide (one tiled level, 0.25 µm/px): tiles read at level 0, 448 px each,
         resized to 224. Both are made by the streaming `make_demo_slide` (memory bounded by tile rows).

Only pixel reading is timed (the tile table is planned once per slide). Every timed run opens a fresh
handle, so OpenSlide's tile cache starts empty; one untimed warm-up run per method puts the file in the page
cache and checks that every method yields the same pixels. Methods are interleaved within each repeat so a
busy machine slows them alike. Prints tiles/s (min and median time over the repeats) per slide, ours at 1,
2 and 4 threads, the process CPU time per tile (all threads; insensitive to other load on the machine), the
ratio ours/baseline (target ≥ 1.5× at 2 threads on 2 cores), the scaling of ours and the peak RSS.

Usage: python benchmarks/tiling.py [--demo-px 8192 6144 --large-px 12288 9216 --repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from histodistill.tiling import TileGrid, TilingConfig, iter_tile_pixels, plan_tiles

WORKERS = (1, 2, 4)


def baseline(path: Path, table, grid: TileGrid) -> str:
    digest = hashlib.sha256()
    with openslide.OpenSlide(path) as slide:
        for x0, y0 in zip(table["x0"].tolist(), table["y0"].tolist(), strict=True):
            image = slide.read_region((x0, y0), grid.level, (grid.read_px, grid.read_px)).convert("RGB")
            if grid.read_px != grid.tile_px:
                image = image.resize((grid.tile_px, grid.tile_px), Image.Resampling.BILINEAR)
            digest.update(np.asarray(image).data)
    return digest.hexdigest()


def ours(path: Path, table, grid: TileGrid, workers: int) -> str:
    digest = hashlib.sha256()
    with openslide.OpenSlide(path) as slide:
        for _, tile in iter_tile_pixels(slide, table, grid, workers=workers):
            digest.update(tile.data)
    return digest.hexdigest()


def bench_slide(name: str, path: Path, repeats: int) -> dict[str, list[float]]:
    plan = plan_tiles(path, name, TilingConfig(mpp=0.5, tile_px=224, min_tissue=0.5))
    table, grid = plan.table, plan.grid
    methods = {"baseline": lambda: baseline(path, table, grid)}
    methods |= {f"ours x{k}": (lambda k=k: ours(path, table, grid, k)) for k in WORKERS}
    digests = {label: run() for label, run in methods.items()}  # warm-up, and the same pixels everywhere
    assert len(set(digests.values())) == 1, f"{name}: methods disagree on the pixels: {digests}"
    times: dict[str, list[float]] = {label: [] for label in methods}
    cpu: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(repeats):
        for label, run in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    n = len(table)
    with openslide.OpenSlide(path) as slide:
        dims = slide.dimensions
    print(
        f"\n{name}: {dims[0]}x{dims[1]} px, {openslide_levels(path)} level(s); {n} tiles of {grid.tile_px} px "
        f"read as {grid.read_px} px at level {grid.level}{' + resize' if grid.read_px != grid.tile_px else ''}"
    )
    print(
        f"  {'method':<12} {'tiles/s (min t)':>16} {'tiles/s (median t)':>19} {'min s':>8} {'median s':>9} "
        f"{'CPU ms/tile':>12}"
    )
    for label, ts in times.items():
        lo, mid = min(ts), statistics.median(ts)
        cpu_ms = 1000 * statistics.median(cpu[label]) / n
        print(f"  {label:<12} {n / lo:16.1f} {n / mid:19.1f} {lo:8.3f} {mid:9.3f} {cpu_ms:12.2f}")
    base_lo, base_mid = min(times["baseline"]), statistics.median(times["baseline"])
    for k in WORKERS:
        ts = times[f"ours x{k}"]
        print(
            f"  ratio ours x{k} / baseline: {base_lo / min(ts):.2f}x (min)  {base_mid / statistics.median(ts):.2f}x "
            f"(median){'   target ≥ 1.5x' if k == 2 else ''}"
        )
    one = statistics.median(times["ours x1"])
    print(
        "  scaling of ours (median): "
        + ", ".join(f"{k}: {one / statistics.median(times[f'ours x{k}']):.2f}x" for k in WORKERS)
    )
    return times


def openslide_levels(path: Path) -> int:
    with openslide.OpenSlide(path) as slide:
        return slide.level_count


def make_slide(path: Path, seed: int, spec: DemoSlideConfig) -> None:
    """In a child process, so the peak RSS printed at the end is the reading's alone."""
    child = multiprocessing.get_context("spawn").Process(target=make_demo_slide, args=(path, seed, spec))
    child.start()
    child.join()
    assert child.exitcode == 0, f"making {path.name} failed"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-px", type=int, nargs=2, default=(8192, 6144), metavar=("W", "H"))
    parser.add_argument("--large-px", type=int, nargs=2, default=(12288, 9216), metavar=("W", "H"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(f"{cores} CPU core(s) available, load average {load:.1f} (threads compete with other processes)")
    with tempfile.TemporaryDirectory() as tmp:
        slides = {
            "demo": (Path(tmp) / "demo.tiff", DemoSlideConfig(*args.demo_px, mpp=0.25)),
            "large": (Path(tmp) / "large.tiff", DemoSlideConfig(*args.large_px, mpp=0.25, levels=1)),
        }
        for name, (path, spec) in slides.items():
            make_slide(path, 1, spec)
            bench_slide(name, path, args.repeats)
            path.unlink()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the reading process: {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
