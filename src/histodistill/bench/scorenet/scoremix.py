"""ScoreMix and its ablation baselines (CutMix, none): label-mixing augmentations of ROI batches.

Source: Stegmüller et al., ScoreNet (WACV 2023), §3.4 "ScoreMix", checked against the authors' code
(stegmuel/ScoreNet, `source/utils/utils.py::scoremix_bbox`, `scorenet_trainer_fast.py::score_mix_data`).

ScoreMix pastes a box of regions of a *source* ROI, drawn where the scorer finds it relevant, over a box of a
*target* ROI drawn where the scorer finds the target irrelevant; the label is mixed by the pasted proportion.
On the region grid (n_h × n_w = N regions of `region_px`) of a batch of same-size ROIs:

1. λ ~ Beta(α, α); the box holds ⌈λ·N⌉ regions: height b_h uniform in [1, ⌈√⌈λN⌉⌉) (1 when ⌈λN⌉ = 1),
   b_w = ⌈⌈λN⌉ / b_h⌉, each capped by the grid;
2. every b_h × b_w box position gets the sum of the relevance inside it, S(p);
3. the source box position is drawn with probability ∝ S_src(p) − min S_src, the target's ∝ max S_tgt −
   S_tgt(p) (uniform where all are equal) — or, with `sampling="greedy"`, the arg max and arg min;
4. the target keeps weight λ' = 1 − b_h·b_w / N of its label, the source gets 1 − λ', exactly the pasted
   fraction of the (grid-cropped) ROI.

Deliberate deviations from the reference code: the source box is drawn from the *source's* relevance (the
reference draws it from the target's map, indexing the source image with the target's position: a bug
against the paper's text); the reference mixes the thumbnail separately, here the model recomputes the
thumbnail from the mixed ROI (the same pixels, downscaled); `sampling="greedy"` is an addition for tests and
for ablation.

CutMix (Yun et al. 2019, the reference trainer's `cutmix_data`): λ ~ Beta(α, α), a box of side
√(1 − λ)·(H, W) at a uniform centre, clipped, pasted from a permuted batch; λ' = 1 − box area / (H·W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

MIXES = ("scoremix", "cutmix", "none")


@dataclass
class Mixed:
    """A mixed batch: images [B, 3, H, W]; targets [B, C] (soft labels, rows sum to 1); source_weight [B]
    (the pasted fraction, = the source label's weight); permutation [B] (image b got its paste from
    permutation[b]); region_source [B, N] (long; for region-aligned mixes, ScoreMix and none: region n of
    mixed image b is region region_source[b, n] of the input batch's B·N regions, flattened row-major
    image by image; None for CutMix, whose box cuts through regions)."""

    images: torch.Tensor
    targets: torch.Tensor
    source_weight: torch.Tensor
    permutation: torch.Tensor
    region_source: torch.Tensor | None = None


def _box_size(lam: float, n_h: int, n_w: int, rng: np.random.Generator) -> tuple[int, int]:
    n = max(1, math.ceil(lam * n_h * n_w))
    if n == 1:
        return 1, 1
    high = math.ceil(math.sqrt(n))
    b_h = min(int(rng.integers(1, high)) if high > 1 else 1, n_h)
    return b_h, min(math.ceil(n / b_h), n_w)


def _draw(weights: torch.Tensor, greedy: bool, rng: np.random.Generator) -> int:
    """One position ∝ `weights` (≥ 0; uniform if all 0), or the arg max with `greedy`."""
    w = weights.double().cpu().numpy()
    if greedy:
        return int(np.argmax(w))
    total = w.sum()
    return int(rng.choice(len(w), p=w / total if total > 0 else None))


def scoremix(
    images: torch.Tensor,
    labels: torch.Tensor,
    relevance: torch.Tensor,
    n_classes: int,
    rng: np.random.Generator,
    region_px: int,
    alpha: float = 1.0,
    lam: float | None = None,
    sampling: str = "categorical",
    permutation: torch.Tensor | None = None,
) -> Mixed:
    """ScoreMix a batch (module docstring). images [B, 3, H, W] (H, W ≥ the grid × `region_px`); labels [B]
    (int); relevance [B, n_h, n_w] (≥ 0, e.g. the scorer's scores on the region grid); `lam` fixes λ (else
    Beta(α, α) from `rng`); `permutation` fixes the sources (else a random one). Raises ValueError for an
    unknown `sampling` or a relevance grid the images do not cover.
    """
    if sampling not in ("categorical", "greedy"):
        raise ValueError(f"scoremix sampling must be 'categorical' or 'greedy'; got {sampling!r}")
    b, (n_h, n_w) = images.shape[0], relevance.shape[-2:]
    if images.shape[-2] < n_h * region_px or images.shape[-1] < n_w * region_px:
        raise ValueError(
            f"images {tuple(images.shape[-2:])} do not cover a {n_h}×{n_w} grid of {region_px} px"
        )
    lam = float(rng.beta(alpha, alpha)) if lam is None else lam
    perm = torch.as_tensor(rng.permutation(b)) if permutation is None else permutation
    b_h, b_w = _box_size(lam, n_h, n_w, rng)
    sums = F.avg_pool2d(relevance[:, None].double(), (b_h, b_w), stride=1)[:, 0] * (
        b_h * b_w
    )  # [B, s_h, s_w]
    s_w = sums.shape[-1]
    flat = sums.flatten(1)
    out = images.clone()
    n = n_h * n_w
    source = torch.arange(b * n).reshape(b, n_h, n_w)
    greedy = sampling == "greedy"
    for i in range(b):
        src = flat[int(perm[i])]
        tgt = flat[i]
        ps = _draw(src - src.min(), greedy, rng)
        pt = _draw(tgt.max() - tgt, greedy, rng)
        (ys, xs), (yt, xt) = divmod(ps, s_w), divmod(pt, s_w)
        h, w = b_h * region_px, b_w * region_px
        out[i, :, yt * region_px : yt * region_px + h, xt * region_px : xt * region_px + w] = images[
            int(perm[i]), :, ys * region_px : ys * region_px + h, xs * region_px : xs * region_px + w
        ]
        source[i, yt : yt + b_h, xt : xt + b_w] = int(perm[i]) * n + (
            torch.arange(ys, ys + b_h)[:, None] * n_w + torch.arange(xs, xs + b_w)
        )
    weight = torch.full((b,), b_h * b_w / (n_h * n_w), dtype=torch.float32)
    return Mixed(out, _mix_labels(labels, perm, weight, n_classes), weight, perm, source.reshape(b, n))


def cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    rng: np.random.Generator,
    alpha: float = 1.0,
    lam: float | None = None,
) -> Mixed:
    """CutMix a batch (module docstring): images [B, 3, H, W], labels [B] → Mixed."""
    b, hgt, wid = images.shape[0], images.shape[-2], images.shape[-1]
    lam = float(rng.beta(alpha, alpha)) if lam is None else lam
    perm = torch.as_tensor(rng.permutation(b))
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(hgt * cut), int(wid * cut)
    cy, cx = int(rng.integers(hgt)), int(rng.integers(wid))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, hgt)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, wid)
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    weight = torch.full((b,), float((y1 - y0) * (x1 - x0)) / (hgt * wid))
    return Mixed(out, _mix_labels(labels, perm, weight, n_classes), weight, perm)


def no_mix(images: torch.Tensor, labels: torch.Tensor, n_classes: int, n_regions: int = 1) -> Mixed:
    """The no-mixing baseline: one-hot targets, nothing pasted (region_source the identity over
    `n_regions` regions per image)."""
    b = images.shape[0]
    perm = torch.arange(b)
    source = torch.arange(b * n_regions).reshape(b, n_regions)
    return Mixed(images, _mix_labels(labels, perm, torch.zeros(b), n_classes), torch.zeros(b), perm, source)


def _mix_labels(
    labels: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor, n_classes: int
) -> torch.Tensor:
    one_hot = F.one_hot(labels.long(), n_classes).float()
    return (1 - weight)[:, None] * one_hot + weight[:, None] * one_hot[perm]
