"""`head_precision: bf16` (the DINO/iBOT heads' matmuls under bf16 autocast, softmax, centering and losses in
float32) against `fp32` on a small case: same weights, same tokens, two steps (the second with the centres
the first updated).

Tolerances, from bf16's 8-bit significand (relative rounding ≤ 2⁻⁹ ≈ 0.2 % per value): the logits are
cosines (|u| ≤ 1 before the temperature), so each can be off by ~0.002, i.e. ~0.05 in the exponent at the
teacher's 0.04. Stated bounds, with what 3 seeds × 2 steps gave here (max): losses within 0.5 % relative
(0.16 %); the targets within 0.06 in total variation per row (0.035 iBOT, 0.021 DINO, at 0.04; about half
at 0.07); every student-head parameter's gradient and the student tokens' gradients within 5 % in relative
L2 norm (2.9 %) and at cosine ≥ 0.999 to the fp32 gradient (0.9996); the centres within 1e-3 (2e-4).
"""

from dataclasses import replace

import pytest
import torch

from histodistill.distill.objectives import (
    DinoIbot,
    StepState,
    StudentTokens,
    TeacherTokens,
    head_autocast_dtype,
)
from histodistill.distill.trainer import DistillConfig
from histodistill.errors import HistodistillError

B, P, D, DT, K = 4, 16, 24, 32, 512
CFG = DistillConfig(n_prototypes=K, head_hidden=64, dino_bottleneck=16, ibot_bottleneck=16, ibot_chunk=37)


def _step(obj: DinoIbot, teacher: TeacherTokens, student: StudentTokens, temp: float):
    obj.zero_grad(set_to_none=True)
    state = StepState(iteration=0, teacher_temp=temp)
    targets = obj.teacher_targets(teacher, state)
    losses = obj.losses(student, targets, state)
    losses["total"].backward()
    obj.update_state(targets)
    return losses, targets


def _tokens(seed: int):
    g = torch.Generator().manual_seed(seed)
    teacher = TeacherTokens(torch.randn(2, B, DT, generator=g), torch.randn(2, B, P, DT, generator=g))
    student = [torch.randn(2 * B, D, generator=g), torch.randn(2 * B, P, D, generator=g)]
    return teacher, student


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_heads_match_fp32_within_the_stated_tolerance():
    torch.manual_seed(5)
    fp32 = DinoIbot(CFG, D, DT, teacher_patches=True)
    bf16 = DinoIbot(replace(CFG, head_precision="bf16"), D, DT, teacher_patches=True)
    bf16.load_state_dict(fp32.state_dict())
    for it, temp in enumerate((0.04, 0.07)):
        teacher, student = _tokens(it)
        runs = {}
        for name, obj in (("fp32", fp32), ("bf16", bf16)):
            tokens = [x.clone().requires_grad_(True) for x in student]
            losses, targets = _step(obj, teacher, StudentTokens(*tokens, None), temp)
            runs[name] = (losses, targets, tokens, obj)
        (l32, t32, x32, o32), (l16, t16, x16, o16) = runs["fp32"], runs["bf16"]
        assert t16.ibot_probs.dtype == torch.float32 and t16.dino_probs.dtype == torch.float32
        for key in ("dino", "ibot", "total"):
            assert l16[key].dtype == torch.float32
            assert not torch.equal(l16[key], l32[key]), key  # bf16 did run
            assert float(l16[key].detach()) == pytest.approx(float(l32[key].detach()), rel=5e-3), key
        for probs16, probs32 in ((t16.ibot_probs, t32.ibot_probs), (t16.dino_probs, t32.dino_probs)):
            assert float((probs16 - probs32).abs().sum(-1).max()) / 2 < 0.06  # total variation per row
        n_grads = 0
        for (name, p32), p16 in zip(
            o32.student_heads.named_parameters(), o16.student_heads.parameters(), strict=True
        ):
            if p32.grad is None:
                assert p16.grad is None, name
                continue
            assert p16.dtype == p16.grad.dtype == torch.float32, name  # float32 master weights
            assert _rel(p16.grad, p32.grad) < 0.05, (name, _rel(p16.grad, p32.grad))
            cos = torch.nn.functional.cosine_similarity(p16.grad.flatten(), p32.grad.flatten(), dim=0)
            assert float(cos) > 0.999, (name, float(cos))
            n_grads += 1
        assert n_grads >= 8
        for a, b in zip(x16, x32, strict=True):
            assert _rel(a.grad, b.grad) < 0.05
        for name in ("dino", "ibot"):  # the centres the first step updated feed the second step
            assert torch.allclose(o16.centers[name].center, o32.centers[name].center, atol=1e-3)


def test_fp32_heads_stay_float32_inside_an_autocast_region():
    """`fp32` switches autocast off around the heads: the same numbers inside a bf16 autocast region as
    outside it (the trainer runs the student backbone under autocast)."""
    torch.manual_seed(5)
    obj = DinoIbot(CFG, D, DT, teacher_patches=True)
    teacher, student = _tokens(0)
    state = StepState(iteration=0, teacher_temp=0.04)
    with torch.no_grad():
        plain = obj.losses(StudentTokens(*student, None), obj.teacher_targets(teacher, state), state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = obj.losses(StudentTokens(*student, None), obj.teacher_targets(teacher, state), state)
    for key in plain:
        assert torch.equal(inside[key], plain[key]), key


def test_unknown_head_precision_is_refused_by_name():
    assert head_autocast_dtype("bf16") == torch.bfloat16 and head_autocast_dtype("fp32") is None
    with pytest.raises(HistodistillError, match="head_precision must be one of .*'fp16'"):
        DinoIbot(replace(CFG, head_precision="fp16"), D, DT, teacher_patches=True)
