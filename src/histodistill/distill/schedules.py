"""Per-iteration schedules, precomputed as arrays (indexing is all the training loop does)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """θ_ema ← m·θ_ema + (1 − m)·θ for every parameter (same structure, same order): the momentum teacher of
    DINO / DINOv2 (`SSLMetaArch.update_teacher`). Buffers are not touched."""
    for e, s in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(s.detach(), 1 - momentum)


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base` over `warmup_iters`, then cosine from `base` to `final`."""
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    steps = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    out = np.concatenate([warmup, cosine])
    assert len(out) == total_iters
    return out


def warmup_then_constant(start: float, end: float, warmup_iters: int, total_iters: int) -> np.ndarray:
    """Linear from `start` to `end` over `warmup_iters`, then `end` (the teacher temperature)."""
    warm = min(warmup_iters, total_iters)
    return np.concatenate(
        [
            np.linspace(start, end, warm, endpoint=False) if warm else np.zeros(0),
            np.full(total_iters - warm, end),
        ]
    )


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_temp: np.ndarray
    ema_momentum: np.ndarray

    @classmethod
    def build(
        cls,
        total_iters: int,
        iters_per_epoch: int,
        lr: float,
        min_lr: float,
        warmup_epochs: float,
        weight_decay: float,
        weight_decay_end: float,
        teacher_temp: float,
        warmup_teacher_temp: float,
        warmup_teacher_temp_epochs: float,
        ema_momentum: float,
        ema_momentum_end: float = 1.0,
    ) -> Schedules:
        """The paper's recipe: LR warm-up then cosine; wd cosine up; teacher temperature warm-up; EMA cosine."""

        def epochs(e: float) -> int:
            return min(total_iters, round(e * iters_per_epoch))

        return cls(
            lr=cosine_schedule(lr, min_lr, total_iters, epochs(warmup_epochs)),
            weight_decay=cosine_schedule(weight_decay, weight_decay_end, total_iters),
            teacher_temp=warmup_then_constant(
                warmup_teacher_temp, teacher_temp, epochs(warmup_teacher_temp_epochs), total_iters
            ),
            ema_momentum=cosine_schedule(ema_momentum, ema_momentum_end, total_iters),
        )

    def apply(self, optimizer: torch.optim.Optimizer, it: int) -> None:
        """Set iteration `it`'s learning rate on every group of `optimizer` and its weight decay on the
        groups flagged `apply_wd` (engine.param_groups; 0 on the others)."""
        for group in optimizer.param_groups:
            group["lr"] = float(self.lr[it])
            group["weight_decay"] = float(self.weight_decay[it]) if group.get("apply_wd") else 0.0
