"""The teacher-heads stage (distill/teacher_heads.py): trained heads use many prototypes, a collapsing setting
stops, the heads file is what distill loads, and no gradient reaches the EMA (teacher) heads."""

import dataclasses
import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from histodistill.cli import _HEADS_OPTIONS, main
from histodistill.distill.monitors import CollapseError
from histodistill.distill.objectives import build_teacher_heads
from histodistill.distill.teacher_heads import (
    HeadBatches,
    HeadsConfig,
    HeadsTrainer,
    read_heads,
    train_teacher_heads,
)
from histodistill.distill.trainer import DistillConfig
from histodistill.errors import HistodistillError
from histodistill.teacher_cache import TeacherCache
from histodistill.tiling import TilingConfig
from tests.helpers import make_teacher_cache, make_tile_store

K = 64
SMALL = HeadsConfig(
    n_prototypes=K,
    head_hidden=64,
    dino_bottleneck=32,
    ibot_bottleneck=32,
    iterations=150,
    batch_size=16,
    read_windows=4,
    warmup_iters=10,
    warmup_teacher_temp_iters=30,
    eval_batches=4,
    num_workers=0,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_slide):
    """54 tiles (224 px at 0.25 µm/px) of the demo slide, 2 views each, through the tiny H-Optimus-0 twin."""
    d = tmp_path_factory.mktemp("heads")
    store = make_tile_store(d, {"a": demo_slide}, TilingConfig(mpp=0.25, min_tissue=0.0), chunk_tiles=16)
    # two shards, so windows cross a shard boundary
    return make_teacher_cache(store, d, num_shards=2, batch_size=16)


def test_batches_are_deterministic_windows_with_sampled_patches(cache):
    batches = HeadBatches(cache, batch_size=16, n_patches=5, windows=4, seed=3)
    a, b = batches[7], batches[7]
    assert a["cls"].shape == (2, 16, 64) and a["patch"].shape == (2, 16, 5, 64)
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["patch"], b["patch"])
    assert not torch.equal(batches[8]["cls"], a["cls"])
    whole = TeacherCache(cache).read(0, 54)  # across both shards, equal to per-row reads
    assert whole["cls"].shape == (54, 2, 64)
    assert (whole["patch"][30] == TeacherCache(cache).get(30)["patch"]).all()


