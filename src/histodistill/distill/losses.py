"""Distillation losses as small pure-tensor functions.

H(t, s) = −Σ_k t_k log softmax(s / τ_s)_k, with t the teacher's target distribution.
- DINO: over global crops, every teacher crop against every *other* student crop (and local student
  crops against every teacher global crop), averaged over pairs; for two globals that is
  (H(t1, s2) + H(t2, s1)) / 2. `dino_pair_weight` converts that mean to DINOv2's normalisation.
- iBOT: mean over all patch tokens of both global crops of H(t_jp, s_jp) (no masking), computed in chunks
  by a custom autograd function so no dense [N, K] probability tensor is ever kept for backward.
- feature: cosine + smooth-L1 between teacher tokens and the student's tokens through a linear adapter.
- VICReg (Bardes et al. 2022; facebookresearch/vicreg, main_vicreg.py `VICReg.forward`): invariance (MSE),
  variance (hinge on the per-dimension std) and covariance (squared off-diagonal covariances / D) terms.
- NT-Xent (SimCLR, Chen et al. 2020, Eq. 1): cross-entropy of each embedding's positive against the 2N − 2
  other embeddings of the batch, cosine similarities over a temperature.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from histodistill.errors import HistodistillError


def soft_cross_entropy(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Mean over rows of H(t, s) (dense; for CLS-sized inputs)."""
    logp = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * logp).sum(dim=-1).mean()


def dino_loss(
    teacher_probs: list[torch.Tensor], student_logits: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """`teacher_probs`: one [B, K] per global crop; `student_logits`: the same global crops first, then locals."""
    terms = []
    for i, t in enumerate(teacher_probs):
        for j, s in enumerate(student_logits):
            if i != j:  # a teacher crop never supervises the same crop of the student
                terms.append(soft_cross_entropy(t, s, student_temp))
    return torch.stack(terms).mean()


DINO_NORMALIZATIONS = ("paper", "dinov2")


def dino_pair_weight(normalization: str, n_global: int, n_local: int) -> float:
    """Factor w such that w · (mean over pairs of H) is the DINO term of the chosen normalisation.

    With G global crops (teacher and student) and L local crops (student only) there are
    n_pairs = G(G − 1) + G·L (teacher global i, student crop j ≠ i) cross-entropies H_ij.
    - `paper`: the mean over the pairs, Σ H_ij / n_pairs, i.e. Eq. 3 of DINO (Caron et al. 2021) divided by
      its number of terms as DINO's reference code does (`total_loss /= n_loss_terms`): w = 1.
    - `dinov2`: the DINOv2 code (facebookresearch/dinov2, dinov2/train/ssl_meta_arch.py,
      `forward_backward`): Σ H_ij / (n_global_crops_loss_terms + n_local_crops_loss_terms) with
      n_global_crops_loss_terms = G(G − 1) and n_local_crops_loss_terms = max(G·L, 1), so
      w = n_pairs / (G(G − 1) + max(G·L, 1)): 2/3 for two global crops and no local crops (the `max(·, 1)`
      adds a term that does not exist), 1 whenever L > 0.
    The iBOT term is a mean over patch tokens in both (DINOv2 multiplies its masked mean by
    loss_scales · ibot_loss_scale = 2 · 1/2), so only the DINO weight changes.

    HistodistillError for another name or G < 2.
    """
    if normalization not in DINO_NORMALIZATIONS:
        raise HistodistillError(
            f"dino_normalization must be one of {DINO_NORMALIZATIONS}, not {normalization!r}"
        )
    if n_global < 2:
        raise HistodistillError(f"the DINO loss needs at least 2 global crops, not {n_global}")
    n_pairs = n_global * (n_global - 1) + n_global * n_local
    if normalization == "paper":
        return 1.0
    return n_pairs / (n_global * (n_global - 1) + max(n_global * n_local, 1))


class _ChunkedSoftCE(torch.autograd.Function):
    """mean_n −Σ_k t_nk log softmax(s_n / τ)_k with t = softmax((u_n − c) / τ_t), chunked over rows.

    Saves only the inputs; forward and backward recompute each chunk's softmaxes, so peak extra memory is
    one chunk of [chunk, K], however many patch tokens there are.
    """

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
            # d/ds of −Σ t log softmax(s/τ) = (softmax(s/τ) − t) / τ   (t sums to 1)
            g = (torch.softmax(s / student_temp, dim=-1) - t) / (student_temp * n)
            grad[a : a + ctx.chunk] = (g * grad_out).to(grad.dtype)
        return grad, None, None, None, None, None


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    chunk: int = 4096,
) -> torch.Tensor:
    """1/(2P)·Σ_p Σ_j H(t_jp, s_jp) over all patch tokens [.., K] of both global crops (rows flattened)."""
    k = student_patch_logits.shape[-1]
    return _ChunkedSoftCE.apply(
        student_patch_logits.reshape(-1, k),
        teacher_patch_logits.detach().reshape(-1, k),
        center.reshape(1, k).to(student_patch_logits.device).float(),
        student_temp,
        teacher_temp,
        chunk,
    )


