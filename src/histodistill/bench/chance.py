"""Is a probe better than chance? Balanced accuracy's chance level, its null spread, and the test.

Shared by the probe and mitosis benchmarks (their score rows record `chance_metrics`; the report flags a
model whose probes are `at_chance` as collapsed / uninformative). Light on purpose (numpy only): the
mitosis package must import without scikit-learn (its GPU environment has none).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CHANCE",
    "CHANCE_MARGIN",
    "CHANCE_SE",
    "CHANCE_Z",
    "at_chance",
    "at_chance_reason",
    "chance_metrics",
]

# A probe is "at chance" when its balanced accuracy does not exceed chance by more than
# max(CHANCE_Z × null standard error, CHANCE_MARGIN): see `at_chance`.
CHANCE_Z = 1.645  # one-sided 5% level
CHANCE_MARGIN = 0.02  # balanced-accuracy points: closer to chance than this is uninformative at any n
CHANCE = "chance_balanced_accuracy"
CHANCE_SE = "chance_balanced_accuracy_se"


def chance_metrics(codes: np.ndarray) -> dict[str, float]:
    """Balanced accuracy's chance level and its standard error under "predictions carry no information".

    Balanced accuracy is the mean over the K classes present in `codes` (integer labels [n]) of each class's
    recall. A classifier whose predictions are independent of the labels, drawn uniformly over the K
    classes, has recall_k ~ Binomial(n_k, 1/K) / n_k, so its balanced accuracy has mean 1/K (`CHANCE`) and
    standard error sqrt(Σ_k (1/K)(1 − 1/K) / n_k) / K (`CHANCE_SE`; its square is (K−1)/(K²n) for n
    items in balanced classes). A constant predictor also scores exactly 1/K. Returns NaN for both when `codes` is empty.
    """
    _, counts = np.unique(np.asarray(codes), return_counts=True)
    if len(counts) == 0:
        return {CHANCE: math.nan, CHANCE_SE: math.nan}
    k = len(counts)
    se = math.sqrt(float(np.sum((1 / k) * (1 - 1 / k) / counts))) / k
    return {CHANCE: 1.0 / k, CHANCE_SE: se}


def at_chance(balanced_accuracy: float, chance: float, se: float) -> bool:
    """True when `balanced_accuracy` is not above chance: ≤ chance + max(CHANCE_Z · se, CHANCE_MARGIN).

    The first term is a one-sided z-test at the 5% level of "no better than chance" with `chance_metrics`'
    null standard error (the mean over seeds is scored on one test set, so its null spread is at most a
    single run's: the test does not shrink with the number of seeds); the margin keeps a huge test set
    from calling 0.51 on two classes informative. False when any input is NaN (not tested).
    """
    if not all(math.isfinite(v) for v in (balanced_accuracy, chance, se)):
        return False
    return balanced_accuracy <= chance + max(CHANCE_Z * se, CHANCE_MARGIN)


def at_chance_reason(balanced_accuracy: float, chance: float, se: float) -> str:
    """The `at_chance` test with its numbers, for a flag's message: "0.512 ≤ chance 0.500 + max(…)"."""
    return (
        f"{balanced_accuracy:.3f} ≤ chance {chance:.3f} + max({CHANCE_Z} × null SE {se:.3f}, {CHANCE_MARGIN})"
    )
