"""iBOT on a random subset of the patch positions (`ibot_patches`, distill.objectives.DinoIbot): the subset
of every position is today's computation bit for bit, a subset is the loss over exactly the drawn positions,
its mean over draws is the all-token loss, the draw depends on (seed, iteration, row) only, and a run with
it resumes exactly."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from histodistill.distill.objectives import (
    IBOT_POSITIONS_TAG,
    DinoIbot,
    StepState,
    StudentTokens,
    TeacherTokens,
    ibot_positions,
)
from histodistill.distill.trainer import DistillConfig, Trainer
from histodistill.errors import HistodistillError

CFG = DistillConfig(n_prototypes=16, head_hidden=32, dino_bottleneck=8, ibot_bottleneck=6, ibot_weight=0.5)
B, P, D, DT, K = 3, 8, 12, 20, 16
ROWS = torch.tensor([11, 4, 27])


def _tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = TeacherTokens(torch.randn(2, B, DT, generator=g), torch.randn(2, B, P, DT, generator=g))
    student = StudentTokens(
        torch.randn(2 * B, D, generator=g).requires_grad_(),
        torch.randn(2 * B, P, D, generator=g).requires_grad_(),
        None,
    )
    return teacher, student


def _objective(cfg: DistillConfig) -> DinoIbot:
    torch.manual_seed(0)  # the student heads from the global RNG: the same heads for every cfg
    obj = DinoIbot(cfg, D, DT, teacher_patches=True)
    obj.centers["ibot"].center.copy_(torch.linspace(-0.2, 0.3, K)[None])
    return obj


def _run(obj: DinoIbot, step: StepState):
    """Targets, losses, the gradients of the student heads and tokens, the monitors and the new centres."""
    teacher, student = _tokens()
    targets = obj.teacher_targets(teacher, step)
    losses = obj.losses(student, targets, step)
    losses["total"].backward()
    heads = [p for p in obj.student_heads.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in heads] + [student.cls.grad, student.patch.grad]
    monitors = obj.monitors(targets, losses, step)
    obj.update_state(targets)
    return targets, losses, grads, monitors, obj.centers["ibot"].center.clone()


@pytest.mark.parametrize("n", [P, P + 5])
def test_a_subset_of_every_position_is_todays_computation_bit_for_bit(n):
    """n ≥ P draws every position in order, through the gather: losses, gradients (heads and tokens),
    monitors and the centre update equal the all-token computation exactly (torch.equal)."""
    step = StepState(iteration=5, teacher_temp=0.05, rows=ROWS)
    t_all, l_all, g_all, m_all, c_all = _run(_objective(CFG), step)
    t_sub, l_sub, g_sub, m_sub, c_sub = _run(_objective(replace(CFG, ibot_patches=n)), step)
    assert t_all.ibot_index is None
    assert torch.equal(t_sub.ibot_index, torch.arange(P).expand(2, B, P))
    assert torch.equal(t_sub.ibot_probs, t_all.ibot_probs)
    assert l_sub.keys() == l_all.keys() and all(torch.equal(l_sub[k], l_all[k]) for k in l_all)
    assert all(torch.equal(a, b) for a, b in zip(g_sub, g_all, strict=True))
    assert m_sub.keys() == m_all.keys() and all(torch.equal(m_sub[k], m_all[k]) for k in m_all)
    assert torch.equal(c_sub, c_all)


def _h(t: torch.Tensor, s: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row −Σ_k t_k log softmax(s/τ)_k, in float64."""
    return -(t.double() * torch.log_softmax(s.double() / tau, -1)).sum(-1)