class FeatureAdapter(nn.Module):
    """Linear map from student tokens to the teacher's width, for the head-free `feature` objective."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def feature_loss(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """(1 − cosine) + smooth-L1, averaged over tokens; the student's tokens already mapped by the adapter."""
    s, t = student_tokens.float(), teacher_tokens.float().detach()
    cosine = 1 - nn.functional.cosine_similarity(s, t, dim=-1).mean()
    return cosine + nn.functional.smooth_l1_loss(s, t, beta=beta)


class VicregTerms(NamedTuple):
    """The three unweighted VICReg terms (scalars)."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


VICREG_EPS = 1e-4  # inside the square root of the variance term (facebookresearch/vicreg)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_terms(x: torch.Tensor, y: torch.Tensor, eps: float = VICREG_EPS) -> VicregTerms:
    """VICReg's terms for two batches of expander outputs x, y [N, D] (row i of x and y: one pair).

    invariance = mean((x − y)²) over all N·D entries; variance = ½ Σ_{z∈{x,y}} mean_d relu(1 − sqrt(var_d(z) +
    eps)) with the unbiased variance over the batch; covariance = Σ_{z∈{x,y}} Σ_{i≠j} C(z)_ij² / D with
    C(z) = z̃ᵀz̃ / (N − 1), z̃ centred. As facebookresearch/vicreg main_vicreg.py (`VICReg.forward`), whose
    loss is 25·invariance + 25·variance + 1·covariance; computed in float32. HistodistillError for N < 2
    (no batch variance) or shapes that differ.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise HistodistillError(
            f"VICReg needs two [N, D] batches of one shape, not {tuple(x.shape)}, {tuple(y.shape)}"
        )
    n, d = x.shape
    if n < 2:
        raise HistodistillError(f"VICReg needs a batch of at least 2 pairs (batch variance), not {n}")
    x, y = x.float(), y.float()
    invariance = nn.functional.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + eps), torch.sqrt(y.var(0) + eps)
    variance = torch.relu(1 - std_x).mean() / 2 + torch.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    covariance = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
    return VicregTerms(invariance, variance, covariance)


def nt_xent(x: torch.Tensor, y: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent for N positive pairs (x_i, y_i), x, y [N, D]: the mean over the 2N anchors of
    −log(exp(sim(a, p)/τ) / Σ_{k≠a} exp(sim(a, k)/τ)), sim the cosine, k over all 2N − 1 other embeddings.

    This is Eq. 1 and the loss L = 1/(2N) Σ ℓ of Chen et al. 2020 (the reference TF code,
    google-research/simclr `add_contrastive_loss`, returns loss_a + loss_b, twice this mean). Computed in
    float32. HistodistillError for N < 2 (no negatives) or shapes that differ.
    """
    if x.shape != y.shape or x.ndim != 2:
        raise HistodistillError(
            f"NT-Xent needs two [N, D] batches of one shape, not {tuple(x.shape)}, {tuple(y.shape)}"
        )
    n = x.shape[0]
    if n < 2:
        raise HistodistillError(f"NT-Xent needs a batch of at least 2 pairs (negatives), not {n}")
    z = nn.functional.normalize(torch.cat([x, y]).float(), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return nn.functional.cross_entropy(logits, positives)


class Expander(nn.Module):
    """The seed's expander: `n_layers` dense layers, ReLU between them (and BatchNorm before each ReLU with
    `batch_norm`, as VICReg's `Projector`), the last without bias: in_dim → width → … → width.

    VICReg's (facebookresearch/vicreg main_vicreg.py `Projector`, `--mlp 8192-8192-8192`) and the seed
    paper's (Farndale et al., 3 layers, 8192 wide). Input [N, in_dim] → [N, width].
    """

    def __init__(self, in_dim: int, width: int = 8192, n_layers: int = 3, batch_norm: bool = True):
        super().__init__()
        if n_layers < 1:
            raise HistodistillError(f"the expander needs at least one layer, not {n_layers}")
        dims = [in_dim] + [width] * n_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-2], dims[1:-1], strict=True):
            layers.append(nn.Linear(a, b))
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.float())
