"""The mitosis benchmark's figures (PNG): scaling curves and cross-domain heat maps, from `summarize` output."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.results import METRICS, cross_domain_matrix
from histodistill.bench.mitosis.splits import CROSS_DOMAIN, SCALING


@contextlib.contextmanager
def _figure(path: str | os.PathLike, **kwargs) -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(**kwargs)
    try:
        yield fig
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_scaling(summary: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = METRICS) -> None:
    """Scaling curves: one panel per metric, one line (mean ± std band) per model and method.

    `summary` is `summarize` output; raises BenchmarkError when it has no scaling rows.
    """
    sel = summary[summary["protocol"] == SCALING]
    if sel.empty:
        raise BenchmarkError("no scaling rows to plot")
    with _figure(path, figsize=(4.2 * len(metrics), 3.6)) as fig:
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics, strict=True):
            for (model, method), g in sel[sel["metric"] == metric].groupby(["model", "method"], sort=True):
                g = g.sort_values("fraction")
                pct = g["fraction"].to_numpy() * 100
                ax.plot(pct, g["mean"], marker="o", label=f"{model} · {method}")
                ax.fill_between(pct, g["mean"] - g["std"], g["mean"] + g["std"], alpha=0.2)
            ax.set_xscale("log")
            ax.set_xlabel("training data (%)")
            ax.set_title(metric.replace("_", " "))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test score (mean ± std over runs)")
        labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
        if labelled:  # a metric without rows draws no line
            labelled[-1].legend(fontsize=7, loc="lower right")


def plot_cross_domain(summary: pd.DataFrame, path: str | os.PathLike, metric: str = "auroc") -> None:
    """Cross-domain heat maps (training domain × test domain) of the mean metric, one per model and method.

    `summary` is `summarize` output; raises BenchmarkError when it has no cross-domain rows of `metric`.
    """
    sel = summary[(summary["protocol"] == CROSS_DOMAIN) & (summary["metric"] == metric)]
    if sel.empty:
        raise BenchmarkError(f"no cross-domain {metric} rows to plot")
    pairs = sorted(set(zip(sel["model"], sel["method"], strict=True)))
    n = len(sel["train_domain"].unique())
    with _figure(path, figsize=(max(3.5, 0.9 * n + 2) * len(pairs), max(3.2, 0.8 * n + 1.5))) as fig:
        axes = fig.subplots(1, len(pairs), squeeze=False)[0]
        for ax, (model, method) in zip(axes, pairs, strict=True):
            m = cross_domain_matrix(sel, model, method, metric)
            image = ax.imshow(
                m.to_numpy(dtype=float), vmin=0.5 if metric == "auroc" else 0.0, vmax=1.0, cmap="viridis"
            )
            for (i, j), v in np.ndenumerate(m.to_numpy(dtype=float)):
                ax.text(
                    j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7, color="w"
                )
            ax.set_xticks(range(len(m.columns)), m.columns, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(m.index)), m.index, fontsize=7)
            ax.set_xlabel("test domain")
            ax.set_ylabel("training domain")
            ax.set_title(f"{model} · {method} ({metric})", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
