"""Teacher cache random-row reads per second vs the disk-speed floor: raw bytes from memory-mapped .npy files.

Shapes: the paper's (configs/h0mini.yaml): H-Optimus-0's 1,536-d tokens, 2 views per tile, 224 px views of
14 px patches (16×16 grid): `pool2` = 64 patch tokens per view (384 KiB of fp16 patches per tile), `full` =
256 (1.5 MiB). Shard files of 1,024 tiles (teacher.batch_size 256 × chunk_batches 4), one tile per inner
chunk: the layout `cache_teacher` writes (cache format 2), made here with the same `create_row_array`.

Both sides read the same random rows of the same arrays (cls [V, D] and patch [V, T, D], fp16; `--fields`):
- cache: `TeacherCache.get(row, fields)`, one call per row (what `DistillDataset` does per sample);
- floor: `np.load(mmap_mode="r")` of one .npy per array holding identical bytes, read with one fancy index
  per batch of rows (`m[rows]`: the cheapest way a competent user reads random rows from a flat file).
The page cache cannot be dropped here (no root): both sides are warm-cache (each file was just written and
is read once before timing), so the floor is memory bandwidth plus page-fault cost, not disk. Repeats are
interleaved (cache, floor, cache, floor, …), each on fresh random rows; min and median per row are printed.
Target: cache ≥ 0.5× the floor's rows/s.

    python benchmarks/cache_read.py                     # pool2 (2,048 tiles) and full (512 tiles)
    python benchmarks/cache_read.py --rows 4096 1024    # more tiles (1.5 GiB per side each)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from histodistill.augment import VIEW_FIELDS
from histodistill.teacher_cache import CACHE_FORMAT, TeacherCache, create_row_array

D, V, GRID = 1536, 2, 16
TOKENS = {"pool2": (GRID // 2) ** 2, "full": GRID * GRID}
SHARD_ROWS = 256 * 4  # teacher.batch_size × chunk_batches (the cache_teacher default)


def build(root: Path, mode: str, n: int, seed: int) -> tuple[Path, dict[str, Path]]:
    """A one-shard cache of n tiles at `mode`'s shapes and .npy files of the same bytes."""
    t = TOKENS[mode]
    shapes = {
        "params": ((n, V, len(VIEW_FIELDS)), "float64"),
        "view_digest": ((n, V), "int64"),
        "cls": ((n, V, D), "float16"),
        "patch": ((n, V, t, D), "float16"),
    }
    cache = root / f"{mode}.zarr"
    group = zarr.open_group(cache, mode="w", zarr_format=3)
    arrays = {k: create_row_array(group, k, shape, dtype, SHARD_ROWS) for k, (shape, dtype) in shapes.items()}
    npy = {k: root / f"{mode}-{k}.npy" for k in shapes}
    mmaps = {
        k: np.lib.format.open_memmap(npy[k], mode="w+", dtype=dtype, shape=shape)
        for k, (shape, dtype) in shapes.items()
    }
    rng = np.random.default_rng(seed)
    for lo in range(0, n, SHARD_ROWS):  # one shard file per write, as cache_teacher writes
        hi = min(n, lo + SHARD_ROWS)
        for k, (shape, dtype) in shapes.items():
            block = np.empty((hi - lo, *shape[1:]), dtype)
            for a in range(0, hi - lo, 64):  # float32 draws 64 rows at a time: memory ≈ one fp16 shard
                block[a : a + 64] = rng.standard_normal(block[a : a + 64].shape, dtype=np.float32)
            arrays[k][lo:hi] = block
            mmaps[k][lo:hi] = block
    for m in mmaps.values():
        m.flush()
    group.attrs.update(
        {
            "complete": True,
            "cache_format": CACHE_FORMAT,
            "views": V,
            "patch_tokens": mode,
            "embed_dim": D,
            "provenance": {"rows": [0, n]},
        }
    )
    return cache, npy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=["pool2", "full"], choices=list(TOKENS))
    parser.add_argument("--rows", nargs="+", type=int, default=[2048, 512], help="tiles per mode")
    parser.add_argument("--fields", nargs="+", default=["cls", "patch"])
    parser.add_argument("--batch", type=int, default=64, help="random rows per timed read (both sides)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dir", help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    fields = tuple(args.fields)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode, n in zip(args.modes, args.rows, strict=False):
            cache_path, npy = build(Path(tmp), mode, n, seed=0)
            cache = TeacherCache(cache_path)
            mmaps = {f: np.load(npy[f], mmap_mode="r") for f in fields}
            row_bytes = sum(mmaps[f][0].nbytes for f in fields)
            for f in fields:  # warm both sides: each byte read once
                np.asarray(mmaps[f][:]).sum()
            for row in range(n):
                cache.get(row, fields)
            rng = np.random.default_rng(1)
            times: dict[str, list[float]] = {"cache": [], "floor": []}
            for _ in range(args.repeats):
                rows = rng.integers(0, n, args.batch)
                start = time.perf_counter()
                got = [cache.get(int(r), fields) for r in rows]
                times["cache"].append((time.perf_counter() - start) / len(rows))
                start = time.perf_counter()
                floor = {f: mmaps[f][rows] for f in fields}
                times["floor"].append((time.perf_counter() - start) / len(rows))
                for f in fields:  # the same bytes
                    assert np.array_equal(np.stack([g[f] for g in got]), floor[f])
            print(
                f"{mode}: {n} tiles, {row_bytes / 1024:.0f} KiB per row ({'+'.join(fields)}, fp16), "
                f"{args.repeats} repeats × {args.batch} random rows, warm page cache"
            )
            for side, label in (("cache", "TeacherCache.get per row"), ("floor", "np.load mmap fancy read")):
                t = times[side]
                print(
                    f"  {label:>26}: min {min(t) * 1e3:7.3f} ms/row  median {statistics.median(t) * 1e3:7.3f} "
                    f"ms/row  ({1 / statistics.median(t):8.0f} rows/s, "
                    f"{row_bytes / statistics.median(t) / 2**30:5.2f} GiB/s)"
                )
            ratio_med = statistics.median(times["floor"]) / statistics.median(times["cache"])
            ratio_min = min(times["floor"]) / min(times["cache"])
            print(f"  cache / floor rows/s: median {ratio_med:.2f}, min-time {ratio_min:.2f} (target ≥ 0.5)")
            del cache, mmaps


if __name__ == "__main__":
    main()
