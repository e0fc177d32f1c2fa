"""SLPD's prototype distillation terms, L_intra and L_inter (Yu, Lin & Xu 2023, Eqs. 4 and 7).

Both are DINO cross-entropies H(t, s) = −Σ_k t_k log softmax(s / τ_s)_k whose teacher side is a *prototype*
(a point in the head's L2-normalised bottleneck space) put through the teacher head's last, weight-normalised
layer (`ProjectionHead.logits`; the reference's `teacher.forward_last_layer`) and then centred and sharpened
like DINO's targets, with its own centre (the reference's second `DINOLoss`, `dino_loss_proto`).

- L_intra: t = target of the region's own prototype c; mean of H(t, s_v) over the student's crops v and the
  regions.
- L_inter: the K neighbour slides' matched prototypes c'_1..c'_K; the mean over j of H(t_j, s_v), which is
  H((1/K) Σ_j t_j, s_v) since H is linear in t (the reference averages the K cross-entropies).

Deliberate deviation: the reference's `DINOLoss.forward` with one teacher chunk skips student crop 0 (its
`v == iq` rule meant for global-vs-same-global pairs); here every student crop is supervised.
"""

from __future__ import annotations

import torch

from histodistill.distill.centering import SoftmaxCenter
from histodistill.distill.losses import soft_cross_entropy


def prototype_loss(
    student_logits: list[torch.Tensor],
    target_logits: torch.Tensor,
    center: SoftmaxCenter,
    teacher_temp: float,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Mean over student crops of H(mean_j softmax((u_j − c) / τ_t), s_v).

    student_logits: one [B, P] per crop (the same B regions in every crop); target_logits: [B, T, P], the
    teacher-head logits of T prototypes per region (T = 1 for L_intra, K for L_inter); `center` is read, not
    updated (call `center.update` once per step with all prototype logits). Returns a scalar; 0 for B = 0.
    """
    if target_logits.shape[0] == 0:
        return student_logits[0].sum() * 0.0
    probs = center.probs(target_logits.detach(), teacher_temp).mean(dim=1)  # [B, P]
    return torch.stack([soft_cross_entropy(probs, s, student_temp) for s in student_logits]).mean()
