"""Per-annotation predictions → tidy metric rows → summaries; the result file (Parquet with provenance).

Rows are `model, method, protocol, fraction, train_domain, test_domain, run, metric, value` (metrics:
balanced accuracy and weighted F1 at probability 0.5, AUROC; plus `n_train` and balanced accuracy's chance
level and null standard error, `histodistill.bench.chance.chance_metrics`, which the report uses to flag a
model whose linear probe is at chance); summaries are mean ± sample std (ddof = 1) over runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.splits import CROSS_DOMAIN, Split
from histodistill.provenance import read_parquet, write_parquet

log = logging.getLogger(__name__)

ROW_COLUMNS = [
    "model",
    "method",
    "protocol",
    "fraction",
    "train_domain",
    "test_domain",
    "run",
    "metric",
    "value",
]
SUMMARY_KEYS = ["model", "method", "protocol", "fraction", "train_domain", "test_domain", "metric"]
METRICS = ("balanced_accuracy", "f1_weighted", "auroc")
PREDICTION_KEYS = ["model", "method", "protocol", "fraction", "train_domain", "test_domain", "run"]
PREDICTION_COLUMNS = [*PREDICTION_KEYS, "row", "target", "probability", "n_train"]


def prediction_frame(
    model: str, method: str, split: Split, test_domain: str, rows, targets, p1, n_train: int
) -> pd.DataFrame:
    """One test set's predictions (PREDICTION_COLUMNS): annotation `rows`, their 0/1 `targets`, the
    probability `p1` of a mitotic figure, and the number of training annotations `n_train`."""
    return pd.DataFrame(
        {
            "model": model,
            "method": method,
            "protocol": split.protocol,
            "fraction": float(split.fraction),
            "train_domain": split.train_domain,
            "test_domain": test_domain,
            "run": int(split.run),
            "row": np.asarray(rows, np.int64),
            "target": np.asarray(targets, np.int64),
            "probability": np.asarray(p1, np.float64),
            "n_train": int(n_train),
        },
        columns=PREDICTION_COLUMNS,
    )


def score_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per-annotation probabilities → tidy metric rows (balanced accuracy, weighted F1, AUROC, its chance
    level and null SE, n_train).

    Kept apart from prediction so a GPU job without scikit-learn (the torch env) can write predictions
    and the bench env scores them. A test set with one class gets AUROC NaN and a warning.
    """
    from histodistill.bench.chance import chance_metrics
    from histodistill.bench.probe import classification_metrics

    rows: list[tuple] = []
    for key, g in predictions.groupby(PREDICTION_KEYS, sort=False, dropna=False):
        codes = g["target"].to_numpy(np.int64)
        p1 = g["probability"].to_numpy(np.float64)
        if len(np.unique(codes)) < 2:
            log.warning("%s: the test set has %d annotation(s) of one class; AUROC is NaN", key, len(codes))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="AUROC undefined")
            warnings.filterwarnings("ignore", message="A single label was found")
            metrics = classification_metrics(codes, np.stack([1.0 - p1, p1], 1))
        metrics |= chance_metrics(codes)
        metrics["n_train"] = float(g["n_train"].iloc[0])
        rows += [(*key, name, float(v)) for name, v in metrics.items()]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sample std (ddof 1; 0 for a single run) and run count `n` per SUMMARY_KEYS group of tidy rows."""
    grouped = rows.groupby(SUMMARY_KEYS, sort=True, dropna=False)["value"]
    out = grouped.agg(
        mean="mean", std=lambda v: float(v.std(ddof=1)) if v.notna().sum() > 1 else 0.0, n="count"
    )
    return out.reset_index()


def cross_domain_matrix(rows: pd.DataFrame, model: str, method: str, metric: str = "auroc") -> pd.DataFrame:
    """N×N mean over runs: rows = training domain, columns = test domain (diagonal: in-domain holdout).

    `rows` are tidy rows or their summary (then the `mean` column is used); domains missing a cell are NaN.
    Raises BenchmarkError when there is no cross-domain row of `metric` for this model and method.
    """
    sel = rows[
        (rows["protocol"] == CROSS_DOMAIN)
        & (rows["model"] == model)
        & (rows["method"] == method)
        & (rows["metric"] == metric)
    ]
    if sel.empty:
        raise BenchmarkError(f"no cross-domain {metric} rows for model {model!r}, method {method!r}")
    value = "mean" if "mean" in sel.columns else "value"
    domains = sorted(set(sel["train_domain"]) | set(sel["test_domain"]))
    matrix = sel.pivot_table(index="train_domain", columns="test_domain", values=value, aggfunc="mean")
    return matrix.reindex(index=domains, columns=domains)


def write_results(rows: pd.DataFrame, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Tidy rows → Parquet (atomic), with the provenance as JSON under schema metadata b"histodistill"."""
    write_parquet(rows, path, dict(meta))


def read_results(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """A result file written by `write_results` (tidy rows, ROW_COLUMNS) and its provenance.

    Raises BenchmarkError for an unreadable file or one without histodistill provenance.
    """
    return read_parquet(path, "result file", BenchmarkError)
