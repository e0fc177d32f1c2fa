"""Multi-process distillation on one CPU node: each process's threads from the launcher vs inherited.

baseline = what the `distill` job ran before `distill.launch.process_threads`: torchrun's N processes with the
           thread counts Snakemake exports to a script job (`OMP_NUM_THREADS`, `MKL_NUM_THREADS` and the other
           `THREAD_VARS` = the rule's threads, which torchrun keeps), so each process runs all of them;
launch   = `distill.launch.torchrun_env(threads, N)`, what `launch` now hands the processes: threads // N each.

Shapes: the test demo's run (`config.yaml` `distill.runs.demo`: h0_mini_tiny student, h_optimus_0_tiny
cached teacher, 224 px tiles, 2 views, batch 8, 256 prototypes, the CLS term 0.3) on the tiles of one demo
slide (2048 × 1536, the test demo's size), the teacher cache written by the production `cache_teacher`
(random-init teacher: timing only); `teacher_heads: frozen` (seeded, the same matmuls as trained heads).
Per mode: one warm-up run, then `--repeats` runs, the modes interleaved; each run is a fresh torchrun of
`--iterations` iterations. Printed per mode: the trainer's own samples/s at its last logged iteration (the
step rate; min / median over the runs), the run's wall time and the CPU seconds of torchrun and its
processes (`RUSAGE_CHILDREN`), min / median; then the ratio launch / baseline of the median samples/s.

Measured on this project's 2-core machine, quiet (load 0.3 at the start), 2026-12-01, defaults (2 processes,
2 threads, 30 iterations, 3 runs per mode): baseline 4.7 samples/s (median; min 3.3), 62.8 s wall, 120.1 CPU s
per run; launch 41.5 samples/s (min 41.0), 15.0 s wall, 24.9 CPU s: **8.83×** in samples/s (a run's wall time
includes ~8 s of start-up, imports and the held-out agreement). By hand before (12 iterations, one run each):
quiet, OMP 2 (MKL unset) 3.9 vs OMP 1 40; beside a CI run, OMP 1 with MKL 2 still 1.6 vs 17 with both 1.

    python benchmarks/distill_launch.py                     # 2 processes, 2 threads (the test demo's job)
    python benchmarks/distill_launch.py --nproc 4 --threads 16 --iterations 40
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from histodistill.config import load_config
from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from histodistill.distill.launch import THREAD_VARS, launch_command, thread_env, torchrun_env
from histodistill.distill.trainer import DistillConfig
from histodistill.teacher_cache import cache_teacher, gather_teacher_cache
from histodistill.tilestore import pack_tiles
from histodistill.tiling import TilingConfig, tile_slide

RATE = re.compile(r"it \d+/\d+ .* ([0-9.]+) samples/s")


def demo_inputs(tmp: Path) -> tuple[Path, Path]:
    """The test demo's inputs at its size: one demo slide tiled and packed, and its teacher cache (2 views)."""
    make_demo_slide(tmp / "slide.tiff", 0, DemoSlideConfig(2048, 1536))
    tile_slide(tmp / "slide.tiff", "bench", tmp / "tiles.parquet", TilingConfig(min_tissue=0.3))
    pack_tiles([tmp / "tiles.parquet"], tmp / "store.zarr")
    shard = tmp / "shard-0.zarr"
    cache_teacher(
        "h_optimus_0_tiny", tmp / "store.zarr", shard, views=2, shard=0, num_shards=1, num_workers=0
    )
    gather_teacher_cache([shard], tmp / "cache.zarr")
    return tmp / "store.zarr", tmp / "cache.zarr"


def settings(iterations: int) -> dict:
    """`distill.runs.demo` of config.yaml (the demo's run, read from the file), with frozen heads, the
    demo's teacher, `iterations` and no checkpoints."""
    config = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    run = {k: v for k, v in config["distill"]["runs"]["demo"].items() if k != "cohort"}
    overrides = {"teacher": config["teacher"]["model"], "teacher_heads": "frozen", "iterations": iterations}
    return DistillConfig(**{**run, **overrides, "checkpoint_every": 10**6}).__dict__


def run(store: Path, cache: Path, out: Path, cfg: dict, nproc: int, env: dict) -> dict:
    """One torchrun of the trainer; its last logged samples/s, wall time and children's CPU seconds."""
    out.mkdir(parents=True)
    (out / "cfg.json").write_text(json.dumps(cfg))
    command = launch_command(out / "cfg.json", store, cache, out / "run", nproc_per_node=nproc)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rates = RATE.findall(done.stdout + done.stderr)
    if not rates:
        sys.exit(f"no samples/s line in the trainer's log:\n{(done.stdout + done.stderr)[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"rate": float(rates[-1]), "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes per node (the test demo: 2)")
    parser.add_argument(
        "--threads", type=int, default=2, help="the job's threads (the rule's; the test demo: 2)"
    )
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    modes = {
        "baseline": thread_env(args.threads),  # every THREAD_VARS = the job's threads, as Snakemake exports
        "launch": torchrun_env(args.threads, args.nproc),
    }
    for mode, env in modes.items():
        print(
            f"{mode}: " + ", ".join(f"{v}={env[v]}" for v in THREAD_VARS[:2]) + f" per process × {args.nproc}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        store, cache = demo_inputs(tmp)
        print(f"inputs: one demo slide tiled, packed and teacher-cached in {time.perf_counter() - t0:.1f} s")
        cfg = settings(args.iterations)
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        for k in range(args.repeats + 1):  # run 0: warm-up (file cache, imports), not counted
            for mode, env in modes.items():
                r = run(store, cache, tmp / f"{mode}-{k}", cfg, args.nproc, env)
                if k:
                    results[mode].append(r)
    print(f"{args.iterations} iterations of 8 per run, {args.repeats} runs per mode (min / median):")
    for mode, rs in results.items():
        line = [f"{mode:8s}"]
        for key, unit in (("rate", "samples/s"), ("wall", "s wall"), ("cpu", "CPU s")):
            values = [r[key] for r in rs]
            line.append(f"{min(values):7.1f} / {statistics.median(values):7.1f} {unit}")
        print("  ".join(line))
    ratio = statistics.median(r["rate"] for r in results["launch"]) / statistics.median(
        r["rate"] for r in results["baseline"]
    )
    print(f"launch / baseline, median samples/s: {ratio:.2f}×")


if __name__ == "__main__":
    main()
