"""Distillation step time: student-only vs cached teacher vs online teacher, and the teacher-heads stage.

(a) student only — student forward/backward + its heads against teacher tokens of the right shapes made once
                   in memory: no teacher model and no cache read at all (the views are rendered from
                   parameters drawn with `draw_views`, the same ones `cache_teacher` stored)
(b) cached       — the teacher tokens (CLS + pool2 patches) and view parameters read per sample from the
                   teacher cache by the DataLoader (`DistillDataset`, cached mode)
(c) online       — (a)'s data path (view parameters read from the cache) + the teacher's forward pass
(b0) cached_all  — (b) with the iBOT loss on every pooled patch token whatever `--distill-ibot-patches`
                   says: (b)/(b0) is the saving of `ibot_patches` (distill.objectives.DinoIbot), measured
                   interleaved with the other modes
(e) paired       — (b) on paired views (distill/pairs.py, `--pairing`; default `registered`): the student's
                   views rendered from the paired image with the cached views' parameters, so one extra
                   tile decode per sample (the other slide's matched tile) and no extra teacher pass. With
                   (e), every mode runs on a 2-slide matched-tile store made from the demo tiles (slide 1:
                   the tiles with their colour channels reversed, a stand-in for another staining), the
                   cache covering both slides, so (b) and (e) read the same store
(d) heads        — one step of the teacher-heads stage (distill/teacher_heads.py) on cached tokens only:
                   student DINO/iBOT heads forward/backward + EMA teacher heads forward, no backbone; its
                   batches are read before timing (the stage's I/O is not in the step)
Every distillation step includes its data loading (`next(loader)`, `--workers` per mode, prefetching); the
time a step waits for its batch is printed beside it (a step that waits is limited by the loader, not the model).

Shapes and chunking are the paper's (configs/h0mini.yaml) scaled by width only: 224 px views of 14 px patches,
2 cached views, `pool2` patch tokens (8×8 per view), cache shard files of 1,024 tiles (teacher.batch_size 256
× 4) with one tile per inner chunk, heads bottlenecks 384/256 and hidden 2,048; teacher:student =
ViT-L/14:ViT-S/14 here (ViT-g/14:ViT-B/14 in the paper; the script prints the measured FLOP ratio). Reduced
for a CPU, and printed: the batch (paper 64 per GPU) and the prototype count (paper 131,072).
Timing: after a warm-up step per mode, `--repeats` rounds, each running `--steps` steps of a, b, c in turn
(interleaved), every step timed alone; min and median over all timed steps. Targets: (b)/(a) ≤ 1.15,
(c)/(b) ≥ 2.5, (e)/(b) ≤ 1.15 (issue 15: a paired step costs at most 1.15× an unpaired one), and per sample
(d)/(b) ≤ 0.05 (the heads stage costs at most 5% of a distillation step).
`--distill-ibot-patches N` (configs/h0mini.yaml's runs: 8; default: every token) puts the iBOT loss of modes
a, b, c, e on N random pooled tokens per view (`ibot_patches`), taken before the heads run.
On a GPU: python benchmarks/distill_step.py --teacher h_optimus_0 --student h0_mini --teacher-weights W
    --batch-size 64 --prototypes 131072 --heads-batch-size 1024 --head-precision bf16 --ibot-patches 4
    --distill-ibot-patches 8 --modes student_only cached online cached_all
On this project's 2-core CPU machine, 2026-12-01 (defaults: ViT-L/14 → ViT-S/14, 14.1× FLOPs per image,
8,192 prototypes, fp32 heads, 1 torch thread; `--modes student_only cached online --batch-size 4 --steps 2
--repeats 5 --distill-ibot-patches 8 --heads-batch-size 64`, load 1–4, peak RSS 6.4 GB): (a) 2.764 s, (b)
2.720 s, (c) 11.817 s per step (median), heads 0.809 s per 64 tiles: (b)/(a) 0.98 (min 0.92), (c)/(b) 4.34
(min 4.44), (d)/(b) per tile 0.019 (min 0.021): the three targets hold on the CPU; the GPU figures are in
README (Performance).
`--profile`: after the timing, one more step of each mode (and of the heads stage) under torch.profiler (CPU,
and CUDA when present): the step's time by phase (the `distill.<phase>` / `heads.<phase>` labels of
`Trainer.step` and `HeadsTrainer.step`: teacher output, student forward, teacher targets, losses, backward,
optimizer, EMA, monitors) and its top `--profile-top` ops by self device time, so one GPU run says what
fills the cached step and what the online teacher adds ((c)/(b)). benchmarks/step_cost.py gives the FLOP
and memory-traffic account to read them against.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from histodistill.augment import draw_views, global_kinds
from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from histodistill.distill.data import DistillDataset, EpochSampler
from histodistill.distill.objectives import TeacherTokens
from histodistill.distill.teacher_heads import HeadsConfig, HeadsTrainer
from histodistill.distill.trainer import DistillConfig, Trainer
from histodistill.teacher_cache import cache_teacher, gather_teacher_cache
from histodistill.tilestore import ProcessLocal, TileStore, pack_tiles
from histodistill.tiling import TilingConfig, tile_slide

LETTER = {"student_only": "a", "cached": "b", "online": "c", "paired": "e", "cached_all": "b0"}


def gflops(name: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from histodistill.models import load_model

    model = load_model(name, random_init=True).model
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


class DrawnParams:
    """Stands in for the cache in (a): the view parameters of a row drawn as `cache_teacher` drew them
    (seed, slide, tile, view), so the student sees the same views as in (b) without any cache read."""

    def __init__(self, tiles: Path, seed: int, views: int):
        store = TileStore(tiles)
        self.slide_ids = [s["slide_id"] for s in store.attrs["slides"]]
        self.slide_index, self.tile_id = store.root["slide_index"][:], store.root["tile_id"][:]
        self.seed, self.kinds, self.hw = seed, global_kinds(views), store.tiles.shape[1:3]

    def get(self, row: int, fields=()) -> dict[str, np.ndarray]:
        slide = self.slide_ids[int(self.slide_index[row])]
        return {"params": draw_views(self.seed, slide, int(self.tile_id[row]), self.kinds, self.hw)}


def _open_drawn(tiles: Path, seed: int, views: int):
    return TileStore(tiles), DrawnParams(tiles, seed, views)


class Mode:
    """One distillation mode: its trainer and its prefetching loader."""

    def __init__(self, mode: str, trainer: Trainer, cache_seed: int, workers: int = 1):
        self.mode, self.trainer, self.times, self.waits = mode, trainer, [], []
        dataset = DistillDataset(
            trainer.tiles,
            trainer.cache_path,
            0,
            trainer.cfg.seed,
            cached=mode in ("cached", "paired", "cached_all"),
            pairing=trainer.pairing,
            photometric=False,  # as the trainer's loader: the photometric part runs batched on its device
        )
        if mode == "student_only":
            dataset._handles = ProcessLocal(partial(_open_drawn, trainer.tiles, cache_seed, dataset.n_views))
            b, dt = trainer.local_batch, trainer.teacher_dim
            grid = 224 // 14 // 2  # pool2
            g = torch.Generator().manual_seed(0)
            fixed = TeacherTokens(
                torch.randn(2, b, dt, generator=g).half().float().to(trainer.device),
                torch.randn(2, b, grid * grid, dt, generator=g).half().float().to(trainer.device),
            )
            trainer.get_teacher_output = lambda batch: fixed
        loader = DataLoader(
            dataset,
            batch_size=trainer.local_batch,
            sampler=EpochSampler(trainer.train_rows, 0),
            num_workers=workers,
            persistent_workers=True,
        )
        self.batches = iter(loader)

    def profile(self, top: int) -> None:
        """One step (its batch fetched first) under torch.profiler; prints its phases and top ops."""
        batch = next(self.batches)
        print_profile(
            lambda: self.trainer.step(batch),
            self.trainer.device,
            f"({LETTER[self.mode]}) {self.mode}",
            "distill.",
            top,
        )
        self.trainer.iteration += 1

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            batch = next(self.batches)
            waited = time.perf_counter() - start
            self.trainer.step(batch)
            if self.trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if timed:
                self.times.append(time.perf_counter() - start)
                self.waits.append(waited)
            self.trainer.iteration += 1


def print_profile(step, device: torch.device, title: str, phase_prefix: str, top: int) -> None:
    """Run `step()` once under torch.profiler (CPU, and CUDA when present); print the time per phase (the
    record_function labels starting with `phase_prefix`) and the `top` ops by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    dev = "device" if cuda else "cpu"

    def dev_total(e) -> float:  # µs: on the GPU for CUDA runs, else on the CPU
        return (
            getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) if cuda else e.cpu_time_total
        )

    def dev_self(e) -> float:
        if cuda:
            return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        return e.self_cpu_time_total

    print(f"\n-- profile of one step: {title} ({wall:.3f} s wall under the profiler) --")
    phases = sorted((e for e in events if e.key.startswith(phase_prefix)), key=dev_total, reverse=True)
    for e in phases:
        print(
            f"  phase {e.key:<28} {dev} {dev_total(e) / 1e3:9.1f} ms   cpu {e.cpu_time_total / 1e3:9.1f} ms"
        )
    total_self = sum(dev_self(e) for e in events if not e.key.startswith(phase_prefix)) or 1.0
    print(f"  top {top} ops by self {dev} time (of {total_self / 1e3:.1f} ms):")
    ops = sorted((e for e in events if not e.key.startswith(phase_prefix)), key=dev_self, reverse=True)
    for e in ops[:top]:
        print(
            f"    {e.key[:56]:<56} {dev_self(e) / 1e3:9.1f} ms {100 * dev_self(e) / total_self:5.1f} %  "
            f"({e.count} calls)"
        )


