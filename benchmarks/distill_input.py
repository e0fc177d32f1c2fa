"""Distillation input pipeline: `DistillDataset` + DataLoader samples/s per CPU core, peak memory, profile.

What a cached distillation step consumes per sample, at the paper's shapes (configs/h0mini.yaml): a 224 px
tile read from the tile store (zstd, one tile per inner chunk), its cache row (view parameters + the
teacher's CLS [2, 1536] and `pool2` patch tokens [2, 64, 1536], fp16, converted on the training device),
the 2 global views rebuilt from the stored parameters, `--n-local` local crops (h0mini: 0), collated into
batches of `--batch` (h0mini: 64 per GPU). As the trainer runs it (`--photometric device`), the loader only
crops, flips and resizes (`augment.geometric`); the photometric part (`augment.photometric`: color jitter,
grayscale, blur, solarize) runs batched in the step on `--device` (`finish_views`), timed here on one
collated batch. `--photometric loader` renders everything in the loader (`augment.render`), as before.

Data: real H&E-like pixels (tiles of the demo slide, cycled to `--tiles` rows of a tile store written
with the production `create_tiles_array`), and a cache written with the production layout
(`create_row_array`, cache format 2) whose view parameters are `draw_views` of each tile, as
`cache_teacher` stores them (the token values are random: the pipeline never looks at them).

Per configuration a fresh process runs the loader (torch threads 1; warm-up batches, then `--repeats`
timed runs of `--batches` batches each; min and median printed) while a thread samples the PSS of it and
its workers (Linux /proc; peak of the sum, pages the forked workers share counted once). Per core: samples
per CPU-second of the loader process and its workers, the PSS sampler thread's own CPU time excluded
(the wall-clock rate is printed too; `num_workers 0` is one core; on a shared machine wall time counts
other users' load, CPU time does not, though cache contention still slows it). Memory is measured at two cache sizes (`--tiles` and 4×) to show it is flat
in cache size. A cProfile of the single-core run attributes the time to tile decode, cache read, crop and
resize, photometric (loader mode), collation. Target: ≥ 200 samples/s per core (8 GPUs training a
ViT-B/14 need that from 64 cores).

Measured on this project's 2-core CI machine, shared (load average 19–24), 2026-11-30, `--tiles 256
--repeats 3`, the code before and after the direct tile reader and the channels-last crop resize run
side by side: samples per CPU-second, num_workers 0, median 148.0 before → 256.5 after (min 130.9 →
214.7); num_workers 2, median 85.4 → 122.5 (min 47.5 → 84.7); 1,024 tiles, num_workers 2 (run as the
load fell to ~5–12), median 138.5 → 248.1 (min 131.2 → 247.6); peak PSS 604 → 603 MiB (workers 0), 1,719
→ 1,739 MiB (1,024 tiles, workers 2). Profile after: crop/flip/resize 36.5%, tile decode 24.5%, cache
read 18.9%, collation 9.1% (before: tile decode 62.6%, crop/flip/resize 22.0%).

Re-measured on the same machine, quiet (load average 0.7 at start, 1.4 at most; nothing else running),
2026-12-01, defaults (`--repeats 5 --batches 4`): samples per CPU-second, num_workers 0, 1,024 tiles, median
692.1 (min 686.3); num_workers 2, 1,024 tiles, median 509.1 (min 472.4); num_workers 2, 4,096 tiles, median
567.5 (min 541.3): target ≥ 200 met at both cache sizes; peak PSS 1,890 MiB (1,024 tiles) vs 1,865 MiB (4,096
tiles), flat in cache size. Profile (num_workers 0): crop/flip/resize 39.8%, tile decode 22.8%, cache read
14.7%, collation 14.1%. The step-side photometric part on this CPU: 76.3 samples/s (median; a GPU's job).

    python benchmarks/distill_input.py                       # 1,024 and 4,096 tiles, workers 0 and 2
    python benchmarks/distill_input.py --workers 0 4 12 --tiles 1024     # a 16-core GPU machine (cuda)
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from histodistill.augment import VIEW_FIELDS, draw_views, global_kinds
from histodistill.teacher_cache import CACHE_FORMAT, create_row_array
from histodistill.tilestore import INDEX_COLUMNS, TileStore, create_tiles_array, write_index

D, V, PATCH = 1536, 2, 64  # H-Optimus-0's width, 2 cached views, pool2 tokens of a 16×16 grid
SHARD_ROWS = 1024  # teacher.batch_size 256 × chunk_batches 4


def demo_tiles(tmp: Path) -> np.ndarray:
    """The tiles [n, 224, 224, 3] of a small demo slide at 0.5 µm/px (as the pipeline tiles it)."""
    from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
    from histodistill.tilestore import pack_tiles
    from histodistill.tiling import TilingConfig, tile_slide

    child = multiprocessing.get_context("spawn").Process(
        target=make_demo_slide, args=(tmp / "s.tiff", 2, DemoSlideConfig(4096, 3072))
    )
    child.start()
    child.join()
    tile_slide(tmp / "s.tiff", "bench", tmp / "t.parquet", TilingConfig(min_tissue=0.3))
    pack_tiles([tmp / "t.parquet"], tmp / "demo.zarr")
    return TileStore(tmp / "demo.zarr").read(0, len(TileStore(tmp / "demo.zarr")))


def build(tmp: Path, tiles: np.ndarray, n: int) -> tuple[Path, Path]:
    """A tile store of n rows (the demo tiles cycled) and its format-2 cache (pool2, 2 views)."""
    store_path, cache_path = tmp / f"store-{n}.zarr", tmp / f"cache-{n}.zarr"
    root = zarr.open_group(store_path, mode="w", zarr_format=3)
    array = create_tiles_array(root, (n,), 224, chunk_tiles=64)
    for lo in range(0, n, 64):
        hi = min(n, lo + 64)
        array[lo:hi] = tiles[np.arange(lo, hi) % len(tiles)]
    index = {c: np.zeros(n, np.int64) for c in INDEX_COLUMNS}
    index["tile_id"] = np.arange(n, dtype=np.int64)
    write_index(root, index)
    root.attrs.update({"tile_px": 224, "mpp": 0.5, "n_tiles": n, "slides": [{"slide_id": "bench"}]})

    group = zarr.open_group(cache_path, mode="w", zarr_format=3)
    arrays = {
        "params": create_row_array(group, "params", (n, V, len(VIEW_FIELDS)), "float64", SHARD_ROWS),
        "view_digest": create_row_array(group, "view_digest", (n, V), "int64", SHARD_ROWS),
        "cls": create_row_array(group, "cls", (n, V, D), "float16", SHARD_ROWS),
        "patch": create_row_array(group, "patch", (n, V, PATCH, D), "float16", SHARD_ROWS),
    }
    rng = np.random.default_rng(0)
    for lo in range(0, n, SHARD_ROWS):
        hi = min(n, lo + SHARD_ROWS)
        arrays["params"][lo:hi] = np.stack(
            [draw_views(0, "bench", t, global_kinds(V), (224, 224)) for t in range(lo, hi)]
        )
        arrays["view_digest"][lo:hi] = 0
        arrays["cls"][lo:hi] = rng.standard_normal((hi - lo, V, D), dtype=np.float32)
        patch = np.empty((hi - lo, V, PATCH, D), np.float16)
        for a in range(0, hi - lo, 64):
            patch[a : a + 64] = rng.standard_normal(patch[a : a + 64].shape, dtype=np.float32)
        arrays["patch"][lo:hi] = patch
    group.attrs.update(
        {
            "complete": True,
            "cache_format": CACHE_FORMAT,
            "views": V,
            "patch_tokens": "pool2",
            "embed_dim": D,
            "provenance": {"rows": [0, n]},
        }
    )
    return store_path, cache_path


def _tree(pid: int) -> list[int]:
    """pid and its live descendants (Linux /proc: the loader's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # exited meanwhile
            pass
    return out


def _pss(pid: int) -> int:
    """Proportional set size in bytes (pages shared with the loader's forked workers counted once in the
    sum over processes; RSS where the kernel has no smaps_rollup)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except OSError:
        return 0.0


class PeakRSS:
    """Samples the PSS of this process and its children every 20 ms; `peak` is the largest sum seen.
    `cpu` is the sampling thread's own CPU time (reading /proc smaps costs kernel time, and its cost
    grows with wall time, so a loaded machine would inflate the loader's CPU time): excluded from the
    loader's CPU seconds."""

    def __init__(self):
        self.peak, self.cpu, self._stop = 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(p) for p in _tree(os.getpid())))
            self.cpu = time.thread_time()
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (the loader's workers)."""
    return sum(_cpu(p) for p in _tree(os.getpid()))


def run_loader(store, cache, workers, batch, batches, repeats, n_local, in_loader, profile):
    """In a fresh process: [samples/s per repeat], [samples per CPU second per repeat], peak PSS bytes,
    and (profile) the stage breakdown. `in_loader`: the photometric part runs in the loader (as before
    the trainer moved it to its device)."""
    from torch.utils.data import DataLoader

    from histodistill.distill.data import DistillDataset, EpochSampler

    torch.set_num_threads(1)
    dataset = DistillDataset(store, cache, n_local, 0, cached=True, photometric=in_loader)
    rows = np.arange(len(TileStore(store)))
    rates, per_cpu = [], []
    with PeakRSS() as rss:
        loader = DataLoader(
            dataset,
            batch_size=batch,
            sampler=EpochSampler(rows, 0),
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        for _ in range(3):  # warm-up: workers started, files opened
            next(it)
        for _ in range(repeats):
            start, cpu = time.perf_counter(), cpu_seconds() - rss.cpu
            for _ in range(batches):
                next(it)
            rates.append(batch * batches / (time.perf_counter() - start))
            per_cpu.append(batch * batches / (cpu_seconds() - rss.cpu - cpu))
        del it, loader
    stages = None
    if profile:
        it = iter(DataLoader(dataset, batch_size=batch, sampler=EpochSampler(rows, 1), num_workers=0))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(batches):
            next(it)
        profiler.disable()
        stages = breakdown(pstats.Stats(profiler))
    return rates, per_cpu, rss.peak, stages


def run_photometric(store, cache, batch, repeats, device):
    """In a fresh process: the trainer's step-side finishing of one collated batch (`finish_views`: the
    batched photometric part, uint8 views and their parameters moved to `device`), 3 warm-ups then
    `repeats` timed calls: [samples/s], [samples per CPU-second of this process]."""
    from torch.utils.data import default_collate

    from histodistill.distill.data import DistillDataset, finish_views

    torch.set_num_threads(1)
    dataset = DistillDataset(store, cache, 0, 0, cached=True, photometric=False)
    samples = default_collate([dataset[(row, 0)] for row in range(batch)])
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rates, per_cpu = [], []
    for i in range(3 + repeats):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        finish_views(samples, "globals", dev)
        sync()
        if i >= 3:
            rates.append(batch / (time.perf_counter() - start))
            per_cpu.append(batch / (time.process_time() - cpu))
    return rates, per_cpu


def window(batches: int, workers: int) -> int:
    """Batches per timed repeat: at least 8× the loader's prefetch depth (2 batches per worker), so a
    repeat measures the workers' steady rate, not batches they prefetched before it started."""
    return max(batches, 16 * workers)


def _in_child(queue, fn, *args):
    queue.put(fn(*args))


STAGES = (  # label, (file suffix, function name) whose cumulative time is the stage's
    ("tile decode (TileStore.__getitem__)", ("tilestore.py", "__getitem__")),
    ("cache read (TeacherCache.get)", ("teacher_cache.py", "get")),
    ("crop, flip, resize (geometric)", ("augment.py", "geometric")),
    ("photometric in the loader (render)", ("augment.py", "photometric")),
    ("local view params (draw_views)", ("augment.py", "draw_views")),
    ("fp16 → fp32 tokens (astype)", ("~", "<method 'astype' of 'numpy.ndarray' objects>")),
    ("collate (default_collate)", ("collate.py", "default_collate")),
)


def breakdown(stats: pstats.Stats) -> list[tuple[str, float]]:
    total = max(ct for (_, _, _, ct, _) in stats.stats.values())
    out = []
    for label, (suffix, name) in STAGES:
        ct = sum(v[3] for (f, _, fn), v in stats.stats.items() if f.endswith(suffix) and fn == name)
        out.append((label, ct / total))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="samples per batch (h0mini: 64 per GPU)")
    parser.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--n-local", type=int, default=0, help="local crops per sample (h0mini: 0)")
    parser.add_argument(
        "--photometric",
        choices=("device", "loader"),
        default="device",
        help="device (the trainer's way): the loader crops, flips, resizes; color jitter, grayscale, blur "
        "and solarize run batched on --device in the step. loader: all of it in the loader (before)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the batched step"
    )
    parser.add_argument("--dir", help="where to write the stores (default: a temporary directory)")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        tiles = demo_tiles(tmp)
        sizes = [args.tiles, 4 * args.tiles]
        paths = {n: build(tmp, tiles, n) for n in sizes}
        print(
            f"{len(tiles)} distinct demo tiles cycled; batch {args.batch}, {args.n_local} local crops, "
            f"cache pool2 2×[1+{PATCH}]×{D} fp16; {args.repeats} repeats × {args.batches} batches after "
            f"3 warm-up batches; torch threads 1; photometric part in the {args.photometric}"
            f"{f' ({args.device})' if args.photometric == 'device' else ''}; "
            f"{os.cpu_count()} CPUs here, load average "
            f"{os.getloadavg()[0]:.1f} at start (a shared machine: per CPU-second = samples / CPU time "
            "of the loader process and its workers, the figure a dedicated core approaches)"
        )
        profile = None
        for n in sizes:
            for workers in args.workers if n == sizes[0] else [max(args.workers)]:
                queue = ctx.Queue()
                child = ctx.Process(  # not a Pool: its daemonic processes may not start loader workers
                    target=_in_child,
                    args=(
                        queue,
                        run_loader,
                        *paths[n],
                        workers,
                        args.batch,
                        window(args.batches, workers),
                        args.repeats,
                        args.n_local,
                        args.photometric == "loader",
                        workers == 0 and n == sizes[0],
                    ),
                )
                child.start()
                rates, per_cpu, peak, stages = queue.get()
                child.join()
                profile = stages or profile
                cores = max(workers, 1)
                print(
                    f"cache {n:6d} tiles, num_workers {workers} ({window(args.batches, workers)} batches "
                    f"per repeat): wall min {min(rates):7.1f} median "
                    f"{statistics.median(rates):7.1f} samples/s ({statistics.median(rates) / cores:6.1f} per "
                    f"core); per CPU-second min {min(per_cpu):6.1f} median {statistics.median(per_cpu):6.1f} "
                    f"(target ≥ 200); peak PSS {peak / 2**20:5.0f} MiB (process + workers)"
                )
        if args.photometric == "device":
            queue = ctx.Queue()
            child = ctx.Process(
                target=_in_child,
                args=(queue, run_photometric, *paths[sizes[0]], args.batch, args.repeats, args.device),
            )
            child.start()
            rates, per_cpu = queue.get()
            child.join()
            print(
                f"step side, photometric part on {args.device} (finish_views, batch {args.batch}, 2 views "
                f"each, torch threads 1): min {min(rates):8.1f} median {statistics.median(rates):8.1f} "
                f"samples/s; per CPU-second of the training process min {min(per_cpu):8.1f} median "
                f"{statistics.median(per_cpu):8.1f}"
            )
        if profile:  # measured with num_workers 0 only
            print("profile (num_workers 0, cumulative share of loader time):")
            for label, share in profile:
                print(f"  {label:>38}: {share:6.1%}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
