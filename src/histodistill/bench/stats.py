"""Summary statistics and cluster-bootstrap confidence intervals for benchmark scores.

Pairwise scores (one value per slide pair) are not independent: every slide takes part in many pairs. So
the confidence intervals resample *slides* (the clusters), not pairs: a bootstrap replicate draws S slides
with replacement and keeps a pair (a, b) when both a and b are drawn, with weight count(a) · count(b), i.e.
the pairs one would form among the resampled slides (a copy of a slide is never paired with itself). This
is the usual bootstrap for dyadic data; resampling pairs would understate the uncertainty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

STATS = ("mean", "std", "median", "iqr")
Statistic = Callable[..., np.ndarray]
STATISTICS: dict[str, Statistic] = {"mean": np.mean, "median": np.median}


def summarize(values: np.ndarray | Sequence[float]) -> dict[str, float]:
    """Mean, std (ddof 0, as numpy and the published PLISM tables), median and IQR (q75 − q25, linear)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return dict.fromkeys(STATS, float("nan"))
    q25, q50, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    return {"mean": float(x.mean()), "std": float(x.std()), "median": float(q50), "iqr": float(q75 - q25)}


def group_summary(frame: pd.DataFrame, by: Sequence[str], value: str = "value") -> pd.DataFrame:
    """`summarize` of `value` within each group of `by`: one row per group, columns by + n + STATS."""
    rows = [
        {**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), "n": len(g), **summarize(g)}
        for key, g in frame.groupby(list(by), sort=True, observed=True)[value]
    ]
    return pd.DataFrame(rows, columns=[*by, "n", *STATS])


def slide_resamples(n_slides: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each slide is drawn in each replicate: int [n_boot, n_slides], rows sum to n_slides."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_slides, np.full(n_slides, 1.0 / n_slides), size=n_boot)


def pair_weights(counts: np.ndarray, slide_a: np.ndarray, slide_b: np.ndarray) -> np.ndarray:
    """Weight of each pair in each replicate: count(a) · count(b), int [n_boot, n_pairs]."""
    return counts[:, np.asarray(slide_a)] * counts[:, np.asarray(slide_b)]


def bootstrap_statistic(values: np.ndarray, weights: np.ndarray, statistic: str | Statistic) -> np.ndarray:
    """`statistic` of `values` [P] or [P, M] in each replicate, the pairs repeated by their integer weights.

    Returns [n_boot] or [n_boot, M]; NaN for a replicate that keeps no pair. Repeating rows (rather than a
    weighted formula) gives exactly numpy's median/quantile definition on the resampled set.
    """
    stat = STATISTICS[statistic] if isinstance(statistic, str) else statistic
    values = np.asarray(values, dtype=np.float64)
    out = np.full((len(weights), *values.shape[1:]), np.nan)
    for i, w in enumerate(weights):
        if w.sum() > 0:
            out[i] = stat(np.repeat(values, w, axis=0), axis=0)
    return out


def percentile_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of bootstrap replicates, ignoring NaN (empty) replicates."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(samples, [alpha, 1.0 - alpha], axis=0)
    return low, high


def cluster_bootstrap_ci(
    values: np.ndarray,
    slide_a: np.ndarray,
    slide_b: np.ndarray,
    n_slides: int,
    statistic: str | Statistic = "median",
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Percentile CI of `statistic` over pairs, resampling slides (see the module docstring).

    `slide_a`/`slide_b` hold each pair's slide indices in [0, n_slides). The same seed gives the same
    interval; calls with the same (n_slides, n_boot, seed) share their replicates.
    """
    counts = slide_resamples(n_slides, n_boot, seed)
    samples = bootstrap_statistic(values, pair_weights(counts, slide_a, slide_b), statistic)
    low, high = percentile_ci(samples, confidence)
    if np.ndim(low) == 0:
        return float(low), float(high)
    return low, high
