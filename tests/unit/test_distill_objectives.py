"""The objectives of distill/objectives.py against by-hand formulas, their state, and the registry."""

import math
from dataclasses import dataclass, replace

import pytest
import torch

from histodistill.config import load_schema
from histodistill.distill.centering import sinkhorn_center, sinkhorn_knopp
from histodistill.distill.losses import feature_loss, koleo_loss
from histodistill.distill.objectives import (
    OBJECTIVES,
    DinoIbot,
    Feature,
    StepState,
    StudentTokens,
    TeacherTokens,
    build_objective,
)
from histodistill.distill.trainer import DistillConfig
from histodistill.errors import HistodistillError

CFG = DistillConfig(n_prototypes=16, head_hidden=32, dino_bottleneck=8, ibot_bottleneck=6, ibot_weight=0.5)
B, P, L, D, DT, K = 3, 4, 2, 12, 20, 16


def _tokens(seed: int = 0, patches: bool = True, local: bool = True):
    g = torch.Generator().manual_seed(seed)
    teacher = TeacherTokens(
        torch.randn(2, B, DT, generator=g), torch.randn(2, B, P, DT, generator=g) if patches else None
    )
    student = StudentTokens(
        torch.randn(2 * B, D, generator=g),
        torch.randn(2 * B, P, D, generator=g),
        torch.randn(L * B, D, generator=g) if local else None,
    )
    return teacher, student


