"""The DINO + iBOT objective after the step-cost change (iBOT targets made once, in place of the logits,
with the monitors' sums and the centre's column sum in the same pass; the loss's gradient computed in its
forward pass) gives the numbers of the code before it: losses, every gradient, the monitors and the
centres after `update_state`, on small cases with the same seed.

The reference below is the previous code (commit c331370: `losses._ChunkedSoftCE`, `DinoIbot.teacher_targets`
/ `losses` / `monitors` / `update_state`, `TargetStats.of_logits`), copied so that it stays what it was.
Tolerance: float32, rtol 1e-6 and atol 1e-7 (the operations are the same on the same chunks; only the
order of a few float sums may differ).
"""

from dataclasses import replace

import pytest
import torch

from histodistill.distill.centering import sinkhorn_center, sinkhorn_knopp
from histodistill.distill.losses import dino_loss, ibot_loss, ibot_loss_from_probs, softmax_targets_
from histodistill.distill.monitors import TargetStats
from histodistill.distill.objectives import DinoIbot, StepState, StudentTokens, TeacherTokens
from histodistill.distill.trainer import DistillConfig

RTOL, ATOL = 1e-6, 1e-7
B, P, L, D, DT, K = 3, 5, 2, 12, 20, 64


class _OldChunkedSoftCE(torch.autograd.Function):
    """The previous chunked iBOT loss: softmaxes recomputed from the logits in forward and backward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, center, student_temp, teacher_temp, chunk):
        n = student_logits.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for a in range(0, n, chunk):
            s = student_logits[a : a + chunk].float()
            t = torch.softmax((teacher_logits[a : a + chunk].float() - center) / teacher_temp, dim=-1)
            total += -(t * torch.log_softmax(s / student_temp, dim=-1)).sum()
        ctx.save_for_backward(student_logits, teacher_logits, center)
        ctx.temps, ctx.chunk = (student_temp, teacher_temp), chunk
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        student_logits, teacher_logits, center = ctx.saved_tensors
        student_temp, teacher_temp = ctx.temps
        n = student_logits.shape[0]
        grad = torch.empty_like(student_logits)
        for a in range(0, n, ctx.chunk):
            s = student_logits[a : a + ctx.chunk].float()
            t = torch.softmax((teacher_logits[a : a + ctx.chunk].float() - center) / teacher_temp, dim=-1)
            g = (torch.softmax(s / student_temp, dim=-1) - t) / (student_temp * n)
            grad[a : a + ctx.chunk] = (g * grad_out).to(grad.dtype)
        return grad, None, None, None, None, None


def _old_step(obj: DinoIbot, teacher: TeacherTokens, student: StudentTokens, step: StepState):
    """The previous DinoIbot step: targets, losses (backpropagated), monitors, centre update."""
    b, k = teacher.cls.shape[1], obj.n_prototypes
    with torch.no_grad():
        t_dino = obj.teacher_heads["dino"](teacher.cls.flatten(0, 1))
        t_ibot = obj.teacher_heads["ibot"](teacher.patch.flatten(0, 2))
        if obj.centering == "sinkhorn":
            probs = sinkhorn_knopp(t_dino, step.teacher_temp)
            center = sinkhorn_center(t_ibot, step.teacher_temp, chunk=obj.ibot_chunk)
        else:
            probs = obj.centers["dino"].probs(t_dino, step.teacher_temp)
            center = obj.centers["ibot"].center.clone()
    t_probs = probs.reshape(2, b, -1)
    s_dino = obj.student_heads["dino"](student.cls).reshape(2, b, -1)
    students = [s_dino[0], s_dino[1]]
    if student.local_cls is not None:
        students += list(obj.student_heads["dino"](student.local_cls.float()).reshape(-1, b, k))
    losses = {"dino": dino_loss([t_probs[0], t_probs[1]], students, obj.student_temp)}
    s_ibot = obj.student_heads["ibot"](student.patch.reshape(-1, student.patch.shape[-1]))
    losses["ibot"] = _OldChunkedSoftCE.apply(
        s_ibot,
        t_ibot.detach(),
        center.reshape(1, k).float(),
        obj.student_temp,
        step.teacher_temp,
        obj.ibot_chunk,
    )
    losses["total"] = (
        obj.dino_weight * obj.dino_pair_weight * losses["dino"] + obj.ibot_weight * losses["ibot"]
    )
    losses["total"].backward()
    with torch.no_grad():
        mon = TargetStats.of_probs(t_probs).figures("dino", losses["dino"])
        mon |= TargetStats.of_logits(t_ibot, center, step.teacher_temp, obj.ibot_chunk).figures(
            "ibot", losses["ibot"]
        )
        if obj.centering == "softmax":
            obj.centers["dino"].update(t_dino)
            obj.centers["ibot"].update(t_ibot)
    return losses, mon


def _new_step(obj: DinoIbot, teacher: TeacherTokens, student: StudentTokens, step: StepState):
    targets = obj.teacher_targets(teacher, step)
    losses = obj.losses(student, targets, step)
    losses["total"].backward()
    mon = obj.monitors(targets, losses, step)
    obj.update_state(targets)
    return losses, mon


def _inputs(seed: int, student_grad: bool):
    g = torch.Generator().manual_seed(seed)
    teacher = TeacherTokens(torch.randn(2, B, DT, generator=g), torch.randn(2, B, P, DT, generator=g))
    student = StudentTokens(
        torch.randn(2 * B, D, generator=g).requires_grad_(student_grad),
        torch.randn(2 * B, P, D, generator=g).requires_grad_(student_grad),
        torch.randn(L * B, D, generator=g).requires_grad_(student_grad),
    )
    return teacher, student


@pytest.mark.parametrize(
    ("centering", "chunk", "ema_teacher"),
    [("softmax", 7, False), ("sinkhorn", 4096, False), ("softmax", 11, True)],
)
def test_dino_ibot_step_equals_the_previous_computation(centering, chunk, ema_teacher):
    """Two steps in a row (the second with the centres the first updated): losses, the gradients of every
    student head parameter and of the student tokens, the monitors and the centres equal the old code's.
    `ema_teacher`: the teacher-heads stage's objective (teacher heads a copy of the student heads)."""
    cfg = DistillConfig(
        n_prototypes=K,
        head_hidden=32,
        dino_bottleneck=8,
        ibot_bottleneck=6,
        ibot_weight=0.7,
        centering=centering,
        ibot_chunk=chunk,
        n_local=L,
        dino_normalization="dinov2",
    )
    torch.manual_seed(3)
    old = DinoIbot(cfg, D if not ema_teacher else DT, DT, teacher_patches=True, ema_teacher=ema_teacher)
    new = DinoIbot(replace(cfg, seed=9), D if not ema_teacher else DT, DT, True, ema_teacher=ema_teacher)
    new.load_state_dict(old.state_dict())
    # non-zero centres, so that centering matters from the first step
    for obj in (old, new):
        for name in ("dino", "ibot"):
            obj.centers[name].center.copy_(torch.linspace(-0.2, 0.3, K)[None])
    for it, temp in enumerate((0.04, 0.06)):
        step = StepState(iteration=it, teacher_temp=temp)
        teacher, s_old = _inputs(it, student_grad=not ema_teacher)
        if ema_teacher:  # the heads stage: the student heads read the teacher's own tokens
            s_old = StudentTokens(teacher.cls.flatten(0, 1), teacher.patch.flatten(0, 1), None)
        s_new = StudentTokens(
            *(None if x is None else x.detach().clone().requires_grad_(x.requires_grad) for x in s_old)
        )
        for obj in (old, new):
            obj.zero_grad(set_to_none=True)
        l_old, m_old = _old_step(old, teacher, s_old, step)
        l_new, m_new = _new_step(new, teacher, s_new, step)
        assert list(l_new) == list(l_old) == ["dino", "ibot", "total"]
        for key in l_old:
            assert torch.allclose(l_new[key], l_old[key], rtol=RTOL, atol=ATOL), key
        for key in m_old:
            assert torch.allclose(m_new[key], m_old[key], rtol=RTOL, atol=ATOL), key
        grads = 0
        for (name, p_old), p_new in zip(
            old.student_heads.named_parameters(), new.student_heads.parameters(), strict=True
        ):
            if p_old.grad is None:
                assert p_new.grad is None, name
                continue
            assert torch.allclose(p_new.grad, p_old.grad, rtol=RTOL, atol=ATOL), name
            grads += 1
        assert grads >= 8  # both heads' MLPs and prototypes received gradients
        for x_old, x_new in zip(s_old, s_new, strict=True):
            if x_old is not None and x_old.requires_grad:
                assert torch.allclose(x_new.grad, x_old.grad, rtol=RTOL, atol=ATOL)
        for name in ("dino", "ibot"):
            assert torch.allclose(new.centers[name].center, old.centers[name].center, rtol=RTOL, atol=ATOL)
        if centering == "softmax":
            assert not torch.equal(new.centers["ibot"].center, torch.linspace(-0.2, 0.3, K)[None])