def test_a_subset_is_the_loss_over_exactly_the_drawn_positions():
    n, tau_t = 3, 0.05
    step = StepState(iteration=7, teacher_temp=tau_t, rows=ROWS)
    obj = _objective(replace(CFG, ibot_patches=n))
    center = obj.centers["ibot"].center.clone()
    targets, losses, grads, monitors, new_center = _run(obj, step)
    teacher, student = _tokens()

    # the positions, by the documented recipe: per row, n smallest of P uniforms per view, sorted
    want = np.empty((2, B, n), dtype=np.int64)
    for b, row in enumerate(ROWS.tolist()):
        u = np.random.default_rng([CFG.seed, IBOT_POSITIONS_TAG, 7, row]).random((2, P))
        want[:, b] = np.sort(np.argsort(u, axis=-1)[:, :n], axis=-1)
    assert torch.equal(targets.ibot_index, torch.from_numpy(want))
    assert all(len(set(want[v, b])) == n for v in range(2) for b in range(B))  # without replacement

    with torch.no_grad():  # the heads on exactly those tokens, teacher and student alike
        t_tok = torch.stack([teacher.patch[v, b, want[v, b]] for v in range(2) for b in range(B)])
        s_tok = torch.stack([student.patch[v * B + b, want[v, b]] for v in range(2) for b in range(B)])
        t_logits = obj.teacher_heads["ibot"](t_tok.reshape(-1, DT))
        s_logits = obj.student_heads["ibot"](s_tok.reshape(-1, D))
        t_probs = torch.softmax((t_logits.double() - center.double()) / tau_t, -1)
        per_token = _h(t_probs, s_logits, CFG.student_temp)
    assert targets.ibot_probs.shape == (2 * B * n, K)
    assert losses["ibot"].item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    # the centre's EMA and the monitors over the drawn tokens only
    torch.testing.assert_close(new_center, 0.9 * center + 0.1 * t_logits.mean(0, keepdim=True))
    entropy = -(t_probs * t_probs.clamp_min(1e-30).log()).sum(-1).mean()
    assert monitors["ibot_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    # the gradient reaches the drawn student tokens and no other
    drawn = torch.zeros(2 * B, P, dtype=torch.bool)
    for v in range(2):
        for b in range(B):
            drawn[v * B + b, want[v, b]] = True
    grad = grads[-1].norm(dim=-1)  # the student's patch tokens' [2B, P]
    assert (grad[drawn] > 0).all() and (grad[~drawn] == 0).all()


def test_the_mean_over_draws_is_the_all_token_loss():
    """Monte Carlo over 400 iterations (fresh positions each, heads and centre fixed, softmax centering):
    the mean subset loss is within 4 standard errors of the all-token loss (SE: the draws' standard
    deviation / √400); the draws do vary (SE > 0), and each one is a mean over 2·B·n tokens."""
    n, m = 2, 400
    teacher, student = _tokens()
    with torch.no_grad():
        full = _objective(CFG)
        step = StepState(0, 0.05, ROWS)
        want = full.losses(student, full.teacher_targets(teacher, step), step)["ibot"].item()
        sub = _objective(replace(CFG, ibot_patches=n))
        draws = []
        for it in range(m):
            step = StepState(it, 0.05, ROWS)
            draws.append(sub.losses(student, sub.teacher_targets(teacher, step), step)["ibot"].item())
    draws = np.array(draws)
    se = draws.std(ddof=1) / np.sqrt(m)
    assert se > 1e-4
    assert abs(draws.mean() - want) < 4 * se, (draws.mean(), want, se)


def test_positions_depend_on_seed_iteration_and_row_not_on_the_batch_split():
    """What makes 2 processes draw what 1 process does, and a resume what the run did."""
    whole = ibot_positions(0, StepState(3, 0.04, torch.tensor([5, 9, 2, 40])), 4, 64, 8)
    halves = [ibot_positions(0, StepState(3, 0.04, torch.tensor(r)), 2, 64, 8) for r in ([5, 9], [2, 40])]
    assert whole.shape == (2, 4, 8) and torch.equal(torch.cat(halves, 1), whole)
    assert (whole.diff(dim=-1) > 0).all() and whole.min() >= 0 and whole.max() < 64
    other_it = ibot_positions(0, StepState(4, 0.04, torch.tensor([5, 9, 2, 40])), 4, 64, 8)
    other_seed = ibot_positions(1, StepState(3, 0.04, torch.tensor([5, 9, 2, 40])), 4, 64, 8)
    assert not torch.equal(other_it, whole) and not torch.equal(other_seed, whole)
    assert not torch.equal(whole[0], whole[1])  # the two views draw their own positions
    with pytest.raises(HistodistillError, match="ibot_patches must be at least 1"):
        DinoIbot(replace(CFG, ibot_patches=0), D, DT, teacher_patches=True)
    with pytest.raises(HistodistillError, match="3 sample ids for a batch of 4"):
        ibot_positions(0, StepState(0, 0.04, torch.tensor([1, 2, 3])), 4, 64, 8)


def test_a_run_with_a_subset_resumes_exactly(tmp_path, demo_store, demo_cache):
    cfg = DistillConfig(
        iterations=6,
        batch_size=4,
        n_prototypes=128,
        head_hidden=128,
        num_workers=0,
        checkpoint_every=100,
        warmup_epochs=1,
        warmup_teacher_temp_epochs=2,
        lr=2e-3,
        ibot_patches=4,
    )
    Trainer(cfg, demo_store, demo_cache, tmp_path / "full").fit()
    assert Trainer(cfg, demo_store, demo_cache, tmp_path / "resumed").fit(stop_after=3) == {"stopped_at": 3}
    Trainer(cfg, demo_store, demo_cache, tmp_path / "resumed").fit()
    a = pd.read_parquet(tmp_path / "full" / "train_log.parquet")
    b = pd.read_parquet(tmp_path / "resumed" / "train_log.parquet")
    cols = ["loss_total", "loss_dino", "loss_ibot", "grad_norm", "ibot_entropy", "ibot_eff_prototypes"]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b[cols].to_numpy(), a[cols].to_numpy(), rtol=1e-6, atol=1e-7)
    # and it is a subset: the same run on every token logs other iBOT losses
    Trainer(replace(cfg, ibot_patches=None), demo_store, demo_cache, tmp_path / "all").fit()
    c = pd.read_parquet(tmp_path / "all" / "train_log.parquet")
    assert not np.allclose(c["loss_ibot"].to_numpy(), a["loss_ibot"].to_numpy())