def make_matched_store(store_path: Path, out: Path) -> Path:
    """A 2-slide matched-tile store ([2, N, H, W, 3], as `matched_tiles` writes) from a cohort store: slide 0
    the tiles, slide 1 the same tiles with their colour channels reversed (a registered "other staining")."""
    import zarr

    from histodistill.provenance import provenance
    from histodistill.tilestore import create_tiles_array, write_index

    store = TileStore(store_path)
    tiles = store.read(0, len(store))
    n, px = len(tiles), tiles.shape[1]
    root = zarr.open_group(out, mode="w", zarr_format=3)
    create_tiles_array(root, (2, n), px, chunk_tiles=64)[...] = np.stack([tiles, tiles[..., ::-1]])
    index = {
        name: np.tile(store.root[name][:], 2) for name in ("tile_id", "x0", "y0", "level", "tissue_frac")
    }
    write_index(root, {"slide_index": np.repeat(np.arange(2, dtype=np.int32), n), **index})
    slides = [
        {"slide_id": sid, "slide_mpp": store.attrs["slides"][0]["slide_mpp"], "n_tiles": n}
        for sid in ("ref", "bgr")
    ]
    root.attrs.update(
        {
            "tile_px": px,
            "mpp": store.attrs["mpp"],
            "n_tiles": 2 * n,
            "tiles_per_slide": n,
            "slides": slides,
            "plism": {"reference": "ref"},
            "provenance": provenance({"benchmark_matched_store": str(store_path)}),
        }
    )
    return out


