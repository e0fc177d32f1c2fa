import math

import numpy as np
import pytest
import torch

from histodistill.distill.centering import SoftmaxCenter, sinkhorn_center, sinkhorn_knopp
from histodistill.distill.heads import ProjectionHead
from histodistill.distill.losses import (
    FeatureAdapter,
    dino_loss,
    dino_pair_weight,
    feature_loss,
    ibot_loss,
    soft_cross_entropy,
)
from histodistill.distill.monitors import (
    CollapseError,
    CollapseGuard,
    TargetStats,
    effective_prototypes,
    entropy,
)
from histodistill.distill.schedules import Schedules, cosine_schedule, ema_update, warmup_then_constant
from histodistill.errors import HistodistillError


def test_soft_cross_entropy_by_hand():
    t = torch.tensor([[0.5, 0.5, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0]])
    # log softmax(s / 0.5) = [2, 0, 0] − log(e² + 2)
    lse = math.log(math.exp(2) + 2)
    expected = -(0.5 * (2 - lse) + 0.5 * (0 - lse))
    assert soft_cross_entropy(t, s, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_two_globals_is_the_symmetric_pair():
    g = torch.Generator().manual_seed(0)
    t1, t2 = (
        torch.softmax(torch.randn(4, 8, generator=g), -1),
        torch.softmax(torch.randn(4, 8, generator=g), -1),
    )
    s1, s2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    expected = (soft_cross_entropy(t1, s2, 0.1) + soft_cross_entropy(t2, s1, 0.1)) / 2
    assert torch.allclose(dino_loss([t1, t2], [s1, s2], 0.1), expected)
    local = torch.randn(4, 8, generator=g)
    with_local = dino_loss([t1, t2], [s1, s2, local], 0.1)
    terms = [
        soft_cross_entropy(t1, s2, 0.1),
        soft_cross_entropy(t1, local, 0.1),
        soft_cross_entropy(t2, s1, 0.1),
        soft_cross_entropy(t2, local, 0.1),
    ]
    assert torch.allclose(with_local, torch.stack(terms).mean())


def _dense_ibot(s, u, c, ts, tt):
    t = torch.softmax((u.double() - c.double()) / tt, -1)
    return -(t * torch.log_softmax(s.double() / ts, -1)).sum(-1).mean()


def test_chunked_ibot_equals_dense_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 10, 16, generator=g, requires_grad=True)  # [crops, batch, patches, K]
    u = torch.randn(2, 3, 10, 16, generator=g)
    c = torch.randn(16, generator=g) * 0.1
    loss = ibot_loss(s, u, c, 0.1, 0.05, chunk=7)  # a chunk that does not divide the 60 rows
    (grad,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_(True)
    ref = _dense_ibot(s64.reshape(-1, 16), u.reshape(-1, 16), c, 0.1, 0.05)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-6)


def test_softmax_center_ema_and_probs():
    center = SoftmaxCenter(3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    center.update(logits)
    assert torch.allclose(center.center, torch.tensor([[0.2, 0.2, 0.2]]))
    center.update(logits)
    assert torch.allclose(center.center, torch.tensor([[0.38, 0.38, 0.38]]))
    p = center.probs(torch.tensor([[0.0, 0.0, math.log(2.0) * 0.04]]), 0.04)
    assert torch.allclose(p, torch.tensor([[0.25, 0.25, 0.5]]))
    restored = SoftmaxCenter(3)
    restored.load_state_dict(center.state_dict())
    assert torch.equal(restored.center, center.center)


def test_sinkhorn_balances_prototypes():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 8, generator=g) + torch.linspace(0, 2, 8)  # softmax favours the last prototypes
    q = sinkhorn_knopp(logits, 0.5, n_iterations=20)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(q.sum(0), torch.full((8,), 64 / 8), rtol=0.02)  # prototypes used equally
    plain = torch.softmax(logits / 0.5, -1).sum(0)
    assert plain.std() > 10 * q.sum(0).std()


