"""Distillation losses as small pure-tensor functions.

H(t, s) = −Σ_k t_k log softmax(s / τ_s)_k, with t the teacher's target distribution.
- DINO: over global crops, every teacher crop against every *other* student crop (and local student
  crops against every teacher global crop), averaged over pairs; for two globals that is
  (H(t1, s2) + H(t2, s1)) / 2. `dino_pair_weight` converts that mean to DINOv2's normalisation.
- iBOT: mean over all patch tokens of both global crops of H(t_jp, s_jp) (no masking), computed in chunks
  by a custom autograd function that computes the gradient with the loss (one pass) and keeps only it;
  the teacher's targets t are made once per step, in place of its logits (`softmax_targets_`).
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

from histodistill.distill.monitors import entropy
from histodistill.errors import HistodistillError


def soft_cross_entropy(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """Mean over rows of H(t, s) (dense; for CLS-sized inputs)."""
    logp = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * logp).sum(dim=-1).mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regularizer of DINOv2 (Sablayrolles et al. 2019, "Spreading vectors for similarity search";
    DINOv2's `dinov2/loss/koleo_loss.py`): x [B, D] (one global crop's student CLS tokens) is L2-normalised,
    each row's nearest other row found by inner product, and the loss is −mean log(‖x_i − x_nn(i)‖ + eps)
    (torch's PairwiseDistance with eps 1e-8, as the reference), in float32. Scalar; needs B ≥ 2."""
    if x.shape[0] < 2:
        raise HistodistillError(f"KoLeo needs at least 2 rows per crop, got {x.shape[0]}")
    x = torch.nn.functional.normalize(x.float(), p=2, dim=-1, eps=eps)
    dots = x @ x.t()
    dots.fill_diagonal_(-1)  # the reference's trick: a row is never its own neighbour
    nearest = dots.argmax(dim=1)
    distances = torch.nn.functional.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


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


@torch.no_grad()
def softmax_targets_(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits u [N, K] → the targets t = softmax((u − c) / τ_t) row by row, **in place** (the
    logits' float32 storage holds t afterwards), `chunk` rows at a time, and the collapse monitors' sums
    of the same pass: (t [N, K], Σ_n H(t_n) (scalar), Σ_n t_n [K]); `center` [1, K] or [K].

    One pass where the previous code made three (the chunked loss's forward and backward and the monitors'
    `TargetStats.of_logits` each recomputed the softmax from the logits): the same operations on the same
    chunks, so the same numbers. DINOv2 also keeps its iBOT targets as probabilities
    (`SSLMetaArch.get_teacher_output`: `masked_teacher_ibot_softmaxed_centered`). HistodistillError for
    logits that are not float32 (in place needs the targets' precision).
    """
    if teacher_logits.dtype != torch.float32:
        raise HistodistillError(f"softmax_targets_ needs float32 logits, not {teacher_logits.dtype}")
    u = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    c = center.reshape(1, -1).to(u.device).float()
    ent = torch.zeros((), device=u.device)
    probs_sum = torch.zeros(u.shape[-1], device=u.device)
    for a in range(0, u.shape[0], chunk):
        block = u[a : a + chunk]
        t = torch.softmax(block.sub_(c).div_(teacher_temp), dim=-1)
        ent += entropy(t).sum()
        probs_sum += t.sum(0)
        block.copy_(t)
    return teacher_logits, ent, probs_sum


class _ChunkedSoftCE(torch.autograd.Function):
    """mean_n −Σ_k t_nk log softmax(s_n / τ)_k for teacher target probabilities t, chunked over rows.

    The gradient (softmax(s / τ) − t) / (τ·N) is computed in the forward pass, in the same chunk as the
    loss (so the student's softmax is taken once per step, not again in a backward recomputation), and
    stored in the student logits' dtype in place of them: nothing else is saved, so the student logits
    are freed once the caller drops them, and peak memory is one [N, K] gradient plus one chunk of
    temporaries. Without a gradient to compute (no_grad, evaluation) only the loss is. The backward only
    multiplies the stored gradient by the incoming one; it can run once (no `retain_graph`).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_probs, student_temp, chunk):
        n = student_logits.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        grad = torch.empty_like(student_logits) if ctx.needs_input_grad[0] else None
        for a in range(0, n, chunk):
            x = student_logits[a : a + chunk].float() / student_temp
            t = teacher_probs[a : a + chunk].float()
            total += -(t * torch.log_softmax(x, dim=-1)).sum()
            if grad is not None:
                # d/ds of −Σ t log softmax(s/τ) = (softmax(s/τ) − t) / τ   (t sums to 1)
                if grad.dtype == torch.float32:  # written in place: no temporary, no copy
                    torch.sub(torch.softmax(x, dim=-1), t, out=grad[a : a + chunk])
                    grad[a : a + chunk].div_(student_temp * n)
                else:  # a reduced-precision gradient (bf16 heads): made in float32, rounded once
                    g = torch.softmax(x, dim=-1).sub_(t).div_(student_temp * n)
                    grad[a : a + chunk].copy_(g)
        ctx.grad = grad
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked iBOT loss keeps its gradient for one backward pass only")
        return grad.mul_(grad_out), None, None, None


def ibot_loss_from_probs(
    student_patch_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float, chunk: int = 4096
) -> torch.Tensor:
    """1/N·Σ_n H(t_n, s_n) over patch-token rows [.., K] (rows flattened) for teacher target probabilities
    t (from `softmax_targets_`), chunked (`_ChunkedSoftCE`)."""
    k = student_patch_logits.shape[-1]
    return _ChunkedSoftCE.apply(
        student_patch_logits.reshape(-1, k), teacher_probs.detach().reshape(-1, k), student_temp, chunk
    )


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    chunk: int = 4096,
) -> torch.Tensor:
    """1/(2P)·Σ_p Σ_j H(t_jp, s_jp) over all patch tokens [.., K] of both global crops (rows flattened),
    t = softmax((u − c) / τ_t) of the teacher logits u (copied, not changed)."""
    k = student_patch_logits.shape[-1]
    u = teacher_patch_logits.detach().reshape(-1, k).float().clone()
    probs = softmax_targets_(u, center.to(u.device), teacher_temp, chunk)[0]
    return ibot_loss_from_probs(student_patch_logits, probs, student_temp, chunk)


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
