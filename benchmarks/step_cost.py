"""Where a distillation step's time goes: an analytic FLOP and memory-traffic account per component of the
student-only / cached step (a)/(b) and of the teacher-heads step (d), at the paper's shapes, cross-checked
with `torch.utils.flop_counter.FlopCounterMode` on the real code at a reduced batch, then that reduced step
timed (warm-up, min and median) and, with `--profile`, its top ops (torch.profiler).

Shapes (configs/h0mini.yaml): ViT-B/14 student (h0_mini: 4 registers, SwiGLU) on 2 global 224 px views per tile,
teacher width 1536 (ViT-g/14, H-Optimus-0) cached at `pool2` (8 × 8 = 64 patch tokens per view), DINO
(bottleneck 384) and iBOT (bottleneck 256) heads of hidden width 2,048 and 131,072 prototypes, iBOT on every
pooled patch token of both views (64: `ibot_patches` unset; this pipeline does not mask) or, with
`--distill-ibot-patches N` (configs/h0mini.yaml: 8), on N random ones per view (`ibot_patches`: the positions
taken before the heads run, distill.objectives.DinoIbot), 64 tiles per GPU; the heads stage: 1,024 tiles,
8 patch tokens per view (`distill.teacher_heads.ibot_patches`), heads on the teacher's width on both sides.

Head precision (`head_precision`, configs/h0mini.yaml: bf16): the heads' matmul FLOPs are the same in fp32
and bf16; what changes is their rate on a GPU. The [N, K] memory traffic is also counted on the real
objective by `TrafficMode` (a TorchDispatchMode: the bytes of every op's large tensor arguments and outputs)
for both precisions: bf16 halves the logits' and their gradient's bytes but adds their conversion to
float32, so the float32 softmax passes keep it about where it was. From both, and from the run measured on
an H200 (`H200_MEASURED`: fp32 heads, the `before` passes, 16 tokens), `predict_h200` predicts (b), (c)/(b)
and the heads step per tile against (b) for fp32 and bf16 heads and 16 / 10 / 8 / 4 iBOT tokens per view, at
70 %, 85 % and 100 % of the HBM's peak bandwidth (each calibrated on that run; see its docstring), with the
distillation step's iBOT on all 64 pooled tokens per view and on `--distill-ibot-patches` of them, side by
side (the same run, the same calibration).

The step run here is the trainer's own `Trainer.step` (and `HeadsTrainer.step`) on an object built without a
tile store or cache: mode (a), the teacher tokens made once in memory (fp16 precision, as the cache). (b) adds
only the cache read to it (measured on an H200: (b)/(a) = 1.02).

Memory traffic is counted as the reads and writes of [N, K]-sized fp32 tensors (N iBOT rows, K prototypes),
which dominate it at K = 131,072: each elementwise op reads its inputs and writes its output once (a lower
bound: softmax reads its input twice or three times on a GPU); `N_K_PASSES` lists them per version of the
code, from reading it. Parameter traffic (AdamW, clipping, EMA) is counted as 4 bytes per read or write.

Memory: the real widths at K = 131,072 hold ~200 M head parameters with their optimiser state, so the reduced
distillation step needs about 9 GB (4 tiles), the heads step alone (`--skip-distill`, 16 tiles) 4.6 GB
(peak resident memory, measured).

    python benchmarks/step_cost.py --account-only       # the analytic account only (seconds)
    python benchmarks/step_cost.py --batch-size 4 --heads-batch-size 16   # + the reduced CPU steps
    python benchmarks/step_cost.py --profile --steps 3  # + the top ops of one step of each kind
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from histodistill.devices import autocast_dtype
from histodistill.distill.engine import param_groups
from histodistill.distill.objectives import TeacherTokens, build_objective
from histodistill.distill.schedules import Schedules
from histodistill.distill.teacher_heads import HeadsConfig, HeadsTrainer
from histodistill.distill.trainer import DistillConfig, StudentWithHeads, Trainer
from histodistill.models import get_spec
from histodistill.models.registry import build_model

# Passes over an [N, K] fp32 tensor per step (reads + writes), from the code. `before`: the iBOT chunked loss
# recomputing both softmaxes in its backward, the monitors a third teacher softmax and the entropy, the centre
# a column sum of the logits; `after` (this branch): the teacher softmax once, in `teacher_targets`, with the
# monitors' sums and the centre's column sum in the same pass, and the loss's gradient in its forward pass.
N_K_PASSES = {
    "before": {
        "teacher iBOT logits (write)": 1,
        "student iBOT logits (write)": 1,
        "loss fwd: u-c, /τt, softmax, s/τs, log_softmax, t·logp, sum": 14,
        "loss bwd: u-c, /τt, softmax, s/τs, softmax, p-t, /(τn), ·g, copy": 19,
        "monitors: u-c, /τt, softmax, clamp, log, t·log t, sums": 16,
        "centre update: column sum": 1,
        "prototype GEMM backward: read dL/dlogits twice": 2,
    },
    "after": {
        "teacher iBOT logits (write)": 1,
        "student iBOT logits (write)": 1,
        "targets: column sum, u-c, /τt (in place), softmax, entropy, sums, copy back": 18,
        "loss fwd+grad: s/τs, log_softmax, t·logp, sum, softmax, p-t, /(τn) in place": 15,
        "loss bwd: scale the stored gradient in place": 2,
        "prototype GEMM backward: read dL/dlogits twice": 2,
    },
}


@dataclass(frozen=True)
class Shapes:
    tiles: int = 64  # per GPU
    views: int = 2
    patches: int = 64  # pool2 tokens per view
    student_dim: int = 768
    teacher_dim: int = 1536
    hidden: int = 2048
    dino_bottleneck: int = 384
    ibot_bottleneck: int = 256
    prototypes: int = 131072
    heads_tiles: int = 1024
    heads_patches: int = 4  # configs/h0mini.yaml's distill.teacher_heads.ibot_patches
    ibot_tokens: int = 64  # iBOT tokens per view in distillation (`ibot_patches`; all 64 when unset)


# Measured on one NVIDIA H200 (benchmarks/gpu.sh, 2026-11-30; fp32 heads, the `before` [N,K] passes,
# 16 iBOT tokens per view in the heads stage): s/step of (a), (b), (c) at 64 tiles and (d) at 1,024 tiles.
H200_MEASURED = {"a": 0.230, "b": 0.234, "c": 0.442, "d": 0.564}
H200_PEAK_BW = 4.8e12  # B/s, HBM3e


NOT_TRAFFIC = {  # allocations and aliases: no bytes moved
    torch.ops.aten.detach.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
}


class TrafficMode(TorchDispatchMode):
    """Counts the bytes that every op reads and writes in tensors of at least `min_numel` elements (the
    [N, K] logits, targets and gradients and their chunks; not the heads' parameters): each tensor argument
    read once, each output written once (in place: read and written), views free. A lower bound on a
    GPU's memory traffic (a softmax reads its input twice there), measured on the real code."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.bytes = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func not in NOT_TRAFFIC:
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
            self.bytes += sum(
                t.numel() * t.element_size()
                for t in flat
                if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel
            )
        return out


def measured_nk_bytes(head_precision: str, heads_stage: bool, s: Shapes, k: int = 16384) -> float:
    """Bytes of [N, K] traffic per iBOT logit (per row and prototype) of one step of the real DINO+iBOT
    objective (targets, losses, backward, monitors, centre update) in `head_precision`, at the paper's
    widths with K = `k` (the count per logit does not depend on K) and 2,048 iBOT rows: the distillation
    step's objective (student width, frozen teacher heads, `s.ibot_tokens` of the 64 pooled tokens per view:
    all, or a drawn subset through `ibot_patches`) or, with `heads_stage`, the heads stage's (teacher width
    on both sides, EMA teacher heads, `s.heads_patches` tokens per view). The backbones' token tensors
    (the subset is gathered from them) are not counted: only tensors larger than every one of them."""
    from histodistill.distill.objectives import DinoIbot, StepState, StudentTokens

    subset = not heads_stage and s.ibot_tokens < s.patches
    patches = s.heads_patches if heads_stage else s.patches
    used = s.heads_patches if heads_stage else min(s.ibot_tokens, s.patches)
    tiles = -(-1024 // used)  # ≥ 2,048 rows: [N, K] tensors larger than the prototypes' weights
    cfg = replace(
        DistillConfig(),
        n_prototypes=k,
        head_hidden=s.hidden,
        dino_bottleneck=s.dino_bottleneck,
        ibot_bottleneck=s.ibot_bottleneck,
        ibot_chunk=4096,
        head_precision=head_precision,
        ibot_patches=s.ibot_tokens if subset else None,
    )
    sdim = TEACHER_DIM if heads_stage else s.student_dim
    torch.manual_seed(0)
    obj = DinoIbot(cfg, sdim, TEACHER_DIM, teacher_patches=True, ema_teacher=heads_stage)
    g = torch.Generator().manual_seed(0)
    teacher = TeacherTokens(
        torch.randn(2, tiles, TEACHER_DIM, generator=g),
        torch.randn(2, tiles, patches, TEACHER_DIM, generator=g),
    )
    if heads_stage:  # the student heads read the teacher's own tokens (no input gradient)
        student = StudentTokens(teacher.cls.flatten(0, 1), teacher.patch.flatten(0, 1), None)
    else:
        student = StudentTokens(
            torch.randn(2 * tiles, sdim, generator=g).requires_grad_(),
            torch.randn(2 * tiles, patches, sdim, generator=g).requires_grad_(),
            None,
        )
    rows = 2 * tiles * used
    state = StepState(0, 0.04)
    # [N, K] tensors and their chunks; not the prototypes' [K, bottleneck] weights, the DINO logits, nor the
    # token tensors the subset is gathered from
    tokens = max(teacher.patch.numel(), student.patch.numel())
    assert rows * k > tokens, "too few prototypes to tell the [N, K] tensors from the token tensors"
    with TrafficMode(min_numel=max(k * max(s.dino_bottleneck, s.ibot_bottleneck), tokens) + 1) as mode:
        targets = obj.teacher_targets(teacher, state)
        losses = obj.losses(student, targets, state)
        losses["total"].backward()
        obj.monitors(targets, losses, state)
        obj.update_state(targets)
    return mode.bytes / (rows * k)


def head_matmuls(din: int, s: Shapes, bottleneck: int) -> list[tuple[int, int]]:
    """(in, out) of the ProjectionHead's matmuls: 3-layer MLP then the prototypes (heads.ProjectionHead)."""
    return [(din, s.hidden), (s.hidden, s.hidden), (s.hidden, bottleneck), (bottleneck, s.prototypes)]


def head_flops(rows: int, din: int, s: Shapes, bottleneck: int, backward: str) -> float:
    """Matmul FLOPs of one head on `rows` rows. backward: "none" (forward only), "input" (fwd + grad of the
    weights and of the input: 3× fwd), "no_input" (the first layer's input needs no gradient)."""
    mm = head_matmuls(din, s, bottleneck)
    fwd = sum(2 * rows * a * b for a, b in mm)
    if backward == "none":
        return fwd
    bwd = 2 * fwd - (2 * rows * mm[0][0] * mm[0][1] if backward == "no_input" else 0)
    return fwd + bwd


def head_params(din: int, s: Shapes, bottleneck: int) -> int:
    return sum(a * b for a, b in head_matmuls(din, s, bottleneck)) + 2 * s.hidden + bottleneck


def backbone_flops(model: nn.Module, views: int) -> tuple[float, int]:
    """Forward matmul FLOPs of the ViT on `views` 224 px views, from its layers (Linear: 2·T·in·out;
    attention QKᵀ and AV: 4·T²·D per block; patch embedding: 2·Tp·(3·p²)·D), and its parameter count."""
    spec_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    t = spec_tokens
    flops = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            flops += 2 * t * m.in_features * m.out_features
    conv = model.patch_embed.proj
    flops += 2 * model.patch_embed.num_patches * conv.in_channels * conv.kernel_size[0] ** 2 * model.embed_dim
    return float(flops * views), sum(p.numel() for p in model.parameters())


def attention_flops(model: nn.Module, views: int) -> float:
    """Forward FLOPs of QKᵀ and AV: 4·T²·D per block and view (FlopCounterMode does not count the CPU's
    fused attention kernel, so the cross-check on a CPU compares without it)."""
    t = model.patch_embed.num_patches + model.num_prefix_tokens
    return float(len(model.blocks) * 4 * t * t * model.embed_dim * views)


def account(s: Shapes, backbone: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    """{component: FLOPs} of the distillation step and of the heads step at shapes `s`."""
    views = s.tiles * s.views
    rows_i = views * min(s.ibot_tokens, s.patches)
    fwd, _ = backbone_flops(backbone, views)
    conv = backbone.patch_embed.proj
    conv_in_grad = 2 * views * backbone.patch_embed.num_patches * conv.in_channels * conv.kernel_size[0] ** 2
    conv_in_grad *= backbone.embed_dim  # the images need no gradient
    distill = {
        "student backbone matmuls fwd+bwd (bf16 on GPU)": 3 * fwd - conv_in_grad,
        "student backbone attention fwd+bwd (bf16 on GPU)": 3 * attention_flops(backbone, views),
        "teacher DINO head fwd": head_flops(views, s.teacher_dim, s, s.dino_bottleneck, "none"),
        "teacher iBOT head fwd": head_flops(rows_i, s.teacher_dim, s, s.ibot_bottleneck, "none"),
        "student DINO head fwd+bwd": head_flops(views, s.student_dim, s, s.dino_bottleneck, "input"),
        "student iBOT head fwd+bwd": head_flops(rows_i, s.student_dim, s, s.ibot_bottleneck, "input"),
    }
    hv = s.heads_tiles * s.views
    hrows = hv * s.heads_patches
    heads = {
        "teacher DINO head fwd": head_flops(hv, s.teacher_dim, s, s.dino_bottleneck, "none"),
        "teacher iBOT head fwd": head_flops(hrows, s.teacher_dim, s, s.ibot_bottleneck, "none"),
        "student DINO head fwd+bwd": head_flops(hv, s.teacher_dim, s, s.dino_bottleneck, "no_input"),
        "student iBOT head fwd+bwd": head_flops(hrows, s.teacher_dim, s, s.ibot_bottleneck, "no_input"),
    }
    return distill, heads


def traffic(s: Shapes, version: str, rows: int, trained_params: int, ema_params: int) -> dict[str, float]:
    """Bytes per step: the [N, K] passes of `version` and the parameter traffic."""
    nk = rows * s.prototypes * 4
    out = {f"[N,K] {k}": v * nk for k, v in N_K_PASSES[version].items()}
    out["AdamW (p, g, m, v read; p, m, v written) + clip + zero"] = trained_params * 4 * 9
    out["EMA (read 2, write 1)"] = ema_params * 4 * 3
    return out


def predict_h200(
    s: Shapes,
    distill_of,
    heads_of,
    nk: dict[tuple, float],
    params: tuple[int, int, int],
    student_fwd: float,
    bw_share: float,
    tokens: tuple[int, ...] = (64,),
) -> dict:
    """Predicted H200 seconds per step from the measured one (`H200_MEASURED`, fp32 heads, `before`
    passes, iBOT on all 64 pooled tokens per view) at an effective memory bandwidth of `bw_share` × the
    peak, by a two-rate model calibrated on that run: a step = its fixed part + its head matmul FLOPs / the
    heads' rate + its bytes / bandwidth; (b) and (c) for each count in `tokens` of iBOT tokens per view in
    distillation (`ibot_patches`), keyed ("b", precision, count).

    - fp32 matmul rate: from (d), the heads step (no backbone): its FLOPs / (time − its bytes / bandwidth);
    - bf16 matmul rate: from (c) − (b), the teacher's forward (13.3 × the student's forward FLOPs per
      image, measured by distill_step.py on that run);
    - the fixed part of (a)/(b) (student backbone forward, backward, AdamW, EMA: bf16, unchanged):
      (b) − its heads' FLOPs / the fp32 rate − its bytes / bandwidth;
    - (c) = (b) + the teacher's forward, unchanged;
    - a subset of n iBOT tokens per view: the iBOT heads' FLOPs and the [N, K] bytes at N = 2·tiles·n (its
      gather of the tokens, ≤ 2·tiles·64·(768 + 1536)·4 B ≈ 0.9 GB read, a few ms, is left out).
    `distill_of(n)` / `heads_of(n)` → the distillation / heads step's {component: FLOPs} at n iBOT tokens
    per view; `nk`: bytes per iBOT logit by (head_precision, heads stage, tokens per view)
    (`measured_nk_bytes`; `before` from N_K_PASSES); `params`: (student backbone + heads, student heads'
    EMA side, teacher-side heads) parameter counts."""
    bw = bw_share * H200_PEAK_BW
    m = H200_MEASURED
    b_params, s_heads, t_heads = params
    n_d, n_h16 = s.tiles * s.views * s.patches, s.heads_tiles * s.views * 16
    head_flops = sum(v for k, v in distill_of(s.patches).items() if "backbone" not in k)
    t_d_before = (
        sum(N_K_PASSES["before"].values()) * 4 * n_d * s.prototypes + b_params * 36 + b_params * 12
    ) / bw
    heads16 = sum(heads_of(16).values())
    t_h_bytes = lambda n, per: (per * n * s.prototypes + s_heads * 36 + t_heads * 12) / bw  # noqa: E731
    fp32_rate = heads16 / (m["d"] - t_h_bytes(n_h16, sum(N_K_PASSES["before"].values()) * 4))
    teacher = m["c"] - m["b"]
    bf16_rate = 13.3 * student_fwd / teacher
    fixed = m["b"] - head_flops / fp32_rate - t_d_before
    rate = {"fp32": fp32_rate, "bf16": bf16_rate}
    out = {"fp32 rate": fp32_rate, "bf16 rate": bf16_rate, "fixed": fixed, "teacher": teacher}
    for hp in ("fp32", "bf16"):
        for n in tokens:
            flops_n = sum(v for k, v in distill_of(n).items() if "backbone" not in k)
            rows_n = s.tiles * s.views * min(n, s.patches)
            b = (
                fixed
                + flops_n / rate[hp]
                + nk[(hp, False, n)] * rows_n * s.prototypes / bw
                + b_params * 48 / bw
            )
            out[("b", hp, n)], out[("c", hp, n)] = b, b + teacher
        for patches in (16, 10, 8, 4):
            n_h = s.heads_tiles * s.views * patches
            out[("d", hp, patches)] = sum(heads_of(patches).values()) / rate[hp] + t_h_bytes(
                n_h, nk[(hp, True, s.heads_patches)]
            )
    return out


def fake_trainer(cfg: DistillConfig, device: torch.device) -> Trainer:
    """A `Trainer` without a tile store or cache (mode (a)): the student, its objective, optimiser and EMA as
    `Trainer.__init__` builds them; `get_teacher_output` returns teacher tokens made once in memory."""
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.device, tr.world, tr.rank, tr.iteration = cfg, device, 1, 0, 0
    tr.amp = autocast_dtype(device, cfg.precision)
    tr.scaler = torch.amp.GradScaler(device.type, enabled=tr.amp == torch.float16)
    base = get_spec(cfg.student)
    tr.student_spec = base
    torch.manual_seed(cfg.seed + 1)
    backbone = build_model(base)
    tr.objective = build_objective(cfg, backbone.embed_dim, TEACHER_DIM, True).to(device)
    tr.model = StudentWithHeads(backbone, tr.objective.student_heads).to(device)
    tr.ddp = tr.model
    tr.ema = copy.deepcopy(tr.model.backbone).requires_grad_(False)
    tr.optimizer = torch.optim.AdamW(param_groups([tr.model]), lr=0.0, betas=(0.9, 0.999))
    tr.schedules = Schedules.build(10**4, 100, 1e-4, 1e-6, 0, 0.04, 0.4, 0.07, 0.04, 0, 0.996)
    g = torch.Generator().manual_seed(0)
    b, grid = cfg.batch_size, (224 // 14 // 2) ** 2
    fixed = TeacherTokens(
        torch.randn(2, b, TEACHER_DIM, generator=g).half().float().to(device),
        torch.randn(2, b, grid, TEACHER_DIM, generator=g).half().float().to(device),
    )
    tr.get_teacher_output = lambda batch: fixed
    tr.model.train()
    tr.objective.train()
    return tr


def fake_heads_trainer(cfg: HeadsConfig, device: torch.device) -> HeadsTrainer:
    """A `HeadsTrainer` without a cache, as `HeadsTrainer.__init__` builds its objective and optimiser."""
    from histodistill.distill.monitors import CollapseGuard
    from histodistill.distill.objectives import DinoIbot

    ht = HeadsTrainer.__new__(HeadsTrainer)
    ht.cfg, ht.device, ht.iteration, ht.log_rows, ht.name = cfg, device, 0, [], "bench"
    torch.manual_seed(cfg.seed)
    ht.objective = DinoIbot(
        cfg.objective_config(), TEACHER_DIM, TEACHER_DIM, teacher_patches=True, ema_teacher=True
    ).to(device)
    ht.optimizer = torch.optim.AdamW(param_groups([ht.objective.student_heads]), lr=0.0, betas=(0.9, 0.999))
    ht.schedules = Schedules.build(cfg.iterations, 1, cfg.lr, 1e-6, 0, 0.04, 0.4, 0.07, 0.04, 0, 0.996)
    ht.guard = CollapseGuard("bench", 0.0, 10**9)
    return ht


TEACHER_DIM = 1536


def distill_batch(b: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "globals": torch.from_numpy(rng.integers(0, 256, (b, 2, 3, 224, 224), dtype=np.uint8)),
        "locals": torch.zeros(b, 0, 3, 98, 98, dtype=torch.uint8),
    }


def heads_batch(b: int, patches: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "cls": torch.randn(2, b, TEACHER_DIM, generator=g).half().float(),
        "patch": torch.randn(2, b, patches, TEACHER_DIM, generator=g).half().float(),
    }


def timed(step, batch, device, steps: int) -> list[float]:
    step(batch)  # warm-up
    out = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def counted(step, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def profile(step, batch, device, title: str, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=False) as prof:
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n-- profile: {title} (top {top} ops by {key}) --")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48))


def fmt(x: float, unit: str) -> str:
    return f"{x / 1e12:9.3f} T{unit}" if x >= 1e11 else f"{x / 1e9:9.3f} G{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default="h0_mini")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles of the reduced distillation step")
    parser.add_argument("--heads-batch-size", type=int, default=16, help="tiles of the reduced heads step")
    parser.add_argument("--prototypes", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one step of each kind")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--skip-distill", action="store_true", help="only the heads step")
    parser.add_argument("--skip-heads", action="store_true", help="only the distillation step")
    parser.add_argument(
        "--no-count", action="store_true", help="no FlopCounterMode cross-check (one step less of each)"
    )
    parser.add_argument("--account-only", action="store_true", help="only the analytic account")
    parser.add_argument(
        "--head-precision", choices=["fp32", "bf16"], default="fp32", help="of the reduced, timed steps"
    )
    parser.add_argument("--ibot-patches", type=int, default=Shapes.heads_patches, help="of the heads step")
    parser.add_argument(
        "--distill-ibot-patches",
        type=int,
        default=8,
        help="iBOT tokens per view in distillation (`ibot_patches`; configs/h0mini.yaml: 8), predicted beside "
        "all 64 and used by the reduced distillation step",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    backbone = build_model(get_spec(args.student))
    paper = Shapes(prototypes=args.prototypes, student_dim=backbone.embed_dim)
    distill, heads = account(paper, backbone)
    views = paper.tiles * paper.views
    b_params = sum(p.numel() for p in backbone.parameters())
    sh = head_params(paper.student_dim, paper, paper.dino_bottleneck) + head_params(
        paper.student_dim, paper, paper.ibot_bottleneck
    )
    th = head_params(paper.teacher_dim, paper, paper.dino_bottleneck) + head_params(
        paper.teacher_dim, paper, paper.ibot_bottleneck
    )
    print(
        f"paper shapes: {paper.tiles} tiles × {paper.views} views, {paper.patches} iBOT tokens per view "
        f"(N = {views * paper.patches}), K = {paper.prototypes}; student backbone {b_params / 1e6:.1f} M params, "
        f"student heads {sh / 1e6:.1f} M, teacher heads {th / 1e6:.1f} M; heads stage {paper.heads_tiles} tiles × "
        f"{paper.heads_patches} tokens per view (N = {paper.heads_tiles * 2 * paper.heads_patches})"
    )
    print(
        "\nFLOPs per distillation step (a)/(b) (matmuls; the heads in fp32 outside autocast, or under bf16 "
        "autocast with head_precision: bf16, the same FLOPs):"
    )
    for k, v in distill.items():
        print(f"  {k:<45} {fmt(v, 'FLOP')}")
    print(f"  {'total':<45} {fmt(sum(distill.values()), 'FLOP')}")
    sub = args.distill_ibot_patches
    distill_sub = account(replace(paper, ibot_tokens=sub), backbone)[0]
    print(f"  with ibot_patches {sub} (of {paper.patches}):")
    for k, v in distill_sub.items():
        if "iBOT" in k:
            print(f"  {k:<45} {fmt(v, 'FLOP')}")
    print(f"  {'total':<45} {fmt(sum(distill_sub.values()), 'FLOP')}")
    for version, tokens in (("before", paper.patches), ("after", paper.patches), ("after", sub)):
        tr = traffic(paper, version, views * tokens, b_params + sh, b_params)
        print(f"\nmemory traffic per distillation step, {version}, {tokens} iBOT tokens per view:")
        for k, v in tr.items():
            print(f"  {k:<70} {v / 1e9:8.1f} GB")
        print(f"  {'total':<70} {sum(tr.values()) / 1e9:8.1f} GB")
    print(f"\nFLOPs per heads step (d), {paper.heads_tiles} tiles (fp32):")
    for k, v in heads.items():
        print(f"  {k:<45} {fmt(v, 'FLOP')}")
    print(f"  {'total':<45} {fmt(sum(heads.values()), 'FLOP')}")
    for version in ("before", "after"):
        tr = traffic(paper, version, paper.heads_tiles * 2 * paper.heads_patches, th, th)
        print(f"  memory traffic, {version}: {sum(tr.values()) / 1e9:.1f} GB")

    # [N, K] bytes per iBOT logit, measured on the real objective, and the H200 prediction
    token_counts = (paper.patches, sub)
    nk = {
        (hp, hs, n): measured_nk_bytes(hp, hs, replace(paper, ibot_tokens=n))
        for hp in ("fp32", "bf16")
        for hs, ns in ((False, token_counts), (True, (paper.heads_patches,)))
        for n in ns
    }
    print(
        "\n[N,K] traffic per iBOT logit, counted by TrafficMode on the real objective (lower bound; "
        f"hand count `before` {sum(N_K_PASSES['before'].values()) * 4} B, `after` "
        f"{sum(N_K_PASSES['after'].values()) * 4} B):"
    )
    for (hp, hs, tokens), v in nk.items():
        n = paper.heads_tiles * 2 * paper.heads_patches if hs else views * tokens
        print(
            f"  {'heads step' if hs else 'distillation step':<18} heads {hp}, {tokens:2d} iBOT tokens per view: "
            f"{v:6.1f} B per logit, {v * n * paper.prototypes / 1e9:7.1f} GB per step"
        )
    fwd_flops, _ = backbone_flops(backbone, views)
    student_fwd = fwd_flops + attention_flops(backbone, views)

    def heads_of(patches: int, net: nn.Module = backbone) -> dict[str, float]:
        return account(replace(paper, heads_patches=patches), net)[1]

    def distill_of(tokens: int, net: nn.Module = backbone) -> dict[str, float]:
        return account(replace(paper, ibot_tokens=tokens), net)[0]

    print(
        "\npredicted on an H200 (calibrated on the measured fp32 run "
        f"{H200_MEASURED}, iBOT on all {paper.patches} tokens; the heads stage at {paper.heads_tiles} tiles):"
    )
    print(
        "  bandwidth  fp32 / bf16 matmul rate   heads  iBOT tokens   (b) s   (c)/(b)   "
        "(d)/(b) per tile at 16 / 10 / 8 / 4 heads-stage tokens per view"
    )
    for share in (0.7, 0.85, 1.0):
        pr = predict_h200(
            paper, distill_of, heads_of, nk, (b_params + sh, sh, th), student_fwd, share, token_counts
        )
        for hp in ("fp32", "bf16"):
            for n in token_counts:
                b = pr[("b", hp, n)]
                per_tile = [pr[("d", hp, p)] / paper.heads_tiles / (b / paper.tiles) for p in (16, 10, 8, 4)]
                print(
                    f"  {share * H200_PEAK_BW / 1e12:4.1f} TB/s  {pr['fp32 rate'] / 1e12:5.1f} / "
                    f"{pr['bf16 rate'] / 1e12:5.1f} TFLOP/s   {hp}   {n:4d}       {b:6.3f}   "
                    f"{pr[('c', hp, n)] / b:6.2f}    " + " / ".join(f"{x:.3f}" for x in per_tile)
                )
    print(
        f"  (c)/(b) ≥ 2.5 needs (b) ≤ {pr['teacher'] / 1.5:.3f} s (the teacher's forward, "
        f"{pr['teacher']:.3f} s, / 1.5); (d)/(b) ≤ 0.05 per tile needs the heads step ≤ "
        f"{0.05 * paper.heads_tiles / paper.tiles:.1f} × (b)"
    )
    if args.account_only:
        return
    # the reduced step: the real code, its FLOPs counted, timed
    red = Shapes(
        tiles=args.batch_size,
        heads_tiles=args.heads_batch_size,
        heads_patches=args.ibot_patches,
        ibot_tokens=sub,
        prototypes=args.prototypes,
        student_dim=backbone.embed_dim,
    )
    r_distill, r_heads = account(red, backbone)
    del backbone
    gc.collect()
    print(
        f"\nreduced: {args.batch_size} tiles (distillation, {sub} iBOT tokens per view), "
        f"{args.heads_batch_size} tiles (heads) × {args.ibot_patches} iBOT tokens per view, heads "
        f"{args.head_precision}, device {device}"
    )
    hcfg = HeadsConfig(
        n_prototypes=args.prototypes,
        ibot_patches=red.heads_patches,
        iterations=10**4,
        head_precision=args.head_precision,
    )
    results = {}
    if not args.skip_heads:
        ht = fake_heads_trainer(hcfg, device)
        hb = {k: v.to(device) for k, v in heads_batch(args.heads_batch_size, red.heads_patches).items()}
        if not args.no_count:
            n = counted(ht.step, hb)
            print(
                f"heads step: FlopCounterMode {fmt(n, 'FLOP')}, analytic {fmt(sum(r_heads.values()), 'FLOP')}"
            )
        results["heads"] = timed(ht.step, hb, device, args.steps)
        if args.profile:
            profile(ht.step, hb, device, f"heads step, {args.heads_batch_size} tiles", args.top)
        del ht
        gc.collect()  # its heads and optimiser state (≈ 2 GB at 131,072 prototypes) before the student's
    if not args.skip_distill:
        cfg = DistillConfig(
            student=args.student,
            teacher="h_optimus_0",
            batch_size=args.batch_size,
            n_prototypes=args.prototypes,
            iterations=10**4,
            head_precision=args.head_precision,
            ibot_patches=sub,
        )
        tr = fake_trainer(cfg, device)
        batch = distill_batch(args.batch_size)
        if not args.no_count:
            n = counted(tr.step, batch)
            no_attn = sum(v for k, v in r_distill.items() if "attention" not in k)
            print(
                f"distill step: FlopCounterMode {fmt(n, 'FLOP')}, analytic "
                f"{fmt(sum(r_distill.values()), 'FLOP')} ({fmt(no_attn, 'FLOP')} without the attention, "
                f"which {device.type}'s fused kernel hides from it)"
            )
        results["distill (a)"] = timed(tr.step, batch, device, args.steps)
        if args.profile:
            profile(tr.step, batch, device, f"distillation step (a), {args.batch_size} tiles", args.top)
    print(f"\ntimes ({args.steps} steps after a warm-up; torch threads {torch.get_num_threads()}):")
    for name, ts in results.items():
        wall = [w for w, _ in ts]
        cpu = [c for _, c in ts]
        print(
            f"  {name:<12} wall min {min(wall):7.3f} median {statistics.median(wall):7.3f} s; "
            f"process CPU min {min(cpu):7.3f} median {statistics.median(cpu):7.3f} s"
        )
    if {"heads", "distill (a)"} <= set(results):
        h = statistics.median(w for w, _ in results["heads"]) / args.heads_batch_size
        d = statistics.median(w for w, _ in results["distill (a)"]) / args.batch_size
        print(f"  heads / distillation per tile (median wall) = {h / d:.3f}")
        for stat in (min, statistics.median):  # process CPU seconds: what a loaded machine moves least
            h = stat(c for _, c in results["heads"]) / args.heads_batch_size
            d = stat(c for _, c in results["distill (a)"]) / args.batch_size
            print(f"  heads / distillation per tile ({stat.__name__} process CPU) = {h / d:.3f}")


if __name__ == "__main__":
    main()