def test_projection_head_shapes_and_normalization():
    head = ProjectionHead(32, n_prototypes=50, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, 32)
    code = head.bottleneck(x)
    assert code.shape == (5, 16) and torch.allclose(code.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert head(x).shape == (5, 50)
    g = head.prototypes.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    weight_norms = head.prototypes.weight.norm(dim=1)  # weight-normalised rows, norm fixed at 1
    assert torch.allclose(weight_norms, torch.ones(50), atol=1e-5)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3


def test_feature_loss_is_zero_only_for_matching_tokens():
    t = torch.randn(2, 5, 8)
    assert feature_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(-t, t).item() > 2.0
    assert FeatureAdapter(4, 8)(torch.randn(2, 5, 4)).shape == (2, 5, 8)


def test_schedules_follow_the_recipe():
    lr = cosine_schedule(1.0, 0.1, total_iters=110, warmup_iters=10)
    assert lr[0] == 0 and lr[5] == pytest.approx(0.5) and lr[10] == 1.0
    assert lr[-1] == pytest.approx(0.1, abs=1e-3) and np.all(np.diff(lr[10:]) <= 0)
    temp = warmup_then_constant(0.04, 0.07, 30, 100)
    assert temp[0] == 0.04 and temp[15] == pytest.approx(0.055) and (temp[30:] == 0.07).all()
    s = Schedules.build(
        total_iters=1000,
        iters_per_epoch=10,
        lr=1e-3,
        min_lr=1e-6,
        warmup_epochs=16,
        weight_decay=0.04,
        weight_decay_end=0.4,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=30,
        ema_momentum=0.994,
    )
    assert (
        s.lr.argmax() == 160
        and s.weight_decay[0] == pytest.approx(0.04)
        and s.weight_decay[-1] == pytest.approx(0.4, abs=1e-4)
    )
    assert s.teacher_temp[299] < 0.07 and s.teacher_temp[300] == 0.07
    assert s.ema_momentum[0] == 0.994 and s.ema_momentum[-1] == pytest.approx(1.0, abs=1e-5)


def _reference_sinkhorn(u: torch.Tensor, tau: float, n_iterations: int = 3) -> torch.Tensor:
    """The dense loop of DINOv2's `sinkhorn_knopp_teacher` (one process), in float64."""
    q = torch.exp(u.double() / tau).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_sinkhorn_center_reproduces_the_reference_loop_in_chunks():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(50, 12, generator=g) * 0.5 + torch.linspace(0, 1, 12)  # unbalanced prototypes
    ref = _reference_sinkhorn(u, 0.05)
    assert torch.allclose(sinkhorn_knopp(u, 0.05).double(), ref, atol=1e-5)
    center = sinkhorn_center(u, 0.05, chunk=7)  # chunks that do not divide the 50 rows
    assert torch.allclose(torch.softmax((u.double() - center.double()) / 0.05, -1), ref, atol=1e-5)
    plain = torch.softmax(u / 0.05, -1)  # without the centre the last prototypes dominate
    assert plain.mean(0).std() > 2 * ref.mean(0).std()


def test_dino_pair_weight_paper_and_dinov2():
    assert dino_pair_weight("paper", 2, 0) == 1.0 and dino_pair_weight("paper", 2, 8) == 1.0
    assert dino_pair_weight("dinov2", 2, 0) == pytest.approx(2 / 3)  # 2 pairs / (2 + max(0, 1))
    assert dino_pair_weight("dinov2", 2, 8) == 1.0  # 18 pairs / (2 + 16)
    with pytest.raises(HistodistillError, match="dino_normalization"):
        dino_pair_weight("dino", 2, 0)


def test_collapse_guard_counts_consecutive_iterations_and_names_the_run():
    guard = CollapseGuard("distill run 'demo'", floor=4.0, patience=3)
    guard.update(0, {"dino_eff_prototypes": 2.0, "loss_total": 1.0})
    guard.update(1, {"dino_eff_prototypes": 9.0})  # back above: the count starts again
    guard.update(2, {"dino_eff_prototypes": 2.0})
    resumed = CollapseGuard("distill run 'demo'", 4.0, 3)
    resumed.load_state_dict(guard.state_dict())
    resumed.update(3, {"dino_eff_prototypes": 1.5})
    with pytest.raises(
        CollapseError,
        match=r"distill run 'demo' collapsed: dino_eff_prototypes = 1.20.*floor 4 for 3 iterations \(2–4\)",
    ):
        resumed.update(4, {"dino_eff_prototypes": 1.2})


def test_collapse_guard_stops_flat_targets_above_the_entropy_ceiling():
    """Flat collapse: mean target entropy above ceiling × log K (K = 256: 0.95 × 5.545 = 5.268 nats)."""
    guard = CollapseGuard("teacher heads", floor=4.0, patience=2, n_prototypes=256, ceiling=0.95)
    guard.update(0, {"dino_entropy": 5.30, "dino_eff_prototypes": 250.0, "loss_dino_entropy": 9.0})
    guard.update(1, {"dino_entropy": 5.20, "dino_eff_prototypes": 250.0})  # below the limit: starts again
    guard.update(2, {"dino_entropy": 5.50, "ibot_entropy": 1.0})
    with pytest.raises(
        CollapseError,
        match=r"teacher heads collapsed to flat targets: dino_entropy = 5\.540 nats stayed above "
        r"0\.95 × log K = 5\.268 \(K = 256.*for 2 iterations \(2–3\)",
    ):
        guard.update(3, {"dino_entropy": 5.54, "ibot_entropy": 1.0})
    # without K (an objective with no prototypes) or with a ceiling ≥ 1, entropy never stops a run
    for quiet in (CollapseGuard("r", 4.0, 1), CollapseGuard("r", 4.0, 1, n_prototypes=256, ceiling=1.0)):
        quiet.update(0, {"dino_entropy": math.log(256)})


def test_entropy_and_effective_prototypes_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(entropy(p), torch.tensor([math.log(2), 0.0]))
    # mean target [0.25, 0.25, 0, 0.5]: H = 1.5 log 2 → exp(H) = 2^1.5
    assert effective_prototypes(p.mean(0)).item() == pytest.approx(2**1.5, rel=1e-6)
    stats = TargetStats.of_logits(torch.log(p.clamp_min(1e-12)), torch.zeros(4), 1.0, chunk=1)
    figures = stats.figures("x", torch.tensor(2.0))
    assert figures["x_entropy"].item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert figures["x_kl"].item() == pytest.approx(2.0 - math.log(2) / 2, abs=1e-6)


def test_ema_update_moves_towards_the_model():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, expected)