def time_heads(
    cache: Path, cfg: HeadsConfig, batch_tiles: int, steps: int, profile_top: int = 0
) -> tuple[list[float], int]:
    """Seconds per step of the teacher-heads stage on batches of `batch_tiles` tiles read beforehand
    (the stage's cache items concatenated up to that size); returns (times, tiles per batch). With
    `profile_top`, one more step is profiled (`print_profile`)."""
    trainer = HeadsTrainer(cfg, cache, device="auto")
    batches, k = [], 0
    for _ in range(steps + 1):
        parts, n = [], 0
        while n < batch_tiles:
            parts.append(trainer.batches[k])
            n, k = n + parts[-1]["cls"].shape[1], k + 1
        batches.append(
            {f: torch.cat([p[f] for p in parts], dim=1)[:, :batch_tiles] for f in ("cls", "patch")}
        )
    trainer.step(batches[0])  # warm-up
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        trainer.step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        trainer.iteration += 1
    if profile_top:
        print_profile(
            lambda: trainer.step(batches[-1]),
            trainer.device,
            f"(d) heads, {batch_tiles} tiles",
            "heads.",
            profile_top,
        )
    return times, int(batches[1]["cls"].shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="vit_l14_reg4")
    parser.add_argument("--student", default="vit_s14_reg4")
    parser.add_argument("--teacher-weights")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per step (paper: 64 per GPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds (steps × repeats ≥ 10)")
    parser.add_argument("--prototypes", type=int, default=8192, help="paper: 131072")
    parser.add_argument("--heads-batch-size", type=int, default=256, help="tiles per heads step (paper 1024)")
    parser.add_argument(
        "--ibot-patches",
        type=int,
        default=HeadsConfig().ibot_patches,
        help="iBOT tokens per view in the heads step (configs/h0mini.yaml: 8)",
    )
    parser.add_argument(
        "--distill-ibot-patches",
        type=int,
        default=None,
        help="iBOT tokens per view in the distillation steps, `ibot_patches` (default: all; configs/h0mini.yaml: 8)",
    )
    parser.add_argument(
        "--head-precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the DINO/iBOT heads' matmuls in every mode and the heads step (configs/h0mini.yaml: bf16)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["student_only", "cached", "online", "paired"],
        help="distillation modes to time (cached_all: cached with iBOT on every token)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one more step per mode: phases and top ops"
    )
    parser.add_argument("--profile-top", type=int, default=12, help="ops listed per profiled step")
    parser.add_argument("--pairing", default="registered", choices=["registered", "context", "downsample"])
    parser.add_argument(
        "--workers", type=int, default=1, help="DataLoader workers per mode (a GPU needs several to be fed)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        child = multiprocessing.get_context("spawn").Process(
            target=make_demo_slide, args=(tmp / "s.tiff", 2, DemoSlideConfig(3072, 2048))
        )
        child.start()
        child.join()
        tile_slide(tmp / "s.tiff", "bench", tmp / "t.parquet", TilingConfig(min_tissue=0.0))
        pack_tiles([tmp / "t.parquet"], tmp / "store.zarr")
        store = tmp / "store.zarr"
        if "paired" in args.modes:  # every mode on the matched store, so (b) and (e) read the same data
            store = make_matched_store(store, tmp / "matched.zarr")
        cache_teacher(  # the paper's cache: 2 views, pool2, shard files of 256 × 4 tiles
            args.teacher,
            store,
            tmp / "shard.zarr",
            views=2,
            patch_tokens="pool2",
            weights=args.teacher_weights,
            batch_size=8,  # the teacher's batch (CPU memory); shard files hold 8 × 128 = 1,024 tiles
            chunk_batches=128,
            num_workers=1,
            seed=seed,
        )
        gather_teacher_cache([tmp / "shard.zarr"], tmp / "cache.zarr")
        n_tiles = len(TileStore(store))
        cfg = DistillConfig(
            student=args.student,
            teacher=args.teacher,
            teacher_weights=args.teacher_weights,
            batch_size=args.batch_size,
            iterations=10**4,
            n_prototypes=args.prototypes,
            num_workers=1,
            holdout_fraction=0.0,
            checkpoint_every=10**9,
            seed=seed,
            head_precision=args.head_precision,
        )
        heads_cfg = HeadsConfig(
            n_prototypes=args.prototypes,
            ibot_patches=args.ibot_patches,
            read_windows=1,
            num_workers=0,
            head_precision=args.head_precision,
        )
        heads_times, heads_batch = time_heads(
            tmp / "cache.zarr",
            heads_cfg,
            args.heads_batch_size,
            args.steps * args.repeats,
            args.profile_top if args.profile else 0,
        )
        modes = [
            Mode(
                m,
                Trainer(
                    replace(
                        cfg,
                        teacher_mode="online" if m == "online" else "cached",
                        pairing={"source": args.pairing} if m == "paired" else {},
                        ibot_patches=None if m == "cached_all" else args.distill_ibot_patches,
                    ),
                    store,
                    tmp / "cache.zarr",
                    tmp / m,
                ),
                seed,
                args.workers,
            )
            for m in args.modes
        ]
        for m in modes:  # warm-up: loader worker started, first batches, allocator
            m.run(1, timed=False)
        for _ in range(args.repeats):
            for m in modes:
                m.run(args.steps)
        if args.profile:
            for m in modes:
                m.profile(args.profile_top)
        device, amp = modes[0].trainer.device, modes[0].trainer.amp
    ratio = gflops(args.teacher) / gflops(args.student)
    print(
        f"teacher {args.teacher} : student {args.student} = {ratio:.1f}x FLOPs per image; batch {args.batch_size} "
        f"(2 global views each), {args.prototypes} prototypes, pool2 cache of {n_tiles} tiles, device {device} "
        f"({amp or 'fp32'}; heads {args.head_precision}; iBOT on "
        f"{args.distill_ibot_patches or 'all'} pooled tokens per view), torch threads {torch.get_num_threads()}, "
        f"{args.workers} loader worker(s) per mode; "
        f"{args.repeats} interleaved rounds × {args.steps} steps per mode"
    )
    med = {m.mode: statistics.median(m.times) for m in modes}
    low = {m.mode: min(m.times) for m in modes}
    for m in modes:
        print(
            f"({LETTER[m.mode]}) {m.mode:>12}: min {low[m.mode]:7.3f}  median {med[m.mode]:7.3f} s/step  "
            f"{args.batch_size / med[m.mode]:7.2f} tiles/s  ({len(m.times)} steps; waiting for the loader: "
            f"median {statistics.median(m.waits):.3f} s)"
        )
    heads_med = statistics.median(heads_times)
    print(
        f"(d) {'heads':>12}: min {min(heads_times):7.3f}  median {heads_med:7.3f} s/step  "
        f"{heads_batch / heads_med:7.2f} tiles/s  (batch {heads_batch}, {args.ibot_patches} patch tokens "
        f"per view, {len(heads_times)} steps)"
    )
    if {"cached", "student_only"} <= set(med):
        print(
            f"cached / student-only = median {med['cached'] / med['student_only']:.2f}, "
            f"min {low['cached'] / low['student_only']:.2f} (target ≤ 1.15)"
        )
    if {"cached", "online"} <= set(med):
        print(
            f"online / cached       = median {med['online'] / med['cached']:.2f}, "
            f"min {low['online'] / low['cached']:.2f} (target ≥ 2.5)"
        )
    if {"cached", "paired"} <= set(med):
        print(
            f"paired ({args.pairing}) / cached = median {med['paired'] / med['cached']:.2f}, "
            f"min {low['paired'] / low['cached']:.2f} (target ≤ 1.15)"
        )
    if {"cached", "cached_all"} <= set(med):
        print(
            f"cached ({args.distill_ibot_patches or 'all'} iBOT tokens) / cached (all tokens) = median "
            f"{med['cached'] / med['cached_all']:.2f}, min {low['cached'] / low['cached_all']:.2f}"
        )
    if {"cached_all", "online"} <= set(med):
        print(
            f"online / cached (all tokens) = median {med['online'] / med['cached_all']:.2f}, "
            f"min {low['online'] / low['cached_all']:.2f} (the step before `ibot_patches`)"
        )
    if "cached" in med:
        per_tile = (heads_med / heads_batch) / (med["cached"] / args.batch_size)
        per_tile_min = (min(heads_times) / heads_batch) / (low["cached"] / args.batch_size)
        print(f"heads / cached, per tile = median {per_tile:.3f}, min {per_tile_min:.3f} (target ≤ 0.05)")


if __name__ == "__main__":
    main()
