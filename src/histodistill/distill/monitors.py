"""Collapse monitors of self-distillation, and the guard that stops a collapsing run.

Three figures per head (DINO on CLS, iBOT on patch tokens), logged every iteration by both training loops
(the distillation trainer and the teacher-heads stage):

- `<head>_entropy`: mean entropy H(t) = −Σ_k t_k log t_k of the teacher's target distributions (nats;
  0 = one-hot targets, log K = uniform targets: the "uniform" collapse of DINO, Caron et al. 2021 §5.3);
- `<head>_eff_prototypes`: the effective number of prototypes in use, exp(H(t̄)) with t̄ the mean target over
  the global batch (1 when every sample goes to the same prototype: the "dominant dimension" collapse; at
  most K, and at most about the number of rows when targets are one-hot);
- `<head>_kl`: KL(teacher ‖ student) = CE(t, s) − H(t), mean over the rows (and, for DINO, over the same
  (teacher view, student view) pairs as the loss), in nats. It is computed from the loss value and the target
  entropy, so it costs no extra pass through the heads.

`CollapseGuard` counts, per figure, the consecutive iterations past a limit and raises `CollapseError`
(naming the run, the figure, its value and the iterations) after `patience` of them. Two limits, one per
collapse mode of DINO §5.3:

- "dominant" collapse (every sample goes to the same few prototypes): `<head>_eff_prototypes` below
  `floor` (`distill.collapse_floor`);
- "flat" (uniform) collapse (every target close to uniform, so it carries no information although the
  batch-mean target uses every prototype and the effective count stays near K): the mean target entropy
  `<head>_entropy` above `ceiling` × log K (`distill.collapse_entropy_ceiling`, default 0.95: a target
  whose entropy is 0.95 log K is spread as evenly as a uniform distribution over K^0.95 of the K
  prototypes, 194 of 256, and is only (1 − 0.95) log K = 0.28 nats (K = 256) from uniform). The
  effective-prototype floor cannot see this mode: flat targets average to a flat mean.

Sources: the two collapse modes and their entropy signatures are DINO's (Caron et al. 2021, "Emerging
properties in self-supervised vision transformers", §5.3 and Fig. 7); exp(entropy) as an effective count is
the perplexity of the mean assignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from histodistill.atomic import atomic_path
from histodistill.distill.centering import _all_reduce_sum
from histodistill.errors import HistodistillError


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row entropy −Σ_k p_k log p_k (nats) of probabilities [..., K] → [...] (0·log 0 = 0), float32."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def effective_prototypes(mean_probs: torch.Tensor) -> torch.Tensor:
    """exp(H(t̄)) of a mean target distribution t̄ [K] (sums to 1): a scalar in [1, K]."""
    return torch.exp(entropy(mean_probs / mean_probs.sum()))


@dataclass(frozen=True)
class TargetStats:
    """Sums over the rows of one process's targets (`n` rows of K prototypes): entropy_sum (scalar) and
    probs_sum [K], float32; `figures` turns them into the logged numbers."""

    n: torch.Tensor
    entropy_sum: torch.Tensor
    probs_sum: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of_probs(cls, probs: torch.Tensor) -> TargetStats:
        """From target probabilities [..., K] (any leading shape; rows are everything but the last dim)."""
        flat = probs.detach().float().reshape(-1, probs.shape[-1])
        return cls(torch.tensor(float(flat.shape[0]), device=flat.device), entropy(flat).sum(), flat.sum(0))

    @classmethod
    @torch.no_grad()
    def of_logits(
        cls, logits: torch.Tensor, center: torch.Tensor, temperature: float, chunk: int = 4096
    ) -> TargetStats:
        """From teacher logits [N, K] whose targets are softmax((u − c) / τ) (`center` [1, K] or [K]),
        `chunk` rows at a time, so no [N, K] probability tensor is ever held (patch tokens at 131,072
        prototypes): `losses.softmax_targets_`'s pass, on a copy of the logits (theirs are left as they are)."""
        from histodistill.distill.losses import softmax_targets_  # losses imports this module

        logits = logits.detach().reshape(-1, logits.shape[-1]).float().clone()
        _, ent, probs_sum = softmax_targets_(logits, center, temperature, chunk)
        return cls(torch.tensor(float(logits.shape[0]), device=logits.device), ent, probs_sum)

    def figures(self, prefix: str, cross_entropy: torch.Tensor) -> dict[str, torch.Tensor]:
        """{prefix_entropy, prefix_eff_prototypes, prefix_kl} as scalar tensors. `cross_entropy`: the mean
        CE(t, s) over the same rows (the loss term, this process's), so KL = CE − mean H(t).

        Entropy and KL are this process's means (the trainer averages them over equal-sized processes, like
        the losses); the effective count is of the global batch's mean target (`probs_sum` all-reduced under
        DDP), the same on every process. Call it on every process in the same order (it all-reduces).
        """
        mean_entropy = self.entropy_sum / self.n
        return {
            f"{prefix}_entropy": mean_entropy,
            f"{prefix}_eff_prototypes": effective_prototypes(_all_reduce_sum(self.probs_sum.clone())),
            f"{prefix}_kl": cross_entropy.detach().float() - mean_entropy,
        }


class CollapseError(HistodistillError):
    """A run's effective number of prototypes stayed below the collapse floor for `patience` iterations."""


