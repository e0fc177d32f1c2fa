"""VICReg and SimCLR (the seed paper's joint-embedding losses) against values computed by hand, and their
objectives: expanders, cross-view pairs, shared vs separate weights, frozen vs co-trained teacher branch."""

import math
from dataclasses import replace

import pytest
import torch

from histodistill.distill.losses import Expander, nt_xent, vicreg_terms
from histodistill.distill.objectives import (
    Simclr,
    StepState,
    StudentTokens,
    TeacherTokens,
    Vicreg,
    build_objective,
)
from histodistill.distill.trainer import DistillConfig
from histodistill.errors import HistodistillError

SMALL = {"expander_dim": 6, "expander_layers": 3}
B, D, DT = 4, 5, 7
STEP = StepState(iteration=0, teacher_temp=0.04)


def test_vicreg_terms_by_hand():
    # x centred: [[-1, -1], [1, 1]] (var 2 in both dims); y centred: [[-1, 0], [1, 0]] (var 2 and 0)
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    t = vicreg_terms(x, y)
    assert t.invariance.item() == pytest.approx(0.5)  # (0 + 1 + 0 + 1) / 4
    # std of x: sqrt(2 + 1e-4) > 1 → 0; y: dim 1 std sqrt(1e-4) = 0.01 → (0 + 0.99) / 2, halved
    assert t.variance.item() == pytest.approx(0.99 / 2 / 2, rel=1e-6)
    # cov(x) = [[2, 2], [2, 2]]: off-diagonal 2² + 2² = 8, / D = 4; cov(y) = [[2, 0], [0, 0]]: 0
    assert t.covariance.item() == pytest.approx(4.0)
    with pytest.raises(HistodistillError, match="at least 2 pairs"):
        vicreg_terms(x[:1], y[:1])


def test_nt_xent_by_hand_with_its_temperature():
    e = torch.eye(2)
    # positives identical (cosine 1), negatives orthogonal: −log(e^(1/τ) / (e^(1/τ) + 2)) for every anchor
    for tau in (0.5, 0.25):
        assert nt_xent(e, e, tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-5)
    # positives orthogonal, one negative identical: −log(1 / (1 + 1 + e^(1/τ)))
    assert nt_xent(e, e.flip(0), 0.5).item() == pytest.approx(math.log(2 + math.exp(2)), rel=1e-6)
    # scale-free (cosine): scaling a row changes nothing
    assert nt_xent(3 * e, e, 0.5).item() == pytest.approx(nt_xent(e, e, 0.5).item())


def test_expander_is_three_dense_layers_with_relu_and_batch_norm():
    exp = Expander(5, width=8, n_layers=3)
    kinds = [type(m).__name__ for m in exp.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in exp.mlp if isinstance(m, torch.nn.Linear)] == [8, 8, 8]
    assert exp.mlp[-1].bias is None and exp(torch.randn(3, 5)).shape == (3, 8)
    assert "BatchNorm1d" not in [type(m).__name__ for m in Expander(5, 8, 3, batch_norm=False).mlp]


def _tokens(seed=0, teacher_dim=DT, grad=False):
    g = torch.Generator().manual_seed(seed)
    teacher = TeacherTokens(torch.randn(2, B, teacher_dim, generator=g).requires_grad_(grad), None)
    student = StudentTokens(torch.randn(2 * B, D, generator=g).requires_grad_(True), torch.zeros(0), None)
    return teacher, student


def test_vicreg_objective_is_the_weighted_terms_of_the_cross_view_pairs():
    torch.manual_seed(0)
    cfg = DistillConfig(objective="vicreg", objective_params=SMALL)
    obj = build_objective(cfg, D, DT, teacher_patches=False)
    assert isinstance(obj, Vicreg) and set(obj.student_heads) == {"expander", "teacher_expander"}
    teacher, student = _tokens()
    losses = obj.losses(student, obj.teacher_targets(teacher, STEP), STEP)
    za = obj.student_heads["teacher_expander"](teacher.cls.reshape(2 * B, DT))
    zb = obj.student_heads["expander"](student.cls)
    t1, t2 = vicreg_terms(za[:B], zb[B:]), vicreg_terms(za[B:], zb[:B])  # teacher view 0 ↔ student view 1
    for k in ("invariance", "variance", "covariance"):
        assert losses[k].item() == pytest.approx((getattr(t1, k) + getattr(t2, k)).item() / 2, rel=1e-5)
    want = 25 * losses["invariance"] + 25 * losses["variance"] + losses["covariance"]
    assert losses["total"].item() == pytest.approx(want.item(), rel=1e-6)
    losses["total"].backward()  # both expanders learn (the frozen teacher's tokens have no gradient)
    assert all(p.grad is not None for p in obj.student_heads.parameters())


def test_simclr_objective_shared_weights_use_one_expander_and_train_the_teacher_branch():
    torch.manual_seed(0)
    cfg = DistillConfig(objective="simclr", objective_params=SMALL, teacher_mode="cotrained_shared")
    obj = build_objective(cfg, D, D, teacher_patches=False)
    assert isinstance(obj, Simclr) and set(obj.student_heads) == {"expander"}
    teacher, student = _tokens(teacher_dim=D, grad=True)
    losses = obj.losses(student, obj.teacher_targets(teacher, STEP), STEP)
    exp = obj.student_heads["expander"]
    za, zb = exp(teacher.cls.reshape(2 * B, D)), exp(student.cls)
    want = (nt_xent(za[:B], zb[B:], 0.5) + nt_xent(za[B:], zb[:B], 0.5)) / 2
    assert losses["nt_xent"].item() == pytest.approx(want.item(), rel=1e-6)
    losses["total"].backward()  # co-trained: the gradient reaches the teacher branch's tokens
    assert teacher.cls.grad is not None and teacher.cls.grad.abs().sum() > 0
    separate = build_objective(replace(cfg, teacher_mode="cotrained_separate"), D, D, False)
    assert set(separate.student_heads) == {"expander", "teacher_expander"}
    assert Simclr.options({"temperature": 0.2}).temperature == 0.2


@pytest.mark.parametrize("objective", ["dino_ibot", "feature"])
def test_frozen_teacher_objectives_refuse_a_cotrained_teacher(objective):
    cfg = DistillConfig(objective=objective, teacher_mode="cotrained_separate")
    with pytest.raises(HistodistillError, match="cannot run with teacher_mode 'cotrained_separate'"):
        build_objective(cfg, D, D, True)
