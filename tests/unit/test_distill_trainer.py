import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from histodistill.distill.data import DistillDataset, EpochSampler, split_rows
from histodistill.distill.engine import dist_env
from histodistill.distill.monitors import CollapseError
from histodistill.distill.objectives import OBJECTIVES, Objective, StepState
from histodistill.distill.trainer import EXIT_REQUEUE, DistillConfig, Trainer, linear_cka
from histodistill.errors import HistodistillError
from histodistill.models import load_model
from histodistill.tiling import TilingConfig
from tests.helpers import make_teacher_cache, make_tile_store

MONITORS = [f"{h}_{m}" for h in ("dino", "ibot") for m in ("entropy", "eff_prototypes", "kl")]
CFG = DistillConfig(
    iterations=12,
    batch_size=4,
    n_prototypes=128,
    head_hidden=128,
    num_workers=0,
    checkpoint_every=100,
    warmup_epochs=1,
    warmup_teacher_temp_epochs=2,
    lr=2e-3,
    holdout_fraction=0.2,
)


@pytest.fixture(scope="module")
def data(demo_store, demo_cache):
    return demo_store, demo_cache


def test_sampler_is_deterministic_and_resumable():
    rows = np.arange(10)
    full = EpochSampler(rows, seed=3)
    first = [next(it) for it in [iter(full)] for _ in range(25)]
    resumed = EpochSampler(rows, seed=3, start=7)
    assert [next(it) for it in [iter(resumed)] for _ in range(18)] == first[7:]
    assert sorted(r for r, e in first[:10]) == list(range(10)) and {e for _, e in first[10:20]} == {1}
    ranks = [EpochSampler(rows, seed=3, rank=r, world_size=2) for r in (0, 1)]
    epoch0 = [set(s.epoch_rows(0)) for s in ranks]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 10
    train, hold = split_rows(50, 0.2, 0)
    assert len(hold) == 10 and not set(train) & set(hold)


def test_dist_env_prefers_torchrun_over_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist_env() == (3, 1, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist_env() == (1, 0, 2)


def _batch(store, cache, rows):
    """A batch with the cached targets and the online teacher's views (unpaired: the student's own)."""
    ds = DistillDataset(store, cache, n_local=2, seed=0, cached=True)
    online = DistillDataset(store, cache, n_local=0, seed=0, cached=False)
    batch = default_collate([ds[(r, 0)] for r in rows])
    batch["teacher_globals"] = default_collate([online[(r, 0)]["teacher_globals"] for r in rows])
    assert torch.equal(batch["teacher_globals"], batch["globals"])
    return batch


def test_cached_and_online_teacher_give_the_same_loss(tmp_path, data):
    """Tolerance: relative 1e-4 (both use fp16 teacher tokens; only batch-size numerics differ)."""
    store, cache = data
    batch = _batch(store, cache, [0, 3, 5, 8])
    losses = {}
    for mode in ("cached", "online"):
        trainer = Trainer(replace(CFG, teacher_mode=mode, n_local=2), store, cache, tmp_path / mode)
        with torch.no_grad():
            out, _ = trainer.compute_losses(
                trainer.get_teacher_output(batch), trainer.get_student_output(batch), StepState(0, 0.05)
            )
        losses[mode] = {k: float(v) for k, v in out.items()}
    assert losses["cached"].keys() == {"dino", "ibot", "total"}
    for key in losses["cached"]:
        assert losses["online"][key] == pytest.approx(losses["cached"][key], rel=1e-4)


@pytest.mark.parametrize("head_precision", ["fp32", "bf16"])
def test_kill_at_k_then_resume_gives_the_same_losses(tmp_path, data, head_precision):
    store, cache = data
    cfg = replace(CFG, head_precision=head_precision)
    full = Trainer(cfg, store, cache, tmp_path / "full")
    full.fit()
    interrupted = Trainer(cfg, store, cache, tmp_path / "resumed")
    assert interrupted.fit(stop_after=5) == {"stopped_at": 5}
    resumed = Trainer(cfg, store, cache, tmp_path / "resumed")
    resumed.fit()
    a = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    b = pd.read_parquet(tmp_path / "resumed" / "train_log.parquet")
    assert len(a) == len(b) == cfg.iterations
    cols = ["loss_total", "loss_dino", "loss_ibot", "lr", "teacher_temp", "grad_norm", *MONITORS]
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), rtol=1e-6, atol=1e-7)
    sa = load_model("student:x", weights=tmp_path / "full" / "student.safetensors").model.state_dict()
    sb = load_model("student:x", weights=tmp_path / "resumed" / "student.safetensors").model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_outputs_and_learning(tmp_path, data):
    store, cache = data
    summary = Trainer(replace(CFG, iterations=40), store, cache, tmp_path / "run").fit()
    out = tmp_path / "run"
    log = pd.read_parquet(out / "train_log.parquet")
    assert {
        "loss_dino",
        "loss_ibot",
        "lr",
        "weight_decay",
        "teacher_temp",
        "samples_per_s",
        "gpu_mem_gb",
        "weight_dino_eff",
        "weight_ibot_eff",
        *MONITORS,
    } <= set(log.columns)
    assert (log["weight_dino_eff"] == 1.0).all()  # the paper's normalisation
    assert (
        ((log[[c for c in MONITORS if "eff" in c]] >= 1) & (log[[c for c in MONITORS if "eff" in c]] <= 128))
        .all()
        .all()
    )
    assert log["loss_total"].tail(10).mean() < log["loss_total"].head(10).mean()  # it learns
    assert (out / "loss.png").stat().st_size > 10_000
    student = load_model("student:run", weights=out / "student_ema.safetensors")
    assert student.spec.num_prefix_tokens == 5
    assert json.loads((out / "agreement.json").read_text()) == pytest.approx(summary)


