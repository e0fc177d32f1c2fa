"""The region encoder: a ViT over a region's G × G grid of tile embeddings (HIPT's ViT4096-256, `vit4k_xs`).

Source: Chen et al., "Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised
Learning" (CVPR 2022), mahmoodlab/HIPT `HIPT_4K/vision_transformer4k.py` (also SLPD's
`Hierarchical-Pretraining/vision_transformer4k.py`): `phi` = Linear(D_in, 192) → GELU → Dropout, a CLS token,
learned position embeddings interpolated bicubically to the crop's grid, 6 pre-norm blocks of width 192 with
6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, stochastic depth; the region embedding is the final-norm
CLS token [B, 192].

Deliberate deviations, named:
- Missing tiles (background) are masked out as attention *keys* in every block, so they never influence any
  other token nor the CLS output (HIPT feeds every position; its regions are all tissue-filled 4K crops).
- The base position grid is the region's G × G (HIPT's is 14 × 14, its global crop size).
- Attention is torch's `scaled_dot_product_attention` (same maths as HIPT's explicit softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from histodistill.distill.heads import dino_init


class MaskedAttention(nn.Module):
    """Multi-head self-attention where keys with `valid` False get no weight. x [B, N, C], valid [B, N]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskedAttention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), valid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RegionViT(nn.Module):
    """ViT4096-256 over token grids: forward(tokens [B, g, g', D_in], mask [B, g, g'] bool, True = present)
    → CLS embeddings [B, embed_dim]. Any crop size works (position embeddings are interpolated)."""

    def __init__(
        self,
        in_dim: int,
        grid: int = 16,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        drop: float = 0.0,
    ):
        super().__init__()
        self.grid, self.embed_dim = grid, embed_dim
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(drop))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(dino_init)  # fresh LayerNorms are already ones and zeros

    def _pos(self, h: int, w: int) -> torch.Tensor:
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = tokens.shape
        x = self.phi(tokens.reshape(b, h * w, -1))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self._pos(h, w)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=mask.device), mask.reshape(b, h * w)], 1)
        for blk in self.blocks:
            x = blk(x, valid)
        return self.norm(x)[:, 0]


def multi_crop(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    global_crop: int,
    local_crop: int,
    n_local: int,
    generator: torch.Generator,
    n_global: int = 2,
    draw: tuple[int, int] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Region-level multi-crop (HIPT / SLPD `DataAugmentationDINO4K`): `n_global` random `global_crop`² and
    `n_local` random `local_crop`² crops of the token grid, each flipped horizontally with probability 1/2,
    drawn independently per region. tokens [B, G, G, D], mask [B, G, G] → a list of (tokens [B, c, c, D],
    mask [B, c, c]), the globals first.

    `draw` = (N, offset): the crops are drawn for N regions and these B are regions offset … offset + B − 1
    of them (DDP: every rank draws the global batch's crops from the same generator and keeps its share, so
    a region's crops do not depend on the number of processes)."""
    b, g = tokens.shape[:2]
    n, offset = draw or (b, 0)
    if offset < 0 or offset + b > n:
        raise ValueError(f"draw {draw} does not hold {b} regions")
    rows_b = torch.arange(b)[:, None, None]
    crops = []
    for size in [global_crop] * n_global + [local_crop] * n_local:
        size = min(size, g)
        r0 = torch.randint(0, g - size + 1, (n,), generator=generator)[offset : offset + b]
        c0 = torch.randint(0, g - size + 1, (n,), generator=generator)[offset : offset + b]
        flip = (torch.rand(n, generator=generator) < 0.5)[offset : offset + b]
        steps = torch.arange(size)
        cols = torch.where(flip[:, None], size - 1 - steps, steps) + c0[:, None]  # [B, c]
        rows = r0[:, None] + steps  # [B, c]
        idx = (rows_b, rows[:, :, None], cols[:, None, :])
        crops.append((tokens[idx], mask[idx]))
    return crops


def crop_sizes(grid: int) -> tuple[int, int]:
    """HIPT's crop sizes (14 and 6 of 16 tokens) scaled to a G × G grid: (global, local), at least 1."""
    return max(1, math.floor(grid * 14 / 16 + 0.5)), max(1, math.floor(grid * 6 / 16 + 0.5))