def test_trained_heads_use_many_prototypes_and_load_into_distill(tmp_path, cache):
    """Floor: K/8 = 8 effective prototypes for each head. A collapsed head gives 1.0 (the next test's run
    reaches it), the default collapse_floor is 4; 8 of 64 is twice that and 8× the collapsed count, while
    the demo's trained heads reach ≈ 56 (DINO) and ≈ 20 (iBOT, per-token targets of 16 tiles × 2 views ×
    16 sampled patches). The DINO targets must also not be the uniform collapse: entropy below log K − 0.2.
    """
    out = tmp_path / "demo.heads.safetensors"
    options = [f"--{k.replace('_', '-')}={getattr(SMALL, k)}" for k in _HEADS_OPTIONS if k != "seed"]
    argv = ["train-heads", "--teacher", "h_optimus_0_tiny", "--cache", str(cache), "--out", str(out)]
    assert main(argv + options) == 0
    state, meta = read_heads(out)
    summary = meta["summary"]
    assert summary["eval_dino_eff_prototypes"] >= K / 8 and summary["eval_ibot_eff_prototypes"] >= K / 8
    assert summary["eval_dino_entropy"] < math.log(K) - 0.2
    assert meta["teacher"] == "h_optimus_0_tiny" and meta["architecture"]["n_prototypes"] == K
    assert meta["provenance"]["params"] == json.loads(json.dumps(dataclasses.asdict(SMALL)))
    log = pd.read_parquet(out.with_suffix("") / "train_log.parquet")
    assert len(log) == SMALL.iterations and log["dino_eff_prototypes"].tail(20).mean() >= K / 8
    assert (out.with_suffix("") / "loss.png").stat().st_size > 10_000
    # the file is what distill loads for teacher_heads: <path>; other dimensions are refused by name
    run = DistillConfig(n_prototypes=K, head_hidden=64, dino_bottleneck=32, ibot_bottleneck=32)
    heads = build_teacher_heads(replace(run, teacher_heads=str(out)), 64)
    assert all(torch.equal(heads.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(HistodistillError, match="n_prototypes 64 in the file, 128 in the run"):
        build_teacher_heads(replace(run, teacher_heads=str(out), n_prototypes=128), 64)
    assert main([*argv[:2], "h_optimus_0", *argv[3:]]) == 2  # the cache holds another teacher's tokens
    with pytest.raises(HistodistillError, match="not h_optimus_0's"):
        train_teacher_heads(cache, tmp_path / "x.safetensors", SMALL, teacher="h_optimus_0")


def test_ema_heads_get_no_gradient_and_follow_the_student(cache):
    trainer = HeadsTrainer(replace(SMALL, iterations=3), cache)
    before = [p.clone() for p in trainer.objective.teacher_heads.parameters()]
    for k in range(3):
        trainer.step(trainer.batches[k])
        trainer.iteration += 1
    teacher, student = trainer.objective.teacher_heads, trainer.objective.student_heads
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    moved = [not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True)]
    assert any(moved)  # the EMA followed the student
    opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt & {id(p) for p in teacher.parameters()}


def test_sharpening_without_centering_collapses_and_stops(tmp_path, cache):
    """DINO §5.3: sharpening alone (a low teacher temperature, no centre: center_momentum 1 keeps it at 0)
    lets one prototype dominate. Here the DINO head's effective prototypes fall to ≈ 1 within ~40
    iterations (teacher temperature 0.02 for a student at 0.1); the guard stops the run and names it."""
    cfg = replace(
        SMALL,
        iterations=120,
        lr=1e-2,
        teacher_temp=0.02,
        warmup_teacher_temp=0.02,
        center_momentum=1.0,
        collapse_floor=2.0,
        collapse_patience=10,
    )
    trainer = HeadsTrainer(cfg, cache, name="teacher heads of h_optimus_0_tiny (demo)")
    with pytest.raises(
        CollapseError, match=r"teacher heads of h_optimus_0_tiny \(demo\) collapsed: dino_eff_prototypes"
    ):
        trainer.fit(tmp_path / "log")
    log = pd.read_parquet(tmp_path / "log" / "train_log.parquet")
    assert len(log) < cfg.iterations and (log["dino_eff_prototypes"].tail(10) < 2.0).all()
    # the same run with centering does not stop
    healthy = HeadsTrainer(replace(cfg, center_momentum=0.9, iterations=60), cache)
    assert healthy.fit()["iterations"] == 60


def test_flat_targets_trip_the_entropy_ceiling_not_the_floor(tmp_path, cache):
    """The "flat" (uniform) collapse: a teacher temperature far above the student's (2.0 against 0.1) makes
    every target nearly uniform; the batch-mean target is then uniform too, so the effective-prototype
    floor (4) never sees it, but the mean target entropy stays above 0.95 log K and the guard stops the
    run, naming the figure."""
    cfg = replace(
        SMALL,
        iterations=60,
        teacher_temp=2.0,
        warmup_teacher_temp=2.0,
        collapse_patience=10,
        collapse_entropy_ceiling=0.95,
    )
    trainer = HeadsTrainer(cfg, cache, name="teacher heads (flat)")
    with pytest.raises(CollapseError, match=r"teacher heads \(flat\) collapsed to flat targets: \w+_entropy"):
        trainer.fit(tmp_path / "log")
    log = pd.read_parquet(tmp_path / "log" / "train_log.parquet")
    assert len(log) == 10  # stopped at the patience, with the evidence written
    assert (log["dino_eff_prototypes"] > K * 0.9).all()  # far above the floor: only the ceiling catches it
    assert (log[["dino_entropy", "ibot_entropy"]].max(axis=1) > 0.95 * math.log(K)).all()


def test_cli_options_are_the_heads_config_fields():
    fields = {f.name: type(f.default) for f in dataclasses.fields(HeadsConfig)}
    assert fields == _HEADS_OPTIONS