@dataclass
class CollapseGuard:
    """Stops a run whose `*_eff_prototypes` figures stay below `floor`, or whose `*_entropy` figures (mean
    target entropy, nats) stay above `ceiling` × log(`n_prototypes`), for `patience` consecutive iterations.

    `run`: the name put in the error (e.g. "distill run 'demo'"). `update(iteration, row)` reads every key of
    `row` ending in `_eff_prototypes` and, when `n_prototypes` is given, in `_entropy` (not `loss_*`);
    `state_dict()` / `load_state_dict()` carry the counters through a checkpoint, so a resumed run stops at
    the same iteration as an uninterrupted one. A floor ≤ 1 never trips (exp(H) ≥ 1), nor does a ceiling
    ≥ 1 (H ≤ log K).
    """

    run: str
    floor: float
    patience: int
    below: dict[str, int] = field(default_factory=dict)
    n_prototypes: int | None = None
    ceiling: float = 1.0

    def update(self, iteration: int, row: dict[str, float]) -> None:
        """Count this iteration; CollapseError when a figure has been past its limit `patience` times in a row."""
        first = iteration - self.patience + 1
        for key, value in row.items():
            if key.startswith("loss_"):
                continue
            if key.endswith("_eff_prototypes"):
                self.below[key] = self.below.get(key, 0) + 1 if value < self.floor else 0
                if self.below[key] >= self.patience:
                    raise CollapseError(
                        f"{self.run} collapsed: {key} = {value:.2f} stayed below the collapse floor "
                        f"{self.floor:g} for {self.patience} iterations ({first}–{iteration}); see "
                        "train_log.parquet (distill.collapse_floor / collapse_patience set the floor)"
                    )
            elif key.endswith("_entropy") and self.n_prototypes:
                limit = self.ceiling * math.log(self.n_prototypes)
                self.below[key] = self.below.get(key, 0) + 1 if value > limit else 0
                if self.below[key] >= self.patience:
                    raise CollapseError(
                        f"{self.run} collapsed to flat targets: {key} = {value:.3f} nats stayed above "
                        f"{self.ceiling:g} × log K = {limit:.3f} (K = {self.n_prototypes}, uniform targets: "
                        f"{math.log(self.n_prototypes):.3f}) for {self.patience} iterations "
                        f"({first}–{iteration}); see train_log.parquet (distill.collapse_entropy_ceiling / "
                        "collapse_patience set the limit; sharpen the targets: a lower teacher temperature, "
                        "centering, or more head training)"
                    )

    def state_dict(self) -> dict[str, int]:
        return dict(self.below)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.below = {k: int(v) for k, v in state.items()}


def plot_train_log(
    frame: pd.DataFrame,
    out: Path,
    title: str,
    floor: float | None = None,
    n_prototypes: int | None = None,
    ceiling: float | None = None,
) -> None:
    """loss.png of a training loop: losses, schedules, and the collapse monitors (target entropy with log K
    and the flat-collapse limit `ceiling` × log K, effective prototypes with the floor, KL(teacher ‖
    student)), one labelled panel each; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    it = frame["iteration"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ax = axes[0, 0]
    for c in [c for c in frame.columns if c.startswith("loss_")]:
        ax.plot(it, frame[c], label=c.removeprefix("loss_"))
    ax.set(xlabel="iteration", ylabel="loss (nats)", title="losses")
    fig.suptitle(title)
    ax.legend()
    ax = axes[0, 1]
    ax.plot(it, frame["lr"], label="learning rate (left axis)")
    ax.set(xlabel="iteration", ylabel="learning rate")
    ax.set_title("schedules", pad=24)
    twin = ax.twinx()
    twin.plot(it, frame["teacher_temp"], color="tab:red", label="teacher temperature (right axis)")
    twin.set_ylabel("teacher temperature")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # one legend for both axes, above the panel: a legend inside would cover one of the curves
    ax.legend(
        handles,
        [h.get_label() for h in handles],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=2,
        fontsize=7,
        frameon=False,
    )
    ax = axes[0, 2]
    weights = [c for c in frame.columns if c.startswith("weight_") and c.endswith("_eff")]
    for c, style in zip(weights, ["-", "--", ":", "-."] * len(weights), strict=False):
        ax.plot(it, frame[c], ls=style, lw=2, label=c.removeprefix("weight_").removesuffix("_eff"))
    ax.set(xlabel="iteration", ylabel="weight", title="effective loss weights")
    if weights:
        ax.legend()
    panels = [
        (axes[1, 0], "_entropy", "entropy (nats)", "teacher target entropy (mean)"),
        (axes[1, 1], "_eff_prototypes", "prototypes", "effective prototypes exp(H(mean target))"),
        (axes[1, 2], "_kl", "KL (nats)", "KL(teacher ‖ student)"),
    ]
    for ax, suffix, ylabel, name in panels:
        for c in [c for c in frame.columns if c.endswith(suffix) and not c.startswith("loss_")]:
            ax.plot(it, frame[c], label=c.removesuffix(suffix))
        if suffix == "_entropy" and n_prototypes:
            ax.axhline(np.log(n_prototypes), color="grey", ls="--", label="log K (uniform)")
            if ceiling is not None and ceiling < 1:
                limit = ceiling * np.log(n_prototypes)
                ax.axhline(limit, color="tab:red", ls="--", label=f"flat-collapse limit {ceiling:g} log K")
        if suffix == "_eff_prototypes":
            if floor is not None:
                ax.axhline(floor, color="tab:red", ls="--", label=f"collapse floor {floor:g}")
            if n_prototypes:
                ax.axhline(n_prototypes, color="grey", ls=":", label=f"K = {n_prototypes}")
            ax.set_yscale("log")
        ax.set(xlabel="iteration", ylabel=ylabel, title=name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
