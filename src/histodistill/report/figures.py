"""Report figures as PNG bytes: one colour per model, the same in every figure.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so no global
figure state or display backend is involved (safe in Snakemake jobs and threads). The PLISM scatters reuse
`histodistill.bench.plism`'s plotting functions; their colours follow the axes' property cycle, so they are
drawn inside an `rc_context` whose cycle lists exactly the plotted models' colours.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from histodistill.atomic import atomic_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 120


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """A stable colour per model, by position: tab10, then tab20's light shades, then evenly spaced hues."""
    palette = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    palette += [to_hex(c) for c in matplotlib.colormaps["tab20"].colors[1::2]]
    out = {}
    for i, model in enumerate(dict.fromkeys(models)):
        if i < len(palette):
            out[model] = palette[i]
        else:
            out[model] = to_hex(matplotlib.colormaps["hsv"]((i * 0.618034) % 1.0))
    return out


def mpl_label(text: object) -> str:
    """Text safe for matplotlib: a `$` would otherwise start mathtext (and can fail to parse)."""
    return str(text).replace("$", r"\$")


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (tight bounding box, so legends below the axes are kept)."""
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def write_png(data: bytes, out: str | os.PathLike) -> Path:
    """Write PNG bytes atomically."""
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(data)
    return Path(out)


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """A pyplot-free figure (inches) on an Agg canvas; `layout` as matplotlib's (e.g. "constrained")."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


_new_figure = new_figure


def message_png(text: str, width: float = 6.0) -> bytes:
    """A figure that is only a sentence, for a plot that would be degenerate (nothing to compare, every
    point in one place): the page then says why there is no plot instead of showing a misleading one."""
    fig = new_figure(width, 1.0)
    fig.text(0.5, 0.5, mpl_label(text), ha="center", va="center", wrap=True, fontsize=10)
    return figure_png(fig)


def _bars(
    ax,
    means: pd.DataFrame,
    errors: pd.DataFrame | None,
    colors: Mapping[str, str],
    legend: bool,
) -> None:
    """Grouped bars on `ax`: one group per row of `means` (a category), one bar per column (a model)."""
    cats = list(means.index)
    models = list(means.columns)
    x = np.arange(len(cats), dtype=float)
    width = 0.8 / max(1, len(models))
    for j, model in enumerate(models):
        y = means[model].to_numpy(dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        err = None
        if errors is not None and model in errors.columns:
            e = errors[model].reindex(means.index).to_numpy(dtype=float)[ok]
            err = np.where(np.isfinite(e), e, 0.0)
        ax.bar(
            x[ok] - 0.4 + width * (j + 0.5),
            y[ok],
            width,
            yerr=err,
            capsize=2 if err is not None else 0,
            color=colors.get(model, "grey"),
            label=mpl_label(model),
            edgecolor="black",
            linewidth=0.4,
            error_kw={"elinewidth": 0.8},
        )
    ax.set_xticks(x)
    long = len(cats) > 4 or max((len(str(c)) for c in cats), default=0) > 12
    ax.set_xticklabels(
        [mpl_label(c) for c in cats], rotation=30 if long else 0, ha="right" if long else "center"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if legend and models:
        ax.legend(
            fontsize=8,
            ncol=min(len(models), 4),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.25 if long else -0.12),
            frameon=False,
        )


def grouped_bars(
    means: pd.DataFrame,
    errors: pd.DataFrame | None,
    colors: Mapping[str, str],
    ylabel: str,
    title: str,
) -> bytes:
    """Bar chart of `means` [category × model] with error bars `errors` (same layout) → PNG bytes."""
    width = min(14.0, 3.0 + len(means.index) * (0.3 * len(means.columns) + 0.5))
    fig = _new_figure(max(5.0, width), 4.0)
    ax = fig.add_subplot()
    _bars(ax, means, errors, colors, legend=True)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return figure_png(fig)


def hest_bars(per_task: pd.DataFrame, colors: Mapping[str, str]) -> bytes:
    """HEST: per task, each model's mean Pearson r over folds, error bars = std over folds (ddof 0)."""
    models = [m for m in colors if m in set(per_task["model"])]
    means = per_task.pivot(index="task", columns="model", values="pearson_mean").reindex(columns=models)
    errors = per_task.pivot(index="task", columns="model", values="pearson_std").reindex(columns=models)
    return grouped_bars(means, errors, colors, "Pearson r (mean over folds)", "HEST gene expression")


def probe_bars(
    summary: pd.DataFrame,
    colors: Mapping[str, str],
    metric: str = "balanced_accuracy",
    methods: Sequence[str] | None = None,
) -> bytes:
    """Probes: one panel per method (`methods`, in that order; default all); per task each model's mean
    `metric` over seeds, error bars = std over seeds."""
    rows = summary[summary["metric"] == metric]
    present = set(rows["method"])
    methods = [m for m in (methods or dict.fromkeys(rows["method"])) if m in present]
    models = [m for m in colors if m in set(rows["model"])]
    n_tasks = rows["task"].nunique()
    width = max(5.0, min(14.0, 3.0 + n_tasks * (0.3 * len(models) + 0.5)))
    fig = _new_figure(width, 3.2 * max(1, len(methods)) + 0.6)
    label = metric.replace("_", " ")
    for i, method in enumerate(methods):
        part = rows[rows["method"] == method]
        means = part.pivot(index="task", columns="model", values="mean").reindex(columns=models)
        errors = part.pivot(index="task", columns="model", values="std").reindex(columns=models)
        ax = fig.add_subplot(len(methods), 1, i + 1)
        _bars(ax, means, errors, colors, legend=i == len(methods) - 1)
        ax.set_ylabel(label)
        ax.set_title(f"{mpl_label(method)} probe")
    fig.suptitle(f"Classification probes: {label}")
    fig.tight_layout()
    return figure_png(fig)


def plism_scatter(
    plot: Callable[..., Path],
    summary: pd.DataFrame,
    out: str | os.PathLike,
    colors: Mapping[str, str],
    **kwargs,
) -> bytes:
    """Draw one of `bench.plism`'s scatters (written atomically to `out`) in the report's model colours.

    `summary` is the concatenation of per-model `summarize_scores` frames with a `model` column; model
    names are made mathtext-safe for the labels only.
    """
    models = list(dict.fromkeys(summary["model"]))
    labelled = summary.assign(model=summary["model"].map(mpl_label))
    cycle = cycler(color=[colors.get(m, "grey") for m in models])
    with matplotlib.rc_context({"axes.prop_cycle": cycle}):
        path = plot(labelled, out, **kwargs)
    return Path(path).read_bytes()
