"""The perturbed sorted top-K operator (differentiable patch selection).

Source: Cordonnier et al. 2021, "Differentiable Patch Selection for Image Recognition" (CVPR; arXiv:2104.03059),
§3, built on the perturbed optimizers of Berthet et al. 2020 ("Learning with Differentiable Perturbed
Optimizers"); used by ScoreNet (Stegmüller et al., WACV 2023; reference code stegmuel/ScoreNet,
`source/patch_selection/perturbed_topk.py`).

For scores x ∈ R^N the hard *sorted* top-K selection is the matrix Y(x) ∈ {0, 1}^{K×N} whose row k is the
one-hot of the k-th selected index in increasing index order (so the K selected regions keep their spatial
order). Y(x) is the argmax of the linear program ⟨Y, x 1ᵀ⟩ over the polytope C = {Y ≥ 0 : rows sum to 1,
columns sum to ≤ 1, Σ_{n} n·Y_{k,n} increasing in k}. Its Gaussian smoothing

    Y_σ(x) = E_Z[Y(x + σZ)],        Z ~ N(0, I_N),

is differentiable with Jacobian  ∂Y_σ/∂x = E_Z[Y(x + σZ) Zᵀ] / σ  (Berthet et al., Prop. 3.1). Both
expectations are estimated with the same `num_samples` Monte-Carlo draws, as in the reference code.
Y_σ(x) is a convex combination of vertices of C, so it satisfies C's row and column constraints exactly.

Deliberate deviations from the reference code: the backward pass uses E[(Y − Y(x)) Zᵀ]/σ, the same
expectation (E[Z] = 0 and Y(x) is fixed) with the hard selection as a control variate: where no draw
changes the selection (σ small against the score gaps) the estimate is exactly 0 instead of Y·mean(Z)/σ,
pure noise of size 1/(σ√S). The reference module also decays σ during training (`sigma_decay`); here σ is
a plain argument and the caller owns its schedule.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def hard_sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The hard sorted top-K indicator: scores [B, N] → Y [B, K, N] (float 0/1), row k the one-hot of the
    k-th largest-scoring index *in increasing index order*. Ties are broken by `torch.topk`.

    Raises ValueError unless 1 ≤ k ≤ N.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top-K needs 1 <= k <= N; got k={k}, N={n}")
    indices = torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return F.one_hot(indices, n).to(scores.dtype)


class PerturbedSortedTopK(torch.autograd.Function):
    """autograd function: (scores [B, N], k, num_samples, sigma) → Y_σ [B, K, N] (see the module docstring).

    Forward: the mean over `num_samples` Gaussian perturbations of the hard sorted top-K indicator.
    Backward: grad_x[b, n] = Σ_{k,m} grad_Y[b, k, m] · mean_s((Y_s − Y(x))[b, k, m] Z_s[b, n]) / σ.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, num_samples: int, sigma: float, generator=None):
        b, n = scores.shape
        noise = torch.randn(
            (b, num_samples, n), device=scores.device, dtype=scores.dtype, generator=generator
        )
        perturbed = hard_sorted_topk(scores.detach()[:, None, :] + sigma * noise, k)  # [B, S, K, N]
        hard = hard_sorted_topk(scores.detach(), k)
        ctx.save_for_backward(perturbed - hard[:, None], noise)  # the control variate (module docstring)
        ctx.sigma = sigma
        return perturbed.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        perturbed, noise = ctx.saved_tensors  # perturbed: Y_s − Y(x)
        # E[(Y − Y(x)) Zᵀ]/σ contracted with the incoming gradient, without forming the [B, K, N, N] Jacobian
        weights = torch.einsum("bkm,bskm->bs", grad_output, perturbed)  # ⟨grad, Y_s⟩ per sample
        grad = torch.einsum("bs,bsn->bn", weights, noise) / (noise.shape[1] * ctx.sigma)
        return grad, None, None, None, None


def perturbed_sorted_topk(
    scores: torch.Tensor,
    k: int,
    num_samples: int = 500,
    sigma: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Y_σ(scores): [B, N] → [B, K, N], differentiable in `scores` (module docstring; Cordonnier et al. 2021).

    `num_samples` Gaussian draws (the reference module's default, and `ScoreNetModelConfig`'s, is 1000),
    noise scale `sigma` (in units of the scores). `generator` makes the draws
    reproducible. Raises ValueError for k outside [1, N], num_samples < 1 or sigma <= 0 (use
    `hard_sorted_topk` for σ = 0).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N]; got shape {tuple(scores.shape)}")
    if num_samples < 1 or not sigma > 0:
        raise ValueError(f"perturbed top-K needs num_samples >= 1 and sigma > 0; got {num_samples}, {sigma}")
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"top-K needs 1 <= k <= N; got k={k}, N={scores.shape[-1]}")
    return PerturbedSortedTopK.apply(scores, k, num_samples, float(sigma), generator)


def straight_through_topk(
    scores: torch.Tensor,
    k: int,
    num_samples: int = 500,
    sigma: float = 0.05,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The hard sorted top-K in the forward pass with the perturbed Jacobian in the backward pass:
    Y_hard + Y_σ − stop_grad(Y_σ), [B, N] → [B, K, N]. As the reference ScoreNet does in training, so that the
    fine encoder always sees exactly K whole regions (never a blend).

    Deliberate deviation from the reference code: there the hard indicator's rows are in *score* order
    (`torch.topk`) while the perturbed one's are in *index* order, so row k of the forward and of the gradient
    can name different regions; here both are in index order.
    """
    soft = perturbed_sorted_topk(scores, k, num_samples, sigma, generator)
    return hard_sorted_topk(scores.detach(), k) + soft - soft.detach()
