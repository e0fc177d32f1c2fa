"""The mitosis benchmark's report figures (PNG): scaling curves and cross-domain heat maps, from `summarize`.

Drawn like every report figure (`histodistill.report.figures`): on a `matplotlib.figure.Figure` with the Agg
canvas, never through pyplot, each model in its report colour. Legends sit outside the axes, so they never
cover data; the heat maps share one colour scale fitted to the values shown (not a fixed 0.5–1 range that
clips lower values), and each cell's number is written in black or white, whichever reads on its colour.
A figure with nothing to compare (no finite value) says so in words instead of drawing empty axes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.results import METRICS, cross_domain_matrix
from histodistill.bench.mitosis.splits import CROSS_DOMAIN, SCALING
from histodistill.report.figures import (
    figure_png,
    message_png,
    model_colors,
    mpl_label,
    new_figure,
    write_png,
)

__all__ = ["plot_cross_domain", "plot_scaling"]

METHOD_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _colors(summary: pd.DataFrame, colors: Mapping[str, str] | None) -> Mapping[str, str]:
    return colors if colors is not None else model_colors(list(dict.fromkeys(summary["model"])))


def plot_scaling(
    summary: pd.DataFrame,
    path: str | os.PathLike,
    metrics: Sequence[str] = METRICS,
    colors: Mapping[str, str] | None = None,
) -> bytes:
    """Scaling curves: one panel per metric, one line (mean ± std band) per model and method → PNG bytes,
    also written atomically to `path`.

    Colour: the model (`colors`, default `model_colors` in summary order); line style and marker: the
    method. The legend is outside the panels. Raises BenchmarkError when `summary` has no scaling rows.
    """
    sel = summary[summary["protocol"] == SCALING]
    if sel.empty:
        raise BenchmarkError("no scaling rows to plot")
    colors = _colors(sel, colors)
    methods = list(dict.fromkeys(sel["method"]))
    styles = {m: METHOD_STYLES[i % len(METHOD_STYLES)] for i, m in enumerate(methods)}
    fig = new_figure(4.0 * len(metrics) + 2.2, 3.6, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        rows = sel[sel["metric"] == metric]
        for (model, method), g in rows.groupby(["model", "method"], sort=False):
            g = g.sort_values("fraction")
            pct = g["fraction"].to_numpy(float) * 100
            mean, std = g["mean"].to_numpy(float), g["std"].to_numpy(float)
            line, marker = styles[method]
            color = colors.get(model, "grey")
            ax.plot(pct, mean, ls=line, marker=marker, color=color, label=mpl_label(f"{model} · {method}"))
            ax.fill_between(pct, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel("training data (%)")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test score (mean ± std over runs)")
    handles, labels = {}, {}
    for ax in axes:  # one legend entry per line, from whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels.setdefault(lab, lab)
    if handles:
        fig.legend(list(handles.values()), list(labels), loc="outside right upper", fontsize=8, frameon=False)
    png = figure_png(fig)
    write_png(png, path)
    return png


def color_range(values: np.ndarray, min_width: float = 0.05) -> tuple[float, float]:
    """The heat maps' colour scale: the finite values' min and max, widened about their middle to at least
    `min_width` (so near-equal values do not stretch noise over the whole colour map). Raises ValueError
    when no value is finite."""
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        raise ValueError("no finite value")
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < min_width:
        mid = (hi + lo) / 2
        lo, hi = mid - min_width / 2, mid + min_width / 2
    return lo, hi


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_cross_domain(
    summary: pd.DataFrame,
    path: str | os.PathLike,
    metric: str = "auroc",
    colors: Mapping[str, str] | None = None,
) -> bytes:
    """Cross-domain heat maps (training domain × test domain) of the mean `metric`, one per model and method,
    on one shared colour scale fitted to the values (padded to at least 0.05 wide) → PNG bytes, also written
    atomically to `path`. Each panel's title is drawn in its model's colour (`colors`).

    Raises BenchmarkError when `summary` has no cross-domain rows of `metric`.
    """
    import matplotlib

    sel = summary[(summary["protocol"] == CROSS_DOMAIN) & (summary["metric"] == metric)]
    if sel.empty:
        raise BenchmarkError(f"no cross-domain {metric} rows to plot")
    colors = _colors(sel, colors)
    pairs = list(dict.fromkeys(zip(sel["model"], sel["method"], strict=True)))
    matrices = [cross_domain_matrix(sel, model, method, metric) for model, method in pairs]
    values = np.concatenate([m.to_numpy(float).ravel() for m in matrices])
    if not np.isfinite(values).any():
        png = message_png(f"Cross-domain {metric}: no finite value to show (every cell is NaN).")
        write_png(png, path)
        return png
    lo, hi = color_range(values)
    n = max(len(m) for m in matrices)
    side = max(2.6, 0.55 * n + 1.2)  # each cell ≥ 0.55 in: room for "0.00" at 7 pt
    cols = min(len(pairs), 3)
    rows = -(-len(pairs) // cols)
    fig = new_figure(side * cols + 1.0, (side + 0.5) * rows, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["viridis"]
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi)
    image = None
    for ax, (model, method), m in zip(axes, pairs, matrices, strict=False):
        data = m.to_numpy(dtype=float)
        image = ax.imshow(data, cmap=cmap, norm=norm)
        for (i, j), v in np.ndenumerate(data):
            color = "black" if np.isnan(v) else _text_color(cmap(norm(v)))
            ax.text(
                j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7, color=color
            )
        ax.set_xticks(
            range(len(m.columns)), [mpl_label(c) for c in m.columns], rotation=45, ha="right", fontsize=7
        )
        ax.set_yticks(range(len(m.index)), [mpl_label(c) for c in m.index], fontsize=7)
        ax.set_xlabel("test domain", fontsize=8)
        ax.set_ylabel("training domain", fontsize=8)
        ax.set_title(mpl_label(f"{model} · {method}"), fontsize=9, color=colors.get(model, "black"))
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(pairs)].tolist(), shrink=0.8, label=f"mean {metric} over runs")
    png = figure_png(fig)
    write_png(png, path)
    return png
