"""Teacher target distributions: softmax centering with an EMA centre, or Sinkhorn-Knopp.

Reductions across processes happen only when torch.distributed is initialised, so the same code runs in
a single CPU process and in DDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SoftmaxCenter(nn.Module):
    """softmax((t − c) / τ) with c an EMA (momentum 0.9) of the teacher's mean logits over the global batch.

    The centre is a buffer `center` [1, K] (float32), so it is saved in the state_dict of whatever module
    holds it and moves with `.to(device)`. Source: DINOv2 `DINOLoss.softmax_center_teacher` /
    `update_center` (dinov2/loss/dino_clstoken_loss.py), without the asynchronous all-reduce.
    """

    def __init__(self, n_prototypes: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    def probs(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """[N, K] logits → [N, K] target probabilities (gradient flows to the logits)."""
        center = self.center.to(teacher_logits.device, teacher_logits.dtype)
        return torch.softmax((teacher_logits - center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """c ← m·c + (1 − m)·mean of `teacher_logits` [..., K] over all rows of all processes."""
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        self.update_from_sum(flat.sum(dim=0, keepdim=True), flat.shape[0])

    @torch.no_grad()
    def update_from_sum(self, logit_sum: torch.Tensor, n_rows: int) -> None:
        """`update` from this process's column sum of the logits [1, K] (float32) over `n_rows` rows, for
        callers that take the sum before the logits are overwritten (`losses.softmax_targets_`)."""
        total = _all_reduce_sum(logit_sum.float().reshape(1, -1).clone())
        count = _all_reduce_sum(torch.tensor([float(n_rows)], device=logit_sum.device))
        batch_center = (total / count).to(self.center.device)
        self.center = self.center * self.momentum + batch_center * (1 - self.momentum)


def _all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def sinkhorn_center(
    teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3, chunk: int = 4096
) -> torch.Tensor:
    """The centre c [1, K] for which softmax((u − c) / τ) row by row *is* the Sinkhorn-Knopp assignment.

    Sinkhorn-Knopp (SwAV; DINOv2 `DINOLoss.sinkhorn_knopp_teacher`, `iBOTPatchLoss.sinkhorn_knopp_teacher`)
    alternately divides the matrix Q = exp(u / τ)ᵀ [K, N] by its prototype (row) sums and its sample
    (column) sums, ending with the samples. Its result is therefore exp(u_nk / τ)·R_k·C_n with the last
    scaling C_n normalising each sample: a per-sample softmax of u_n / τ + log R. This computes log R
    (n_iterations prototype normalisations, the first on the raw matrix, the next ones on column-normalised
    rows) and returns c = −τ·log R, reading `chunk` rows of `teacher_logits` [N, K] at a time: no [N, K]
    tensor is ever held, so it serves patch tokens at 131,072 prototypes (the iBOT targets; the chunked
    cross-entropy then uses c like a softmax centre). Sums and the maximum run over the global batch
    (all-reduced when torch.distributed is initialised). Uniform factors (1/K, 1/N, the global sum) of the
    reference loop cancel in the softmax. Returns float32 on the logits' device.
    """
    u = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    chunks = [u[a : a + chunk].float() / temperature for a in range(0, u.shape[0], chunk)]
    tiny = torch.finfo(torch.float32).tiny
    # first prototype normalisation, on exp(u / τ): log r_k = m_k + log Σ_n exp(u_nk / τ − m_k)
    m = _all_reduce_max(torch.stack([c.max(0).values for c in chunks]).max(0).values)
    s = _all_reduce_sum(sum(torch.exp(c - m).sum(0) for c in chunks))
    log_scale = -(m + torch.log(s.clamp_min(tiny)))
    for _ in range(n_iterations - 1):  # then: column-normalise (softmax), prototype sums, divide
        r = _all_reduce_sum(sum(torch.softmax(c + log_scale, dim=-1).sum(0) for c in chunks))
        log_scale = log_scale - torch.log(r.clamp_min(tiny))
    return (-temperature * (log_scale - log_scale.max())).reshape(1, -1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced assignment [N, K] of samples to prototypes (rows sum to 1) over the global batch, as in
    SwAV / DINOv2: softmax((u − c) / τ) with c = `sinkhorn_center` (the same numbers as the reference's
    dense loop; tests/unit/test_distill_primitives.py checks it against that loop)."""
    center = sinkhorn_center(teacher_logits, temperature, n_iterations)
    return torch.softmax((teacher_logits.float() - center) / temperature, dim=-1)
