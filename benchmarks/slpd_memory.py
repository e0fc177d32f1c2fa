"""Peak memory and time of SLPD region pretraining, streamed from the region store vs loaded whole.

`pretrain_regions` reads a step's batch of regions from the Zarr store (one region per chunk) and, per epoch,
one slide's regions at a time for the k-means (histodistill.slide.pretrain): its peak memory should be flat in
the store size. The baseline is what a competent user writes first and what this pipeline did before: load
the store whole (`RegionStore.load`) and index the arrays in memory; here the same training loop is given a
store whose `read` indexes those in-memory arrays, so the two differ only in where regions come from.

Two synthetic stores (`--slides` slides × `--regions` regions of `--grid`² tokens of `--dim` floats; SLPD's
regions are 16² tokens of the patch encoder's width) are written once to `--work`; each measurement is one
full run (one epoch with L_intra and L_inter, a small region encoder so that the data, not the model,
dominates) in a fresh process, whose peak resident set size (`ru_maxrss`) is read at its end. One warm-up
run, then `--repeats` runs: min and median printed, and the ratio streamed / whole.

    python benchmarks/slpd_memory.py                          # 32 and 128 slides
    python benchmarks/slpd_memory.py --slides 32 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SETTINGS = dict(
    embed_dim=32,
    depth=1,
    num_heads=2,
    drop_path=0.0,
    head_prototypes=256,
    head_hidden=64,
    head_bottleneck=32,
    n_local_crops=2,
    epochs=1,
    warm_epochs=0,
    warmup_epochs=0,
    batch_size=32,
    n_prototypes=4,
    min_regions=8,
    kmeans_n_init=1,
    threads=1,
    preload_mib=0,
)  # fmt: skip  (preload_mib 0: always stream, whatever the size)

CHILD = r"""
import json, resource, sys, time
import numpy as np
from histodistill.slide.pretrain import RegionTrainConfig, pretrain_regions
from histodistill.slide.regions import RegionStore

store_path, out, mode, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])


class Whole(RegionStore):
    # the baseline: the store loaded whole, regions indexed in memory
    def __init__(self, path):
        super().__init__(path)
        data = self.load()
        self.tokens, self.mask = data["tokens"], data["mask"]

    def read(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        return self.tokens[rows], self.mask[rows]


t = time.perf_counter()
store = Whole(store_path) if mode == "whole" else RegionStore(store_path)
pretrain_regions(store, out, RegionTrainConfig(**settings), device="cpu")
seconds = time.perf_counter() - t
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}))
"""


def write_store(path: Path, n_slides: int, regions: int, grid: int, dim: int) -> float:
    """A synthetic region store; returns its tokens' size in MiB. Written slide by slide (flat memory)."""
    import zarr

    from histodistill.provenance import provenance

    rng = np.random.default_rng(0)
    n = n_slides * regions
    root = zarr.open_group(path, mode="w", zarr_format=3)
    tokens = root.create_array(
        "tokens", shape=(n, grid, grid, dim), chunks=(1, grid, grid, dim), dtype="float32"
    )
    mask = root.create_array("mask", shape=(n, grid, grid), chunks=(256, grid, grid), dtype="bool")
    styles = rng.normal(size=(4, dim)).astype(np.float32)
    for s in range(n_slides):
        kind = rng.integers(0, 4, size=(regions, grid, grid))
        block = styles[kind] + 0.3 * rng.normal(size=(regions, grid, grid, dim)).astype(np.float32)
        tokens[s * regions : (s + 1) * regions] = block
    mask[:] = rng.random((n, grid, grid)) > 0.1
    root.create_array("slide_index", data=np.repeat(np.arange(n_slides), regions).astype(np.int32))
    for name, dtype in (("row0", np.int32), ("col0", np.int32), ("x0", np.int64), ("y0", np.int64)):
        root.create_array(name, data=np.zeros(n, dtype))
    root.create_array("tissue_frac", data=np.full(n, 0.9, np.float32))
    root.attrs.update({"slides": [f"s{i}" for i in range(n_slides)], "grid": grid, "dim": dim, "n_regions": n,
                       "min_tissue": 0.0, "provenance": provenance({"n_slides": n_slides}), "complete": True})  # fmt: skip
    return n * grid * grid * dim * 4 / 2**20


def run_once(store: Path, mode: str, work: Path) -> dict:
    out = work / f"run-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(out), mode, json.dumps(SETTINGS)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--regions", type=int, default=8, help="regions per slide")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--dim", type=int, default=192, help="token width (the patch encoder's)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--work", type=Path, default=None, help="where the stores go (default: a temporary folder)"
    )
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slpd_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"settings: {SETTINGS}; regions {args.grid}² × {args.dim}, {args.regions} per slide; work {work}")
    print("slides | tokens MiB | streamed peak MiB (min, median) | whole peak MiB (min, median) | peak ratio "
          "streamed/whole | streamed s (min, median) | whole s (min, median) | time ratio")  # fmt: skip
    try:
        for n_slides in args.slides:
            store = work / f"regions-{n_slides}.zarr"
            size = write_store(store, n_slides, args.regions, args.grid, args.dim)
            res = {}
            for mode in ("streamed", "whole"):
                run_once(store, mode, work)  # warm-up (page cache, imports)
                res[mode] = [run_once(store, mode, work) for _ in range(args.repeats)]
            peak = {m: [r["peak_mib"] for r in v] for m, v in res.items()}
            secs = {m: [r["seconds"] for r in v] for m, v in res.items()}

            def mm(xs, fmt="{:.0f}"):
                return f"{fmt.format(min(xs))}, {fmt.format(statistics.median(xs))}"

            print(f"{n_slides} | {size:.0f} | {mm(peak['streamed'])} | {mm(peak['whole'])} | "
                  f"{min(peak['streamed']) / min(peak['whole']):.2f} | {mm(secs['streamed'], '{:.1f}')} | "
                  f"{mm(secs['whole'], '{:.1f}')} | {min(secs['streamed']) / min(secs['whole']):.2f}", flush=True)  # fmt: skip
            shutil.rmtree(store)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