def _h(t: torch.Tensor, s: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over rows of −Σ_k t_k log softmax(s/τ)_k, in float64."""
    return -(t.double() * torch.log_softmax(s.double() / tau, -1)).sum(-1).mean()


def test_dino_ibot_losses_are_the_formulas_by_hand():
    torch.manual_seed(0)
    obj = DinoIbot(CFG, D, DT, teacher_patches=True)
    c_dino, c_ibot = torch.randn(1, K) * 0.1, torch.randn(1, K) * 0.1
    obj.centers["dino"].center.copy_(c_dino)
    obj.centers["ibot"].center.copy_(c_ibot)
    teacher, student = _tokens()
    step = StepState(iteration=3, teacher_temp=0.05)
    targets = obj.teacher_targets(teacher, step)
    losses = obj.losses(student, targets, step)
    assert list(losses) == ["dino", "ibot", "total"]
    assert not targets.dino_probs.requires_grad and not targets.ibot_probs.requires_grad  # frozen heads

    with torch.no_grad():
        t_dino = obj.teacher_heads["dino"](teacher.cls.reshape(2 * B, DT))
        t_probs = torch.softmax((t_dino - c_dino) / 0.05, -1).reshape(2, B, K)
        s_views = list(obj.student_heads["dino"](student.cls).reshape(2, B, K))
        s_views += list(obj.student_heads["dino"](student.local_cls).reshape(L, B, K))
        # each teacher global view against every other student view: 2 × 3 pairs
        pairs = [_h(t_probs[i], s, 0.1) for i in range(2) for j, s in enumerate(s_views) if j != i]
        dino = torch.stack(pairs).mean()
        t_ibot = obj.teacher_heads["ibot"](teacher.patch.reshape(-1, DT))
        s_ibot = obj.student_heads["ibot"](student.patch.reshape(-1, D))
        ibot = _h(torch.softmax((t_ibot.double() - c_ibot.double()) / 0.05, -1), s_ibot, 0.1)
    assert losses["dino"].item() == pytest.approx(dino.item(), rel=1e-5)
    assert losses["ibot"].item() == pytest.approx(ibot.item(), rel=1e-5)
    assert losses["total"].item() == pytest.approx((dino + 0.5 * ibot).item(), rel=1e-5)

    losses["total"].backward()  # the student heads get gradients, the frozen teacher heads none
    assert all(p.grad is not None for p in obj.student_heads.parameters() if p.requires_grad)
    assert all(p.grad is None for p in obj.teacher_heads.parameters())

    obj.update_state(targets)  # the centres' EMA (momentum 0.9) of the batch's mean teacher logits
    assert torch.allclose(obj.centers["dino"].center, 0.9 * c_dino + 0.1 * t_dino.mean(0, keepdim=True))
    assert torch.allclose(obj.centers["ibot"].center, 0.9 * c_ibot + 0.1 * t_ibot.mean(0, keepdim=True))


def test_dino_ibot_variants_sinkhorn_and_no_patches():
    teacher, student = _tokens(1)
    step = StepState(0, 0.04)
    sinkhorn = DinoIbot(replace(CFG, centering="sinkhorn"), D, DT, teacher_patches=True)
    targets = sinkhorn.teacher_targets(teacher, step)
    assert torch.allclose(targets.dino_probs.sum(-1), torch.ones(2, B), atol=1e-5)
    # iBOT targets are Sinkhorn-Knopp too (not a zero-centre softmax): the centre balances the prototypes
    with torch.no_grad():
        t_ibot = sinkhorn.teacher_heads["ibot"](teacher.patch.reshape(-1, DT))
    assert torch.allclose(targets.ibot_center, sinkhorn_center(t_ibot, 0.04, chunk=sinkhorn.ibot_chunk))
    assert targets.ibot_center.abs().sum() > 0
    losses = sinkhorn.losses(student, targets, step)
    with torch.no_grad():
        s_ibot = sinkhorn.student_heads["ibot"](student.patch.reshape(-1, D))
    assert losses["ibot"].item() == pytest.approx(
        _h(sinkhorn_knopp(t_ibot, 0.04), s_ibot, 0.1).item(), rel=1e-5
    )
    sinkhorn.update_state(targets)  # no centre under Sinkhorn-Knopp
    assert not sinkhorn.centers["dino"].center.any() and not sinkhorn.centers["ibot"].center.any()

    no_patches = DinoIbot(replace(CFG, ibot_weight=0.0), D, DT, teacher_patches=False)
    out = no_patches.losses(student, no_patches.teacher_targets(_tokens(patches=False)[0], step), step)
    assert list(out) == ["dino", "total"] and torch.equal(out["total"], out["dino"])
    with pytest.raises(HistodistillError, match="iBOT loss needs patch tokens"):
        DinoIbot(CFG, D, DT, teacher_patches=False)


@pytest.mark.parametrize("mode", ["learned", "trained"])
def test_joint_learned_heads_are_gone_and_trained_needs_the_workflow(mode):
    with pytest.raises(HistodistillError, match="train-heads"):
        DinoIbot(replace(CFG, teacher_heads=mode), D, DT, teacher_patches=True)


@pytest.mark.parametrize("n_local", [0, 2])
@pytest.mark.parametrize("normalization", ["paper", "dinov2"])
def test_dino_normalization_paper_and_dinov2_by_hand(normalization, n_local):
    """paper: the mean over (teacher global i, student crop j ≠ i) pairs; dinov2: DINOv2's code, Σ H_ij over
    the pairs divided by 2·1 + max(2·L, 1), i.e. (H12 + H21) / 3 without local crops (1.5× less)."""
    cfg = replace(CFG, dino_normalization=normalization, n_local=n_local, ibot_weight=0.0)
    obj = DinoIbot(cfg, D, DT, teacher_patches=False)
    teacher, student = _tokens(3, patches=False, local=n_local > 0)
    step = StepState(0, 0.05)
    targets = obj.teacher_targets(teacher, step)
    losses = obj.losses(student, targets, step)
    with torch.no_grad():
        t = torch.softmax(obj.teacher_heads["dino"](teacher.cls.reshape(2 * B, DT)) / 0.05, -1).reshape(
            2, B, K
        )
        s = list(obj.student_heads["dino"](student.cls).reshape(2, B, K))
        if n_local:
            s += list(obj.student_heads["dino"](student.local_cls).reshape(n_local, B, K))
        pairs = [_h(t[i], sj, 0.1) for i in range(2) for j, sj in enumerate(s) if j != i]
    expected = {
        ("paper", 0): (pairs[0] + pairs[1]) / 2,
        ("dinov2", 0): (pairs[0] + pairs[1]) / 3,
        ("paper", 2): sum(pairs) / 6,
        ("dinov2", 2): sum(pairs) / (2 + 4),
    }[normalization, n_local]
    assert losses["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["dino"].item() == pytest.approx((sum(pairs) / len(pairs)).item(), rel=1e-5)  # logged mean
    weight = obj.monitors(targets, losses, step)["weight_dino_eff"].item()
    assert weight == pytest.approx({("dinov2", 0): 2 / 3}.get((normalization, n_local), 1.0))


def test_monitors_are_entropy_effective_prototypes_and_kl_by_hand():
    obj = DinoIbot(CFG, D, DT, teacher_patches=True)
    teacher, student = _tokens(4)
    step = StepState(0, 0.05)
    targets = obj.teacher_targets(teacher, step)
    losses = obj.losses(student, targets, step)
    mon = {k: v.item() for k, v in obj.monitors(targets, losses, step).items()}
    t = targets.dino_probs.double().reshape(2 * B, K)
    h = -(t * t.log()).sum(-1)
    mean = t.mean(0)
    with torch.no_grad():
        s = obj.student_heads["dino"](student.cls).double().reshape(2, B, K)
        s = torch.cat([s, obj.student_heads["dino"](student.local_cls).double().reshape(L, B, K)])
        tt = targets.dino_probs.double()
        kls = [
            (tt[i] * (tt[i].log() - torch.log_softmax(s[j] / 0.1, -1))).sum(-1).mean()
            for i in range(2)
            for j in range(2 + L)
            if j != i
        ]
    assert mon["dino_entropy"] == pytest.approx(h.mean().item(), rel=1e-5)
    assert mon["dino_eff_prototypes"] == pytest.approx(torch.exp(-(mean * mean.log()).sum()).item(), rel=1e-5)
    assert mon["dino_kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4, abs=1e-6)
    with torch.no_grad():
        u = obj.teacher_heads["ibot"](teacher.patch.reshape(-1, DT)).double()
        ti = torch.softmax((u - targets.ibot_center.double()) / 0.05, -1)
        si = obj.student_heads["ibot"](student.patch.reshape(-1, D)).double()
        kl_i = (ti * (ti.log() - torch.log_softmax(si / 0.1, -1))).sum(-1).mean()
    assert mon["ibot_kl"] == pytest.approx(kl_i.item(), rel=1e-4, abs=1e-6)
    assert mon["ibot_entropy"] == pytest.approx((-(ti * ti.log()).sum(-1)).mean().item(), rel=1e-5)
    assert 1 <= mon["ibot_eff_prototypes"] <= K and mon["weight_ibot_eff"] == 0.5


def test_dino_ibot_state_dict_holds_heads_and_centres():
    obj = DinoIbot(CFG, D, DT, teacher_patches=True)
    obj.update_state(obj.teacher_targets(_tokens()[0], StepState(0, 0.04)))
    state = obj.state_dict()
    assert {"centers.dino.center", "centers.ibot.center"} <= set(state)
    assert any(k.startswith("student_heads.dino.") for k in state)
    assert any(k.startswith("teacher_heads.ibot.") for k in state)
    restored = DinoIbot(replace(CFG, seed=5), D, DT, teacher_patches=True)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in state.items())


def test_feature_objective_is_cosine_plus_smooth_l1_through_the_adapter():
    obj = Feature(CFG, D, DT, teacher_patches=True)
    teacher, student = _tokens(2)
    step = StepState(0, 0.04)
    targets = obj.teacher_targets(teacher, step)
    assert targets.shape == (2 * B, 1 + P, DT)
    assert torch.equal(targets[B + 1, 0], teacher.cls[1, 1]) and torch.equal(
        targets[B + 1, 1:], teacher.patch[1, 1]
    )
    losses = obj.losses(student, targets, step)
    s_all = torch.cat([student.cls[:, None], student.patch], 1)
    assert torch.equal(losses["feature"], feature_loss(obj.student_heads["adapter"](s_all), targets))
    assert list(losses) == ["total", "feature"]
    cls_only = obj.teacher_targets(_tokens(2, patches=False)[0], step)
    assert cls_only.shape == (2 * B, 1, DT) and obj.losses(student, cls_only, step)["total"].ndim == 0
    x = torch.randn(7, D)
    assert obj.holdout_metrics(x, obj.student_heads["adapter"](x)) == {"feature_cos": pytest.approx(1.0)}
    assert set(obj.state_dict()) == {"student_heads.adapter.proj.weight", "student_heads.adapter.proj.bias"}


def test_registry_matches_the_schema_and_rejects_unknown_names_and_options():
    run = load_schema()["properties"]["distill"]["properties"]["runs"]["additionalProperties"]["properties"]
    assert set(run["objective"]["enum"]) == set(OBJECTIVES) == {"dino_ibot", "feature", "vicreg", "simclr"}
    assert isinstance(build_objective(replace(CFG, objective="feature"), D, DT, True), Feature)
    with pytest.raises(HistodistillError, match="unknown objective 'barlow'"):
        build_objective(replace(CFG, objective="barlow"), D, DT, True)
    with pytest.raises(HistodistillError, match=r"no option\(s\) \['temperature'\]"):
        build_objective(replace(CFG, objective_params={"temperature": 0.5}), D, DT, True)


def test_options_parse_objective_params_into_the_class_dataclass():
    @dataclass(frozen=True)
    class Options:
        temperature: float = 0.5

    class Paired(Feature):
        name = "paired"

    Paired.Options = Options
    assert Paired.options({"temperature": 0.2}) == Options(0.2) and Paired.options(None) == Options(0.5)
    with pytest.raises(HistodistillError, match=r"no option\(s\) \['lambda'\].*takes: \['temperature'\]"):
        Paired.options({"lambda": 25})


def test_koleo_is_dinov2s_formula_by_hand_and_adds_to_the_dino_ibot_total():
    """KoLeo (DINOv2's dinov2/loss/koleo_loss.py): for (1, 0), (0, 1), (1, 1) every row's nearest other row
    is at chord distance √(2 − √2) once normalised, so the loss is −log √(2 − √2); dino_ibot's
    `objective_params.koleo_weight` w adds w · Σ over the 2 global crops to the total, and 0 adds nothing."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2 - math.sqrt(2))), rel=1e-6)
    assert koleo_loss(x * 7.0).item() == pytest.approx(koleo_loss(x).item(), rel=1e-6)  # scale-free
    with pytest.raises(HistodistillError, match="at least 2 rows"):
        koleo_loss(x[:1])

    teacher, student = _tokens(patches=False, local=False)
    step = StepState(iteration=0, teacher_temp=0.05)
    cfg = replace(CFG, ibot_weight=0.0)
    torch.manual_seed(0)
    plain = DinoIbot(cfg, D, DT, teacher_patches=False)
    torch.manual_seed(0)
    koleo = DinoIbot(replace(cfg, objective_params={"koleo_weight": 0.1}), D, DT, teacher_patches=False)
    base = plain.losses(student, plain.teacher_targets(teacher, step), step)
    losses = koleo.losses(student, koleo.teacher_targets(teacher, step), step)
    expected = sum(koleo_loss(c) for c in student.cls.reshape(2, B, D))
    assert "koleo" not in base and losses["koleo"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["total"].item() == pytest.approx(base["total"].item() + 0.1 * expected.item(), rel=1e-6)


def test_feature_weight_adds_the_head_free_cls_term_to_the_dino_ibot_total():
    """`objective_params.feature_weight` w adds w · feature_loss(adapter(student CLS), teacher CLS) over both
    global views (view-major rows, as the DINO term pairs them); the adapter is a student head (it trains,
    and exists only with w > 0, after the DINO/iBOT heads, whose init is unchanged); no teacher head and no
    target carries a gradient."""
    teacher, student = _tokens()
    student = StudentTokens(student.cls.requires_grad_(True), student.patch, student.local_cls)
    step = StepState(iteration=0, teacher_temp=0.05)
    torch.manual_seed(0)
    plain = DinoIbot(CFG, D, DT, teacher_patches=True)
    torch.manual_seed(0)
    obj = DinoIbot(replace(CFG, objective_params={"feature_weight": 0.5}), D, DT, teacher_patches=True)
    assert "adapter" not in plain.student_heads and "adapter" in obj.student_heads
    for name in ("dino", "ibot"):  # the same init as without the term
        for a, b in zip(
            plain.student_heads[name].parameters(), obj.student_heads[name].parameters(), strict=True
        ):
            assert torch.equal(a, b)
    targets = obj.teacher_targets(teacher, step)
    base = plain.losses(student, plain.teacher_targets(teacher, step), step)
    losses = obj.losses(student, targets, step)
    adapter = obj.student_heads["adapter"]
    expected = feature_loss(adapter(student.cls), teacher.cls.reshape(2 * B, DT))
    cos = torch.nn.functional.cosine_similarity(adapter(student.cls), teacher.cls.reshape(2 * B, DT), dim=-1)
    by_hand = (1 - cos.mean()) + torch.nn.functional.smooth_l1_loss(
        adapter(student.cls), teacher.cls.reshape(2 * B, DT)
    )
    assert expected.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert losses["feature"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["total"].item() == pytest.approx(base["total"].item() + 0.5 * expected.item(), rel=1e-6)
    assert not targets.teacher_cls.requires_grad
    losses["total"].backward()
    assert adapter.proj.weight.grad is not None and adapter.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.teacher_heads.parameters())
    weights = {k: v.item() for k, v in obj.monitors(targets, losses, step).items() if k.startswith("weight_")}
    assert weights == {"weight_dino_eff": 1.0, "weight_ibot_eff": 0.5, "weight_feature_eff": 0.5}
