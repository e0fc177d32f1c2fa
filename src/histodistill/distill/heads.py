"""DINO / iBOT projection head: MLP → L2-normalised bottleneck → weight-normalised linear to K prototypes."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def dino_init(module: nn.Module) -> None:
    """DINO's init (facebookresearch/dino `_init_weights`), for `nn.Module.apply`: Linear weights
    trunc-normal(std 0.02), biases zero; weight-normed (parametrized) Linears and every other module keep
    their own init (a fresh LayerNorm is already ones and zeros). Used by the DINO heads, the SLPD region
    encoder and ScoreNet's ViTs."""
    if isinstance(module, nn.Linear) and not hasattr(module, "parametrizations"):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ProjectionHead(nn.Module):
    """`n_layers`-layer MLP (GELU, `hidden_dim`) to a `bottleneck_dim` code that is L2-normalised, then a
    weight-normalised linear layer (norm fixed at 1) to `n_prototypes` logits. Separate instances serve
    DINO (CLS, bottleneck 384) and iBOT (patch tokens, bottleneck 256)."""

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        self.prototypes.parametrizations.weight.original0.data.fill_(1.0)  # the norm g: fixed at 1
        self.prototypes.parametrizations.weight.original0.requires_grad = False
        self.apply(dino_init)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised code (what a fixed-head teacher cache may store instead of logits)."""
        return nn.functional.normalize(self.mlp(x), dim=-1, p=2)

    def logits(self, code: torch.Tensor) -> torch.Tensor:
        return self.prototypes(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.bottleneck(x))
