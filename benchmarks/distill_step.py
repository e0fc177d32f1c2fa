"""Distillation step time: student-only vs cached teacher vs online teacher, same batch, same run.

(a) student only  — student forward/backward + its heads against fixed teacher tokens (no teacher model,
                    no cache reads; the fixed tokens still pass the small frozen teacher heads)
(b) cached        — (a) with the teacher tokens read from the teacher cache by the DataLoader
(c) online        — (a) + the teacher's forward pass on the same views
(d) heads         — one step of the teacher-heads stage (distill/teacher_heads.py) on cached tokens only:
                    student DINO/iBOT heads forward/backward + EMA teacher heads forward, same K, no
                    backbone; the batches are read before timing (the stage's I/O is not in the step)
Each of (a)–(c) includes data loading (views rebuilt from the cached parameters). Teacher:student = ViT-L/14 :
ViT-S/14 (the script prints the measured FLOP ratio). Targets: (b)/(a) ≤ 1.15, (c)/(b) ≥ 2.5, and per sample
(d)/(b) ≤ 0.05 (the heads stage costs at most 5% of a distillation step per tile).
On a GPU: python benchmarks/distill_step.py --teacher h_optimus_0 --student h0_mini --teacher-weights W
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from histodistill.distill.data import DistillDataset, EpochSampler
from histodistill.distill.objectives import TeacherTokens
from histodistill.distill.teacher_heads import HeadsConfig, HeadsTrainer
from histodistill.distill.trainer import DistillConfig, Trainer
from histodistill.teacher_cache import cache_teacher, gather_teacher_cache
from histodistill.tilestore import pack_tiles
from histodistill.tiling import TilingConfig, tile_slide


def gflops(name: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from histodistill.models import load_model

    model = load_model(name, random_init=True).model
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def time_steps(trainer: Trainer, mode: str, steps: int) -> float:
    cached = mode != "online"
    dataset = DistillDataset(trainer.tiles, trainer.cache_path, 0, trainer.cfg.seed, cached=cached)
    loader = DataLoader(
        dataset, batch_size=trainer.local_batch, sampler=EpochSampler(trainer.train_rows, 0), num_workers=1
    )
    batches = iter(loader)
    if mode == "student_only":  # fixed targets of the right shapes: no teacher, no cache reads in the step
        first = next(batches)
        fixed = TeacherTokens(
            first["teacher_cls"].transpose(0, 1).contiguous(),
            first["teacher_patch"].transpose(0, 1).contiguous(),
        )
        trainer.get_teacher_output = lambda batch: fixed
        trainer.objective.teacher_heads.requires_grad_(False)
    trainer.step(next(batches))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(next(batches))
    return (time.perf_counter() - start) / steps


def time_heads(cache: Path, cfg: HeadsConfig, steps: int) -> float:
    """Seconds per step of the teacher-heads stage on batches read beforehand (tokens only)."""
    trainer = HeadsTrainer(cfg, cache, device="auto")
    batches = [trainer.batches[k] for k in range(steps + 1)]
    trainer.step(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.step(batch)
        trainer.iteration += 1
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="vit_l14_reg4")
    parser.add_argument("--student", default="vit_s14_reg4")
    parser.add_argument("--teacher-weights")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--heads-batch-size", type=int, default=64, help="tiles per heads-stage step")
    parser.add_argument("--ibot-patches", type=int, default=HeadsConfig().ibot_patches)
    parser.add_argument(
        "--modes", nargs="+", default=["student_only", "cached", "online"], help="distillation modes to time"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        child = multiprocessing.get_context("spawn").Process(
            target=make_demo_slide, args=(tmp / "s.tiff", 2, DemoSlideConfig(3072, 2048))
        )
        child.start()
        child.join()
        tile_slide(tmp / "s.tiff", "bench", tmp / "t.parquet", TilingConfig(min_tissue=0.0))
        pack_tiles([tmp / "t.parquet"], tmp / "store.zarr")
        cache_teacher(
            args.teacher,
            tmp / "store.zarr",
            tmp / "shard.zarr",
            views=2,
            weights=args.teacher_weights,
            batch_size=8,
            num_workers=1,
        )
        gather_teacher_cache([tmp / "shard.zarr"], tmp / "cache.zarr")
        cfg = DistillConfig(
            student=args.student,
            teacher=args.teacher,
            teacher_weights=args.teacher_weights,
            batch_size=args.batch_size,
            iterations=1000,
            n_prototypes=args.prototypes,
            num_workers=1,
            holdout_fraction=0.0,
            checkpoint_every=10**9,
        )
        times = {}
        heads_cfg = HeadsConfig(
            n_prototypes=args.prototypes,
            batch_size=args.heads_batch_size,
            ibot_patches=args.ibot_patches,
            read_windows=1,
            num_workers=0,
        )
        heads_s = time_heads(tmp / "cache.zarr", heads_cfg, args.steps)
        for mode in args.modes:
            trainer = Trainer(
                replace(cfg, teacher_mode="online" if mode == "online" else "cached"),
                tmp / "store.zarr",
                tmp / "cache.zarr",
                tmp / mode,
            )
            times[mode] = time_steps(trainer, mode, args.steps)
    ratio = gflops(args.teacher) / gflops(args.student)
    print(
        f"teacher {args.teacher} : student {args.student} = {ratio:.1f}x FLOPs per image; batch {args.batch_size} "
        f"(2 global views each), {args.prototypes} prototypes, device {trainer.device}, torch threads {torch.get_num_threads()}"
    )
    for mode, seconds in times.items():
        print(
            f"(%s) {mode:>12}: {seconds:7.2f} s/step  {args.batch_size / seconds:6.2f} tiles/s"
            % {"student_only": "a", "cached": "b", "online": "c"}[mode]
        )
    print(
        f"(d) {'heads':>12}: {heads_s:7.2f} s/step  {args.heads_batch_size / heads_s:6.2f} tiles/s "
        f"(batch {args.heads_batch_size}, {args.ibot_patches} patch tokens per view)"
    )
    if {"cached", "student_only"} <= set(times):
        print(f"cached / student-only = {times['cached'] / times['student_only']:.2f} (target ≤ 1.15)")
    if {"cached", "online"} <= set(times):
        print(f"online / cached       = {times['online'] / times['cached']:.2f} (target ≥ 2.5)")
    if "cached" in times:
        per_tile = (heads_s / args.heads_batch_size) / (times["cached"] / args.batch_size)
        print(f"heads / cached, per tile = {per_tile:.3f} (target ≤ 0.05)")


if __name__ == "__main__":
    main()
