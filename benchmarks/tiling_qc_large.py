"""Tiling with and without the QC image on a large single-level slide (issue 13, fault 9).

A single-level TIFF has no pyramid: every thumbnail is a decode of level 0. Before the fix the QC image
read the slide a second time (86 s to tile, 163 s with QC on 40,001 × 30,003 px); the QC image now
reuses the thumbnail read for the tissue mask, so QC should cost little beyond the tiling itself.

The slide is written streaming, tile by tile (tifffile with a tile iterator), so it is never held in RAM:
glass at RGB 242 with a few H&E-coloured tissue ellipses and sensor noise, deflate-compressed, 0.25 µm/px
in the TIFF resolution tags. It is deleted afterwards unless --keep.

Prints, per mode (tile only / tile + QC), the min and median wall and CPU time over --repeats runs after a
warm-up read of the file (page cache), the QC overhead ratio (with QC / without; the fair baseline is
tiling without QC) and the peak RSS of the tiling runs (each run in a fresh child process). CPU time is
the figure to compare on a shared, loaded machine.
To time another checkout (e.g. main before the fix) run it with that checkout's PYTHONPATH.

Usage: python benchmarks/tiling_qc_large.py [--width-px 40001 --height-px 30003 --repeats 2 --keep PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

TILE = 512
MPP = 0.25


def _tissue_lowres(width: int, height: int, step: int, seed: int) -> np.ndarray:
    """A bool tissue map at 1/step of level 0: a few random ellipses covering ~30 % of the slide."""
    h, w = -(-height // step), -(-width // step)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), bool)
    for _ in range(6):
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        a, b = rng.uniform(0.08, 0.2) * w, rng.uniform(0.08, 0.2) * h
        out |= ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
    return out


def _tiles(width: int, height: int, seed: int) -> Iterator[np.ndarray]:
    """The slide's tiles in row-major order (uint8 [TILE, TILE, 3]); tissue is pink/purple texture."""
    step = 64
    lowres = _tissue_lowres(width, height, step, seed)
    rng = np.random.default_rng(seed + 1)
    pink = np.array([215, 140, 185], np.float32)
    purple = np.array([120, 70, 160], np.float32)
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            sub = lowres[ty // step : (ty + TILE) // step + 1, tx // step : (tx + TILE) // step + 1]
            tissue = np.repeat(np.repeat(sub, step, 0), step, 1)[:TILE, :TILE]
            if tissue.shape != (TILE, TILE):
                tissue = np.pad(tissue, ((0, TILE - tissue.shape[0]), (0, TILE - tissue.shape[1])))
            noise = rng.normal(0, 3.0, (TILE, TILE, 1)).astype(np.float32)
            tile = np.full((TILE, TILE, 3), 242.0, np.float32)
            if tissue.any():
                mix = rng.random((TILE // 8, TILE // 8, 1)).astype(np.float32).repeat(8, 0).repeat(8, 1)
                tile = np.where(tissue[..., None], pink * (1 - 0.6 * mix) + purple * 0.6 * mix, tile)
            yield np.clip(tile + noise, 0, 255).astype(np.uint8)


def write_large_slide(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """Write a single-level tiled RGB TIFF of width × height px at 0.25 µm/px, streaming tile by tile."""
    res = 1e4 / MPP  # px per cm
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            _tiles(width, height, seed),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="zlib",
            compressionargs={"level": 1},
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
    return path


def _tile_child(path: str, out: str, qc: str | None, queue) -> None:
    from histodistill.tiling import TilingConfig, tile_slide

    start, cpu = time.perf_counter(), time.process_time()
    table = tile_slide(path, "large", out, TilingConfig(), qc=qc)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put((time.perf_counter() - start, time.process_time() - cpu, len(table), usage.ru_maxrss))


def timed_run(path: Path, out_dir: Path, with_qc: bool) -> tuple[float, float, int, float]:
    """(wall seconds, CPU seconds, tiles, peak RSS in MiB) of one `tile_slide` in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    qc = str(out_dir / "qc.png") if with_qc else None
    child = ctx.Process(target=_tile_child, args=(str(path), str(out_dir / "t.parquet"), qc, queue))
    child.start()
    seconds, cpu, n, rss_kb = queue.get()
    child.join()
    assert child.exitcode == 0, "tiling failed"
    return seconds, cpu, n, rss_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width-px", type=int, default=40001)
    parser.add_argument("--height-px", type=int, default=30003)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", help="write (or reuse) the slide here and do not delete it")
    args = parser.parse_args()
    import histodistill

    print(f"histodistill from {Path(histodistill.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(args.keep) if args.keep else tmp / "large.tiff"
        if not path.exists():
            start = time.perf_counter()
            write_large_slide(path, args.width_px, args.height_px)
            print(f"wrote {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - start:.0f} s")
        with open(path, "rb") as f:  # warm-up: the file in the page cache for every run alike
            while f.read(64 * 2**20):
                pass
        results = {}
        for with_qc in (False, True):
            runs = [timed_run(path, tmp, with_qc) for _ in range(args.repeats)]
            results[with_qc] = runs
            times, cpus = [r[0] for r in runs], [r[1] for r in runs]
            print(
                f"{'tile + QC' if with_qc else 'tile only'}: wall min {min(times):.1f} s, median "
                f"{statistics.median(times):.1f} s; CPU min {min(cpus):.1f} s, median {statistics.median(cpus):.1f} s "
                f"over {len(times)} run(s); {runs[0][2]} tiles; peak RSS {max(r[3] for r in runs):.0f} MiB"
            )
        for i, what in ((0, "wall"), (1, "CPU")):
            no_qc = min(r[i] for r in results[False])
            with_qc = min(r[i] for r in results[True])
            print(
                f"QC overhead ({what}): with QC / without = {with_qc / no_qc:.2f}x (1.00x = QC costs nothing)"
            )
        if not args.keep:
            path.unlink()


if __name__ == "__main__":
    main()
