"""Linear probing on frozen features (the UNI / Ammeling et al. 2025 protocol).

Frozen features (the model's registered pooling: CLS, or CLS ⊕ mean patch token for Virchow 2; made by the
`embed` rule from the patch store) → logistic regression, L-BFGS, 1000 iterations, C = D·K/100, fitted once
on train + validation. The default `implementation="torch"` is the authors' (= UNI's) own
(DeepMicroscopy/FoundationModelComparison `src/logistic_regression.py`): a zero-initialised
`nn.Linear(D, K)`, mean cross-entropy + (1/C)·0.5·‖W‖₂ (the norm, not its square; bias unpenalised), one
`torch.optim.LBFGS(max_iter=1000, line_search_fn="strong_wolfe")` step, on unstandardised features.
`"sklearn"` uses sklearn's `LogisticRegression(C, lbfgs, max_iter)` (penalty 0.5·‖W‖² against the summed
loss), which is not numerically the same. Because train and validation are merged, the five Monte-Carlo
validation splits change nothing at 100% data: the linear probe's runs there are identical (std 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.results import prediction_frame, score_predictions
from histodistill.bench.mitosis.splits import Split


def fit_logistic_regression(
    x: np.ndarray, y: np.ndarray, max_iter: int = 1000, implementation: str = "torch"
) -> Callable[[np.ndarray], np.ndarray]:
    """Logistic regression with C = D·K/100 and L-BFGS on features `x` [N, D] and labels `y` [N] in 0…K-1.

    Returns `predict_proba`: features [M, D] → float64 probabilities [M, K]; it carries `.C` and (torch) the
    fitted `.head`. The objective is the module docstring's. Raises BenchmarkError for fewer than 2 classes,
    labels that are not 0…K-1, or an unknown `implementation` ("torch", "sklearn").
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    classes = np.unique(y)
    if len(classes) < 2 or not np.array_equal(classes, np.arange(len(classes))):
        raise BenchmarkError(
            f"logistic regression needs labels 0…K-1 with K ≥ 2; got classes {classes.tolist()}"
        )
    c = x.shape[1] * len(classes) / 100.0
    if implementation == "sklearn":
        from histodistill.bench.probe import LogRegConfig, fit_logreg

        return fit_logreg(x, y, LogRegConfig(max_iter=max_iter, standardize=False))
    if implementation != "torch":
        raise BenchmarkError(
            f"unknown logistic-regression implementation {implementation!r} (torch, sklearn)"
        )
    feats, labels = torch.from_numpy(x), torch.from_numpy(y)
    head = nn.Linear(x.shape[1], len(classes))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(head(feats), labels) + (1.0 / c) * 0.5 * head.weight.norm(p=2)
        loss.backward()
        return loss

    opt.step(closure)

    def predict_proba(q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(head(torch.as_tensor(np.asarray(q, np.float32))).double(), 1).numpy()

    predict_proba.C = c  # type: ignore[attr-defined]
    predict_proba.head = head  # type: ignore[attr-defined]
    return predict_proba


def predict_linear(
    features: np.ndarray,
    annotations: pd.DataFrame,
    split: Split,
    model: str,
    max_iter: int = 1000,
    implementation: str = "torch",
) -> pd.DataFrame:
    """Linear probing on one split: fit on train ∪ val (on train alone when `split.fit_val` is False, the
    authors' annotation-seeded protocol), predict every test set (PREDICTION_COLUMNS).

    `features` [N, D] are in annotation order (row i = annotation i). Raises BenchmarkError when their
    shape does not match the annotations or they hold NaN or inf.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(annotations):
        raise BenchmarkError(
            f"{model}: features have shape {features.shape}, expected [{len(annotations)}, D]"
        )
    if not np.isfinite(features).all():
        raise BenchmarkError(f"{model}: the features hold NaN or inf")
    targets = annotations["target"].to_numpy()
    fit_rows = np.union1d(split.train, split.val) if split.fit_val else np.sort(split.train)
    predict = fit_logistic_regression(features[fit_rows], targets[fit_rows], max_iter, implementation)
    frames = []
    for test_domain, test in split.tests.items():
        p1 = predict(features[test])[:, 1] if len(test) else np.zeros(0)
        frames.append(
            prediction_frame(
                model, "linear_probe", split, test_domain, test, targets[test], p1, len(fit_rows)
            )
        )
    return pd.concat(frames, ignore_index=True)


def run_linear_protocol(
    features: np.ndarray,
    annotations: pd.DataFrame,
    splits: Sequence[Split],
    model: str,
    max_iter: int = 1000,
    implementation: str = "torch",
) -> pd.DataFrame:
    """Linear probing over every split (scaling or cross-domain), scored: one tidy frame (ROW_COLUMNS)."""
    frames = [predict_linear(features, annotations, s, model, max_iter, implementation) for s in splits]
    return score_predictions(pd.concat(frames, ignore_index=True))
