import math

import numpy as np
import pytest
import torch

from histodistill.distill.centering import SoftmaxCenter, sinkhorn_knopp
from histodistill.distill.heads import ProjectionHead
from histodistill.distill.losses import FeatureAdapter, dino_loss, feature_loss, ibot_loss, soft_cross_entropy
from histodistill.distill.schedules import Schedules, cosine_schedule, warmup_then_constant


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