def test_feature_objective_increases_agreement(tmp_path, data):
    store, cache = data
    summary = Trainer(replace(CFG, objective="feature", iterations=40), store, cache, tmp_path / "f").fit()
    # the objective, measured on held-out tiles: the student's mapped tokens point where the teacher's do
    assert summary["agreement_feature_cos_after"] > summary["agreement_feature_cos_before"] + 0.1
    assert np.isfinite(summary["agreement_cka_after"])


def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path, data):
    store, cache = data
    cfg = replace(CFG, iterations=100_000)
    (tmp_path / "cfg.json").write_text(json.dumps(asdict(cfg)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histodistill.distill.trainer",
            str(tmp_path / "cfg.json"),
            str(store),
            str(cache),
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run").exists():
        time.sleep(0.5)
    time.sleep(8)  # let it train a few iterations
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] > 0 and len(state["log"]) == state["iteration"]


def test_linear_cka_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert linear_cka(x, x @ q * 3) == pytest.approx(1.0)  # invariant to rotation and scale
    assert linear_cka(x, rng.normal(size=(200, 5))) < 0.2


@pytest.mark.parametrize("ibot_patches", [None, 5])
def test_two_process_ddp_equals_one_process_with_the_same_total_batch(tmp_path, data, ibot_patches):
    """torchrun, 2 processes, gloo on CPU, 2 tiles each vs 1 process with 4 tiles; every patch token, or
    the iBOT loss on 5 drawn per view (each process draws for its own tiles, as one process does).
    Tolerance: relative 1e-4 (gradient all-reduce sums in another order)."""
    store, cache = data
    cfg = replace(CFG, iterations=6, ibot_patches=ibot_patches)
    Trainer(cfg, store, cache, tmp_path / "one").fit()
    (tmp_path / "cfg.json").write_text(json.dumps(asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "histodistill.distill.trainer",
            str(tmp_path / "cfg.json"),
            str(store),
            str(cache),
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = pd.read_parquet(tmp_path / "one" / "train_log.parquet")
    two = pd.read_parquet(tmp_path / "two" / "train_log.parquet")
    cols = ["loss_total", "loss_dino", "loss_ibot", "grad_norm", *MONITORS]
    np.testing.assert_allclose(two[cols].to_numpy(), one[cols].to_numpy(), rtol=1e-4)


def test_teacher_heads_load_from_a_checkpoint(tmp_path, data):
    from safetensors.torch import save_file

    from histodistill.distill.objectives import build_teacher_heads as _teacher_heads

    frozen = _teacher_heads(CFG, 64)
    state = {
        k: torch.randn_like(v) if k.endswith("weight") and "mlp" in k else v
        for k, v in frozen.state_dict().items()
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "heads.safetensors"))
    loaded = _teacher_heads(replace(CFG, teacher_heads=str(tmp_path / "heads.safetensors")), 64)
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(HistodistillError, match="not found"):
        _teacher_heads(replace(CFG, teacher_heads=str(tmp_path / "missing.safetensors")), 64)


def test_feature_objective_resumes_exactly(tmp_path, data):
    store, cache = data
    cfg = replace(CFG, objective="feature", iterations=6)
    Trainer(cfg, store, cache, tmp_path / "full").fit()
    assert Trainer(cfg, store, cache, tmp_path / "resumed").fit(stop_after=3) == {"stopped_at": 3}
    Trainer(cfg, store, cache, tmp_path / "resumed").fit()
    a = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    b = pd.read_parquet(tmp_path / "resumed" / "train_log.parquet")
    cols = ["loss_total", "loss_feature", "grad_norm"]
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), rtol=1e-6, atol=1e-7)