def test_softmax_targets_are_the_softmax_in_place_with_their_sums():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(23, K, generator=g), torch.randn(1, K, generator=g) * 0.1
    expected = torch.softmax((u - c) / 0.05, -1)
    buffer = u.clone()
    probs, ent, probs_sum = softmax_targets_(buffer, c, 0.05, chunk=5)
    assert probs.data_ptr() == buffer.data_ptr()  # in place: no second [N, K] tensor
    assert torch.allclose(probs, expected, rtol=1e-6, atol=1e-8)
    assert torch.allclose(ent, -torch.special.xlogy(expected, expected).sum(), rtol=1e-5)
    assert torch.allclose(probs_sum, expected.sum(0), rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="float32"):
        softmax_targets_(u.double(), c, 0.05)


def test_chunked_loss_without_gradient_and_single_backward():
    g = torch.Generator().manual_seed(1)
    s, u = torch.randn(17, K, generator=g, requires_grad=True), torch.randn(17, K, generator=g)
    t = torch.softmax(u / 0.05, -1)
    expected = -(t * torch.log_softmax(s.detach() / 0.1, -1)).sum(-1).mean()
    with torch.no_grad():
        assert torch.allclose(ibot_loss_from_probs(s, t, 0.1, chunk=4), expected, rtol=1e-6)
    loss = ibot_loss_from_probs(s, t, 0.1, chunk=4)
    (3 * loss).backward(retain_graph=True)
    assert torch.allclose(s.grad, 3 * (torch.softmax(s.detach() / 0.1, -1) - t) / (0.1 * 17), atol=1e-7)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    # the logits version leaves the teacher logits unchanged
    before = u.clone()
    ibot_loss(s, u, torch.zeros(K), 0.1, 0.05, chunk=4)
    assert torch.equal(u, before)
