"""The ScoreNet model: a low-resolution scorer ViT, differentiable top-K region selection, a fine local
encoder on the K selected full-resolution regions, and a mixer transformer.

Source: Stegmüller et al., "ScoreNet: Learning Non-Uniform Attention and Augmentation for Transformer-Based
Histopathological Image Classification" (WACV 2023), checked against the authors' code (stegmuel/ScoreNet:
`source/models/scorenet.py`, `source/models/vision_transformers_peg.py`, `main_scorenet.py`).

Forward pass for an ROI [B, 3, H, W] (float RGB in [0, 1], native µm/px):

1. The ROI is cut into an n_h × n_w grid of `region_px` (P_h) regions; the thumbnail is the ROI resized to
   (n_h·P_l, n_w·P_l), P_l = `low_patch_px`, i.e. downscaled by s = P_h / P_l, so that one scorer token is one
   region.
2. The scorer (`ScorerViT`: patch embedding, a CPVT position-encoding generator, `depth` pre-norm blocks)
   runs on the thumbnail. Before its last `n_global_blocks` blocks a global token, the mean of the tokens
   (global average pooling), is prepended; its normalised outputs of those blocks, concatenated, are the
   scorer's global representation, and its last-block attention to the N = n_h·n_w region tokens, mixed over
   heads by learned weights, is the relevance distribution (the scores).
3. K = `top_k` or ⌈`k_fraction`·N⌉ regions are selected: in training with the straight-through perturbed
   sorted top-K (`topk.straight_through_topk`: hard in the forward pass, gradient E[Y Zᵀ]/σ), at test time
   with the hard sorted top-K.
4. The local encoder (`LocalEncoder`: any registry model, frozen by default, or LoRA; or the paper's own ViT,
   `PaperLocalViT`) embeds each selected region; a linear map brings its width to the mixer's when they
   differ.
5. The mixer (`Mixer`: `mixer_depth` blocks over the K region embeddings, a mean token prepended before its
   last block) gives the fine representation; the model's representation is [scorer global ⊕ mixer token],
   and a linear head gives the logits.

Deliberate deviations from the reference code (each a bug or a hard-coded value there):
- the PEG is CPVT's `conv(x) + x`; the reference overwrites the residual (`x = proj(cnn_feat)` twice);
- the heads' attentions are mixed by softmax(w) over learned per-head weights; the reference uses a 1×1
  conv whose weights it min–max normalises in place (one head always gets weight 0; equal weights divide by
  zero); the parameter count is the same (one weight per head);
- the thumbnail is resized with antialiasing (the reference: bicubic `F.interpolate` without it, which
  aliases at s = 8 or 14);
- an ROI whose sides are not multiples of P_h is cropped to the largest multiple (the reference requires
  divisible sizes);
- hard and perturbed selections are both in region-index order (see `topk.straight_through_topk`);
- at test time the K regions are gathered, not multiplied by a one-hot matrix over all N regions, so the
  fine encoder's cost is K regions (the reference's einsum touches all N);
- the local encoder is any registry model (the paper's modular note), with a linear map to the mixer
  width where widths differ; `PaperLocalViT` is the paper's choice (a ViT of the scorer's architecture);
- a registry encoder's embeddings are standardized per feature with the training regions' statistics
  before that map (`embed_norm`, `Standardize`): on the demo, a mixer and head trained on the frozen
  student's raw embeddings of (decisive region, a neighbour) reached 0.69 test accuracy, on standardized
  ones 1.00 (a logistic regression on the raw decisive embedding: 0.53–0.94 depending on its C);
- the classifier is one linear layer (the reference: Linear(288, 128) → ReLU → Linear(128, C)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from histodistill.bench import BenchmarkError
from histodistill.bench.scorenet.topk import straight_through_topk
from histodistill.distill.heads import dino_init


@dataclass(frozen=True)
class ScoreNetModelConfig:
    """ScoreNet's sizes (defaults: the paper's and the reference code's `main_scorenet.py`).

    low_patch_px: P_l, the scorer's patch (px of the thumbnail); region_px: P_h, a region's side in px of the
    ROI (s = P_h / P_l; the paper: 128 or 224); embed_dim, depth, num_heads, mlp_ratio: the scorer ViT (and
    `PaperLocalViT`); n_global_blocks: the last blocks that carry the global token (reference
    `n_cls_scorer` = 2); mixer_depth, mixer_mlp_ratio: the mixer (reference `TransformerEncoder`: 4 deep,
    ratio 4, no qkv bias); top_k: K (None: ⌈k_fraction·N⌉, the reference's hard-coded 10%); num_samples and
    sigma: the perturbed top-K's Monte-Carlo draws and noise (reference: 1000 and 1e-3, in units of the
    attention scores); scorer_only: no fine branch (the "glorified low-resolution ViT" baseline);
    embed_norm: standardize a registry local encoder's embeddings per feature before the projection to the
    mixer (`Standardize`, fitted on the training ROIs' regions by the protocol). Not in the paper, whose local encoder trains with the rest; a frozen foreign encoder's embeddings
    carry a large component shared by every region (on the demo: 6.4 of a norm of 9.7) that the mixer's
    LayerNorm, per token, does not remove.
    """

    low_patch_px: int = 16
    region_px: int = 128
    embed_dim: int = 96
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: float = 2.0
    n_global_blocks: int = 2
    mixer_depth: int = 4
    mixer_mlp_ratio: float = 4.0
    top_k: int | None = None
    k_fraction: float = 0.1
    num_samples: int = 1000
    sigma: float = 1e-3
    scorer_only: bool = False
    embed_norm: bool = True

    def __post_init__(self):
        if self.region_px % self.low_patch_px:
            raise BenchmarkError(
                f"scorenet: region_px {self.region_px} must be a multiple of low_patch_px {self.low_patch_px}"
            )
        if not 1 <= self.n_global_blocks <= self.depth:
            raise BenchmarkError(f"scorenet: n_global_blocks must be in [1, depth={self.depth}]")

    @property
    def scale(self) -> int:
        """s = P_h / P_l, the scorer's downscaling factor."""
        return self.region_px // self.low_patch_px

    def k_for(self, n_regions: int) -> int:
        """K for an ROI of `n_regions` regions (at least 1, at most N)."""
        k = self.top_k if self.top_k is not None else math.ceil(self.k_fraction * n_regions)
        return max(1, min(k, n_regions))


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, qkv_bias: bool) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm) for _ in range(depth)
    )


