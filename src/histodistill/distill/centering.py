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
        total = _all_reduce_sum(flat.sum(dim=0, keepdim=True))
        count = _all_reduce_sum(torch.tensor([float(flat.shape[0])], device=flat.device))
        batch_center = (total / count).to(self.center.device)
        self.center = self.center * self.momentum + batch_center * (1 - self.momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced assignment of samples to prototypes (rows sum to 1), as in SwAV/DINOv2, over the global batch."""
    q = torch.exp((teacher_logits.float() - teacher_logits.float().max()) / temperature).t()  # [K, B]
    n_samples = _all_reduce_sum(torch.tensor([float(q.shape[1])], device=q.device))
    n_prototypes = q.shape[0]
    q /= _all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()