def test_checkpoint_of_the_old_format_is_refused_by_name(tmp_path, data):
    """A checkpoint from before objectives were plug-ins (heads under "model", centres under "centers")."""
    store, cache = data
    trainer = Trainer(CFG, store, cache, tmp_path / "run")
    old = trainer.state_dict()
    del old["format"], old["objective"], old["backbone"]
    old |= {"model": trainer.model.state_dict(), "centers": {}, "teacher_heads": {}}
    (tmp_path / "run").mkdir()
    torch.save(old, trainer.checkpoint_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(HistodistillError, match="checkpoint of format 1.*delete it to start over"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is before  # fit's handlers are gone again


class _ClsRegression(Objective):
    """A toy plug-in: MSE of the student's CLS through a linear map to the teacher's, and a step counter."""

    name = "cls_regression"

    def __init__(self, cfg, student_dim, teacher_dim, teacher_patches):
        super().__init__()
        self.student_heads["proj"] = nn.Linear(student_dim, teacher_dim)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def teacher_targets(self, teacher, step):
        return teacher.cls.flatten(0, 1).detach()

    def losses(self, student, targets, step):
        loss = (self.student_heads["proj"](student.cls) - targets).pow(2).mean()
        return {"mse": loss, "total": loss}

    def update_state(self, targets):
        self.updates += 1


def test_a_new_objective_plugs_in_with_its_state_checkpointed(tmp_path, data, monkeypatch):
    store, cache = data
    monkeypatch.setitem(OBJECTIVES, "cls_regression", _ClsRegression)
    cfg = replace(CFG, objective="cls_regression", iterations=4)
    assert Trainer(cfg, store, cache, tmp_path / "run").fit(stop_after=2) == {"stopped_at": 2}
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert int(state["objective"]["updates"]) == 2 and "student_heads.proj.weight" in state["objective"]
    resumed = Trainer(cfg, store, cache, tmp_path / "run")
    resumed.fit()
    assert int(resumed.objective.updates) == 4  # the counter came back from the checkpoint
    log = pd.read_parquet(tmp_path / "run" / "train_log.parquet")
    assert len(log) == 4 and np.isfinite(log["loss_mse"]).all()


def test_no_teacher_head_parameter_gets_a_gradient_during_distill(tmp_path, data):
    store, cache = data
    trainer = Trainer(replace(CFG, iterations=3), store, cache, tmp_path / "run")
    trainer.fit()
    assert all(p.grad is None and not p.requires_grad for p in trainer.objective.teacher_heads.parameters())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in trainer.objective.teacher_heads.parameters()}
    assert any(p.grad is not None for p in trainer.objective.student_heads.parameters())  # they did train


def test_collapse_floor_stops_the_run_naming_it_and_the_figure(tmp_path, data):
    """A floor above K can never be met (exp(H) ≤ K): the run stops after `collapse_patience` iterations
    and leaves its log behind."""
    store, cache = data
    cfg = replace(CFG, iterations=10, collapse_floor=CFG.n_prototypes + 1, collapse_patience=3)
    with pytest.raises(CollapseError, match=r"distill run 'demo' collapsed: dino_eff_prototypes .* \(0–2\)"):
        Trainer(cfg, store, cache, tmp_path / "demo").fit()
    assert len(pd.read_parquet(tmp_path / "demo" / "train_log.parquet")) == 3
    assert (tmp_path / "demo" / "loss.png").is_file()


def _student(path):
    return load_model("student:x", weights=path / "student.safetensors").model.state_dict()


def test_a_checkpoint_of_other_tiles_is_not_resumed_after_an_upstream_change(
    tmp_path, data, demo_slide, caplog
):
    """Issue 20.1: an interrupted run on one tile store, then a rerun on the store an upstream tiling change
    made (same out_dir): it starts over, and its student equals a fresh run's on the new store and differs
    from the student of the old one."""
    store, cache = data
    other_store = make_tile_store(
        tmp_path / "other", {"a": demo_slide}, TilingConfig(min_tissue=0.0, mpp=0.6)
    )
    other_cache = make_teacher_cache(other_store, tmp_path / "other", batch_size=4, chunk_batches=1)
    cfg = replace(CFG, iterations=6)
    assert Trainer(cfg, store, cache, tmp_path / "run").fit(stop_after=3) == {"stopped_at": 3}
    rerun = Trainer(cfg, other_store, other_cache, tmp_path / "run")
    assert rerun.stale_inputs(torch.load(rerun.checkpoint_path, weights_only=True)) == [
        "tiles",
        "teacher_cache",
    ]
    with caplog.at_level("INFO", logger="histodistill.distill.trainer"):
        rerun.fit()
    assert "other inputs (tiles, teacher_cache changed): starting over at iteration 0" in caplog.text
    assert "resumed" not in caplog.text
    assert not rerun.checkpoint_path.exists()  # a finished run leaves no checkpoint behind
    Trainer(cfg, other_store, other_cache, tmp_path / "fresh").fit()
    Trainer(cfg, store, cache, tmp_path / "old").fit()
    rerun_w, fresh_w, old_w = (_student(tmp_path / d) for d in ("run", "fresh", "old"))
    assert all(torch.equal(rerun_w[k], fresh_w[k]) for k in fresh_w)
    assert not all(torch.equal(rerun_w[k], old_w[k]) for k in old_w)
    a = pd.read_parquet(tmp_path / "run" / "train_log.parquet")
    b = pd.read_parquet(tmp_path / "fresh" / "train_log.parquet")
    assert a["iteration"].tolist() == list(range(cfg.iterations))
    np.testing.assert_array_equal(a["loss_total"].to_numpy(), b["loss_total"].to_numpy())


def test_changed_heads_weights_or_settings_are_detected(tmp_path, data, caplog):
    """Each recorded input is compared: another heads file's or weights file's content (same path), other
    settings, and a checkpoint that records no inputs at all (written before the binding)."""
    from safetensors.torch import save_file

    from histodistill.distill.objectives import build_teacher_heads

    store, cache = data
    heads = tmp_path / "heads.safetensors"
    frozen = build_teacher_heads(CFG, 64).state_dict()
    save_file({k: v.contiguous() for k, v in frozen.items()}, str(heads))
    cfg = replace(CFG, teacher_heads=str(heads), iterations=4)
    trainer = Trainer(cfg, store, cache, tmp_path / "run")
    assert trainer.fit(stop_after=2) == {"stopped_at": 2}
    state = torch.load(trainer.checkpoint_path, weights_only=True)
    assert set(state["inputs"]) == {"tiles", "teacher_cache", "teacher_heads", "teacher_weights", "settings"}
    assert state["inputs"]["teacher_heads"].startswith("sha256:")
    assert Trainer(cfg, store, cache, tmp_path / "run").stale_inputs(state) == []

    save_file({k: (v + 1).contiguous() for k, v in frozen.items()}, str(heads))  # same path, new content
    assert Trainer(cfg, store, cache, tmp_path / "run").stale_inputs(state) == ["teacher_heads"]

    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"one")
    state["inputs"] = Trainer(replace(cfg, teacher_weights=str(weights)), store, cache, tmp_path / "w").inputs
    weights.write_bytes(b"two")
    stale = Trainer(replace(cfg, teacher_weights=str(weights)), store, cache, tmp_path / "w").stale_inputs(
        state
    )
    assert stale == ["teacher_weights"]

    assert Trainer(replace(cfg, lr=1e-3), store, cache, tmp_path / "run").stale_inputs(
        torch.load(trainer.checkpoint_path, weights_only=True)
    ) == ["teacher_heads", "settings"]
    no_inputs = torch.load(trainer.checkpoint_path, weights_only=True)
    del no_inputs["inputs"]
    torch.save(no_inputs, trainer.checkpoint_path)
    resumed = Trainer(cfg, store, cache, tmp_path / "run")
    with caplog.at_level("WARNING", logger="histodistill.distill.trainer"):
        assert resumed.maybe_resume() is False
    assert resumed.iteration == 0 and "starting over at iteration 0" in caplog.text