def _attention(block: Block, x: torch.Tensor, query: int = 0) -> torch.Tensor:
    """Block `block`'s attention of token `query` to every token: x [B, T, D] → [B, heads, T]."""
    attn = block.attn
    b, t, d = x.shape
    qkv = (
        attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    )
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q[:, :, query : query + 1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]


def n_masked(k: int, fraction: float) -> int:
    """Regions the masking probe blanks among K selected ones: ⌊fraction·K + ½⌋ (half up), in [0, K].
    K = 1 or 2 at 75% blank all of them; K = 4 blanks 3, K = 10 blanks 8."""
    return min(k, max(0, math.floor(fraction * k + 0.5)))


class Standardize(nn.Module):
    """Per-feature standardization of a frozen encoder's embeddings [..., E] → [..., E] with fixed statistics
    (`fit`: mean and standard deviation over the training ROIs' regions; identity until fitted), the
    `StandardScaler` a linear probe on them would use. Fixed rather than batch statistics, so that training
    and test time compute the same function."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the statistics from embeddings [M, E] (M ≥ 2); BenchmarkError for fewer rows."""
        if embeddings.shape[0] < 2:
            raise BenchmarkError("scorenet: standardizing the embeddings needs at least 2 training regions")
        self.mean.copy_(embeddings.mean(0))
        self.std.copy_(embeddings.std(0).clamp_min(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PEG(nn.Module):
    """CPVT's position-encoding generator (Chu et al. 2021): depthwise 3×3 conv on the token grid + identity.
    tokens [B, h·w, D] → [B, h·w, D]; any grid size works."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        return (self.proj(grid) + grid).flatten(2).transpose(1, 2)


class ScorerViT(nn.Module):
    """The scorer (and the paper's local encoder): ViT with conditional position encoding and a mean token.

    `forward(images [B, 3, H, W])` → (global [B, n_global_blocks·D], scores [B, N]) with N = (H/P)·(W/P):
    the module docstring's step 2. `forward_pooled` → [B, D]: the mean of the final normalised tokens (the
    reference `VisionTransformer.forward`, GAP).
    """

    def __init__(
        self, patch_px: int, dim: int, depth: int, heads: int, mlp_ratio: float, n_global_blocks: int
    ):
        super().__init__()
        self.patch_px, self.embed_dim, self.n_global_blocks = patch_px, dim, n_global_blocks
        self.patch_embed = nn.Conv2d(3, dim, patch_px, patch_px)
        self.pos_block = PEG(dim)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio, qkv_bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_weights = nn.Parameter(torch.zeros(heads))  # the heads' mix of relevance (softmax)
        self.apply(dino_init)  # the reference's (DINO's) init

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2] // self.patch_px, images.shape[-1] // self.patch_px
        if h < 1 or w < 1:
            raise BenchmarkError(
                f"image {tuple(images.shape[-2:])} is smaller than one {self.patch_px} px patch"
            )
        return self.pos_block(self.patch_embed(images).flatten(2).transpose(1, 2), h, w)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tokens(images)
        first_global = len(self.blocks) - self.n_global_blocks
        outputs = []
        for i, block in enumerate(self.blocks):
            if i == first_global:
                x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
            if i == len(self.blocks) - 1:
                attention = _attention(block, x)[:, :, 1:]  # [B, heads, N]
            x = block(x)
            if i >= first_global:
                outputs.append(self.norm(x)[:, 0])
        scores = torch.einsum("h,bhn->bn", self.head_weights.softmax(0), attention)
        return torch.cat(outputs, dim=-1), scores

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)


class Mixer(nn.Module):
    """The aggregation transformer: region embeddings [B, K, D] → [B, D] (a mean token prepended before the
    last block; its normalised output). Reference `TransformerEncoder` with `n_cls_patch` = 1."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = _blocks(dim, depth, heads, mlp_ratio, qkv_bias=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(dino_init)  # the reference's (DINO's) init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i == len(self.blocks) - 1:
                x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
            x = block(x)
        return self.norm(x)[:, 0]


class PaperLocalViT(nn.Module):
    """The paper's local encoder: a ViT of the scorer's architecture on a P_h region (patch P_l), GAP output.
    regions [B, 3, P_h, P_h] in [0, 1] → [B, D]. Trainable."""

    def __init__(self, config: ScoreNetModelConfig):
        super().__init__()
        c = config
        self.vit = ScorerViT(
            c.low_patch_px, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.n_global_blocks
        )
        del self.vit.head_weights  # only the scorer mixes attention heads
        self.embed_dim = c.embed_dim
        self.input_px = c.region_px

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_pooled(regions)


class LocalEncoder(nn.Module):
    """A registry model as ScoreNet's local encoder: regions [B, 3, P, P] in [0, 1] → embeddings [B, E].

    Regions are resized to the model's input size (bilinear, antialiased) when P differs, normalised with
    its mean/std, and pooled with `pooling` (default: the model's registered pooling; see
    `histodistill.models.encoders.encode`). `finetune`: "frozen" (default; weights fixed, eval mode, the
    gradient still flows through to the input regions and so to the scorer) or "lora" (peft adapters of
    `lora_rank` on each block's qkv/proj/fc1/fc2, as in the mitosis benchmark). Raises BenchmarkError for
    pooling "patch_tokens" or an unknown `finetune`.
    """

    def __init__(self, loaded, pooling: str | None = None, finetune: str = "frozen", lora_rank: int = 16):
        super().__init__()
        from histodistill.models.encoders import encode

        spec = loaded.spec
        self.pooling = pooling or spec.default_pooling
        if self.pooling == "patch_tokens":
            raise BenchmarkError("scorenet: the local encoder needs one vector per region: not patch_tokens")
        self.spec, self.finetune, self._encode = spec, finetune, encode
        self.embed_dim = spec.pooled_dim(self.pooling)
        self.input_px = spec.transform.size
        self.register_buffer("mean", torch.tensor(spec.transform.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.transform.std).view(1, 3, 1, 1), persistent=False)
        model = loaded.model
        for p in model.parameters():
            p.requires_grad_(False)
        if finetune == "lora":
            import copy

            import peft

            from histodistill.bench.mitosis.lora import lora_target_modules

            model = copy.deepcopy(model)
            config = peft.LoraConfig(
                r=lora_rank, lora_alpha=lora_rank, target_modules=lora_target_modules(model)
            )
            model = peft.get_peft_model(model, config).base_model.model
        elif finetune != "frozen":
            raise BenchmarkError(
                f"scorenet: local encoder finetune must be 'frozen' or 'lora'; got {finetune!r}"
            )
        self.model = model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.finetune == "frozen":
            self.model.eval()  # a frozen encoder keeps its inference behaviour (dropout, norms)
        return self

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        if regions.shape[-1] != self.input_px or regions.shape[-2] != self.input_px:
            regions = F.interpolate(regions, size=(self.input_px,) * 2, mode="bilinear", antialias=True)
        x = (regions - self.mean) / self.std
        return self._encode(self.model, x, self.spec.num_prefix_tokens, self.pooling)


@dataclass
class ScoreNetOutput:
    """One forward pass: logits [B, C]; scores [B, N] (relevance, sums to ≤ 1 per ROI); indices [B, K]
    (selected regions, increasing; row-major in the n_h × n_w grid); grid (n_h, n_w)."""

    logits: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor
    grid: tuple[int, int]


class ScoreNet(nn.Module):
    """ScoreNet (module docstring). `local` is a `LocalEncoder` or `PaperLocalViT` (None with scorer_only).

    forward(images [B, 3, H, W] in [0, 1], H and W ≥ region_px) → ScoreNetOutput. In training mode the
    selection is the straight-through perturbed top-K (the gradient reaches the scorer through it); in eval
    mode the hard top-K. `mask_fraction` (eval probe, the paper's Table 7) blanks `n_masked(K, fraction)` of
    the K selected regions, a seeded random choice per ROI: their embeddings enter the mixer as zero vectors
    (the mixer still sees K tokens, so any fraction up to 1 is defined; at 1 the fine branch carries no image
    content). The reference code has no such probe; zeroing rather than dropping is our choice, since
    dropping must keep at least one region (the earlier version kept ⌈…⌉ ≥ 1, which at the demo's K = 2
    blanked one region, at K = 1 none).

    `thumbnails` (the output of `thumbnail`, precomputed) replaces the scorer's downscaling of `images`.
    `region_embeddings` [B, N, E] (`embed_regions`: a frozen local encoder's output on all N regions) replaces
    the local encoder: the selection matrix picks rows of it instead of pixel regions. The forward pass is
    the same (the hard selection is one-hot, so Y·f(regions) = f(Y·regions)); the backward pass differs, by
    design: ∂L/∂Y_kn = ⟨∂L/∂e_k, f(region_n)⟩, the derivative of the function of Y that equals the loss at
    every vertex of the top-K polytope, so the perturbed Jacobian smooths the true objective E[L(Y(x+σZ))];
    the pixel-space version (the reference's einsum over patches) uses the encoder's linearisation
    J_f(region_k)·region_n instead, equal only for a linear encoder. It also makes training cost the local
    encoder once per region, not a forward and backward pass per step.
    """

    def __init__(self, config: ScoreNetModelConfig, local: nn.Module | None, n_classes: int):
        super().__init__()
        c = self.config = config
        self.scorer = ScorerViT(
            c.low_patch_px, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.n_global_blocks
        )
        width = c.embed_dim * c.n_global_blocks
        if c.scorer_only:
            self.local = self.project = self.mixer = self.standardize = None
        else:
            if local is None:
                raise BenchmarkError("scorenet: give a local encoder (or set scorer_only)")
            self.local = local
            project = (
                nn.Identity() if local.embed_dim == c.embed_dim else nn.Linear(local.embed_dim, c.embed_dim)
            )
            if c.embed_norm and not isinstance(local, PaperLocalViT):
                project = nn.Sequential(Standardize(local.embed_dim), project)
            self.project = project
            self.standardize = project[0] if isinstance(project, nn.Sequential) else None
            self.mixer = Mixer(c.embed_dim, c.mixer_depth, c.num_heads, c.mixer_mlp_ratio)
            width += c.embed_dim
        self.head = nn.Linear(width, n_classes)

    def thumbnail(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ROI [B, 3, H, W] → (thumbnail [B, 3, n_h·P_l, n_w·P_l], (n_h, n_w)); BenchmarkError if smaller than
        one region."""
        p, q = self.config.region_px, self.config.low_patch_px
        n_h, n_w = images.shape[-2] // p, images.shape[-1] // p
        if n_h < 1 or n_w < 1:
            raise BenchmarkError(f"ROI {tuple(images.shape[-2:])} px is smaller than one {p} px region")
        roi = images[..., : n_h * p, : n_w * p]
        return F.interpolate(roi, size=(n_h * q, n_w * q), mode="bicubic", antialias=True).clamp(0, 1), (
            n_h,
            n_w,
        )

    def regions(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """ROI [B, 3, H, W] → all regions [B, N, 3, P_h, P_h], row-major."""
        p, (n_h, n_w) = self.config.region_px, grid
        b = images.shape[0]
        x = images[..., : n_h * p, : n_w * p].reshape(b, 3, n_h, p, n_w, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, n_h * n_w, 3, p, p)

    @torch.no_grad()
    def embed_regions(self, images: torch.Tensor) -> torch.Tensor:
        """The local encoder on every region of the ROIs: [B, 3, H, W] → [B, N, E] (no gradient). With a
        frozen encoder these are constants, so training can reuse them (`forward(..., region_embeddings=…)`)."""
        _, grid = self.thumbnail(images)
        regions = self.regions(images, grid)
        return self.local(regions.flatten(0, 1)).reshape(images.shape[0], grid[0] * grid[1], -1)

    def forward(
        self,
        images: torch.Tensor,
        mask_fraction: float = 0.0,
        generator=None,
        region_embeddings: torch.Tensor | None = None,
        thumbnails: torch.Tensor | None = None,
    ) -> ScoreNetOutput:
        if thumbnails is None:
            thumbs, grid = self.thumbnail(images)
        else:  # precomputed (`thumbnail`), [B, 3, n_h·P_l, n_w·P_l]; images is then only read when no embeddings
            q = self.config.low_patch_px
            thumbs, grid = thumbnails, (thumbnails.shape[-2] // q, thumbnails.shape[-1] // q)
        global_token, scores = self.scorer(thumbs)
        n = scores.shape[-1]
        k = self.config.k_for(n)
        indices = torch.topk(scores.detach(), k, dim=-1, sorted=False).indices.sort(dim=-1).values
        if self.config.scorer_only:
            return ScoreNetOutput(self.head(global_token), scores, indices, grid)
        b, c = thumbs.shape[0], self.config
        training = self.training and torch.is_grad_enabled()
        if region_embeddings is not None:  # the frozen encoder's embeddings of all N regions, [B, N, E]
            if training:
                selection = straight_through_topk(scores, k, c.num_samples, c.sigma, generator)  # [B, K, N]
                chosen = torch.einsum("bkn,bne->bke", selection, region_embeddings)
            else:
                chosen = region_embeddings.gather(
                    1, indices[..., None].expand(-1, -1, region_embeddings.shape[-1])
                )
            embeddings = self.project(chosen.flatten(0, 1)).reshape(b, k, -1)
        else:
            if training:
                selection = straight_through_topk(scores, k, c.num_samples, c.sigma, generator)  # [B, K, N]
                regions = torch.einsum("bkn,bnchw->bkchw", selection, self.regions(images, grid))
            else:
                regions = self._gather(images, indices, grid)
            embeddings = self.project(self.local(regions.flatten(0, 1))).reshape(b, k, -1)
        if mask_fraction > 0:
            masked = n_masked(k, mask_fraction)
            order = torch.rand(b, k, generator=generator).argsort(dim=-1)[:, :masked]
            keep = torch.ones(b, k, dtype=embeddings.dtype).scatter_(1, order, 0.0)
            embeddings = embeddings * keep[..., None].to(embeddings.device)
        fine = self.mixer(embeddings)
        return ScoreNetOutput(self.head(torch.cat([global_token, fine], dim=-1)), scores, indices, grid)

    def _gather(self, images: torch.Tensor, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Only the selected regions [B, K, 3, P_h, P_h], copied out of a strided view of the ROI by one
        indexing op (no pass over the other regions, no host sync, no per-region Python loop)."""
        p, (n_h, n_w) = self.config.region_px, grid
        b = images.shape[0]
        view = images[..., : n_h * p, : n_w * p].unflatten(-1, (n_w, p)).unflatten(-3, (n_h, p))
        rows = torch.arange(b, device=indices.device)[:, None]
        return view.permute(0, 2, 4, 1, 3, 5)[rows, indices // n_w, indices % n_w]
