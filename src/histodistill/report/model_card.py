"""Model size for the report: parameter count and the FLOPs of one forward pass, from the registry's model.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as 2 FLOPs
(matmul m×k·k×n = 2·m·n·k) and counts only matmuls, convolutions and attention: norms, activations and
softmax are left out, as in the usual GFLOPs figures of ViT papers. torch has no formula for the CPU kernel
of `scaled_dot_product_attention`, so without the mapping below the attention matmuls of a fused-attention
model run on CPU would silently count as zero; we add it (same formula as torch's GPU kernels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from histodistill.models.registry import load_model

IMG_SIZE = 224
FLOP_CONVENTION = "multiply-add = 2 FLOPs; matmul, conv and attention only (torch FlopCounterMode)"


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_flops} if op is not None else {}


def count_flops(model: torch.nn.Module, img_size: int = IMG_SIZE) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass of a [1, 3, img_size, img_size] input, in total and by aten op."""
    x = torch.zeros(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with torch.no_grad(), counter:
        model(x)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_profile(name: str, weights: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Parameters (millions) and GFLOPs at 224 px of a registered model, for the report's `models` argument.

    Without `weights` the architecture is built with seeded random init (size and FLOPs do not depend on the
    weights), so no hub download is needed. Throughput is measured elsewhere and passed through.
    """
    loaded = load_model(name, weights=weights, seed=seed, random_init=weights is None)
    model = loaded.model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    flops, by_op = count_flops(model, IMG_SIZE)
    return {
        "model": name,
        "arch": loaded.spec.arch,
        "params": int(n_params),
        "params_m": n_params / 1e6,
        "flops": flops,
        "gflops": flops / 1e9,
        "img_size": IMG_SIZE,
        "flop_convention": FLOP_CONVENTION,
        "flops_by_op": by_op,
        "weights": loaded.weights,
        "weights_digest": loaded.weights_digest,
    }
