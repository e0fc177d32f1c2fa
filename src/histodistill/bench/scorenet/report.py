"""The ScoreNet benchmark in the report: summary over seeds, leaderboard columns, section (scores, cost).

Leaderboard columns: `scorenet_weighted_f1` (ScoreNet with the model as local encoder),
`scorenet_scorer_only_weighted_f1` (the scorer alone; a model-independent reference, shown per model because
each model's file trains its own), `scorenet_topk_hit_rate`; and, unranked, `scorenet_flops_ratio` (FLOPs of
the local encoder over all regions / ScoreNet's, at the largest ROI side).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from histodistill.bench.registry import Benchmark, Figure, by_model

KEYS = ("variant", "roi_px", "roi", "metric")


def _summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof 1; 0 for one seed) and count over seeds, per variant, ROI side and metric."""
    if "roi" not in frame.columns:  # files written before the selection rows
        frame = frame.assign(roi=-1)
    values = frame.assign(value=pd.to_numeric(frame["value"], errors="coerce"))
    out = values.groupby(list(KEYS), sort=False, dropna=False)["value"].agg(
        mean="mean", std=lambda v: float(v.std(ddof=1)) if v.count() > 1 else 0.0, n="count"
    )
    return out.reset_index()


def _value(summary: pd.DataFrame, variant: str, metric: str) -> dict[str, float]:
    rows = summary[(summary["variant"] == variant) & (summary["metric"] == metric)]
    return dict(zip(rows["model"], rows["mean"], strict=True))


def cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per model and ROI side: regions N, K, GFLOPs of ScoreNet and of the encoder over all regions, ratio."""
    cost = summary[summary["variant"] == "cost"]
    if cost.empty:
        return pd.DataFrame(
            columns=["model", "roi_px", "n_regions", "k", "gflops_scorenet", "gflops_all_regions", "ratio"]
        )
    table = cost.pivot_table(index=["model", "roi_px"], columns="metric", values="mean").reset_index()
    table["ratio"] = table["gflops_all_regions"] / table["gflops_scorenet"]
    return table


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    cols: dict[str, dict[str, float]] = {}
    if len(summary) and "variant" in summary.columns:
        cols["scorenet_weighted_f1"] = _value(summary, "scorenet", "weighted_f1")
        cols["scorenet_scorer_only_weighted_f1"] = _value(summary, "scorer_only", "weighted_f1")
        cols["scorenet_topk_hit_rate"] = _value(summary, "scorenet", "topk_hit_rate")
        costs = cost_table(summary)
        if len(costs):
            largest = costs[costs["roi_px"] == costs["roi_px"].max()]
            cols["scorenet_flops_ratio"] = dict(zip(largest["model"], largest["ratio"], strict=True))
    return by_model(cols, models)


def _section(summary: pd.DataFrame, models: Sequence[str], figs: Sequence[Figure]) -> str:
    from histodistill.report import html as page

    if summary.empty or "variant" not in summary.columns:
        return page.note("No ScoreNet scores.")
    models = list(models)
    scores = summary[~summary["variant"].isin(["cost", "selection"])]
    body = page.note(
        "ScoreNet (Stegmüller et al., WACV 2023) with each model as the frozen local encoder on the K regions "
        "its scorer selects, trained on the ROI manifest; test scores, mean ± sample std over seeds. "
        "scorer_only: the scorer's low-resolution global token alone (the paper's 'glorified low-resolution "
        "ViT' check). topk_hit_rate: share of test ROIs whose K regions include the decisive pattern "
        "(topk_hit_chance: the same for K random regions). masked_accuracy: 75% of the selected regions "
        "blanked at test time (the paper's Table 7 probe; masked_share: the share actually blanked, since the "
        "count rounds half up: all of them at K ≤ 2)."
    )
    pictures = "".join(page.figure(f.png, f.name, f.caption) for f in figs)
    body = pictures + body
    body += page.wide_table(scores, ["variant", "metric"], models, lambda r: page.fmt_pm(r["mean"], r["std"]))
    costs = cost_table(summary)
    if len(costs):
        rows = [
            [
                r.model,
                int(r.roi_px),
                int(r.n_regions),
                int(r.k),
                page.fmt(r.gflops_scorenet),
                page.fmt(r.gflops_all_regions),
                page.fmt(r.ratio, 2),
            ]
            for r in costs.itertuples()
        ]
        body += page.note(
            "Cost per ROI (FLOPs counted by torch.utils.flop_counter; time: benchmarks/scorenet.py)."
        )
        body += page.table(
            ["model", "ROI side (px)", "regions N", "K", "ScoreNet GFLOPs", "all regions GFLOPs", "ratio"],
            rows,
            n_keys=2,
        )
    return body


def _figures(summary: pd.DataFrame, fig_dir, colors) -> list[Figure]:
    """The selected regions on the recorded test ROIs: per model a row of relevance maps (the scorer's
    scores on the region grid), the K selected regions outlined in the model's colour, the decisive region
    dashed in black."""
    from matplotlib.patches import Rectangle

    from histodistill.report.figures import figure_png, new_figure

    sel = summary[summary["variant"] == "selection"] if "variant" in summary.columns else summary.iloc[:0]
    if sel.empty:
        return []
    models = list(dict.fromkeys(sel["model"]))
    n_cols = int(sel.groupby("model")["roi"].nunique().max())
    fig = new_figure(2.4 * n_cols, 2.2 * len(models), layout="constrained")
    axes = fig.subplots(len(models), n_cols, squeeze=False)
    for row, model in enumerate(models):
        own = sel[sel["model"] == model]
        for col, (roi, part) in enumerate(own.groupby("roi", sort=True)):
            values = dict(zip(part["metric"], part["mean"], strict=True))
            n_h, n_w = int(values["grid_h"]), int(values["grid_w"])
            grid = np.array([values.get(f"relevance:{r}", np.nan) for r in range(n_h * n_w)]).reshape(
                n_h, n_w
            )
            ax = axes[row, col]
            ax.imshow(grid, cmap="viridis")
            for r in range(n_h * n_w):
                y, x = divmod(r, n_w)
                if values.get(f"selected:{r}", 0) > 0.5:
                    ax.add_patch(
                        Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, lw=2.5, ec=colors.get(model, "red"))
                    )
                if values.get(f"decisive:{r}", 0) > 0.5:
                    ax.add_patch(
                        Rectangle((x - 0.4, y - 0.4), 0.8, 0.8, fill=False, lw=1.5, ls="--", ec="black")
                    )
            ax.set_title(f"{model}: ROI {int(roi)}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        for col in range(own["roi"].nunique(), n_cols):
            axes[row, col].axis("off")
    caption = (
        "ScoreNet's selection on test ROIs: the scorer's relevance per region (colour), the K regions it "
        "selects (outlined in the model's colour) and the region holding the decisive pattern (dashed)."
    )
    return [Figure(figure_png(fig), "scorenet_selection.png", caption)]


def _label(column: str) -> str:
    return {
        "scorenet_weighted_f1": "ScoreNet weighted F1",
        "scorenet_scorer_only_weighted_f1": "ScoreNet scorer-only weighted F1",
        "scorenet_topk_hit_rate": "ScoreNet top-K hit rate",
        "scorenet_flops_ratio": "ScoreNet FLOPs saving (×)",
    }.get(column, column.replace("_", " "))


BENCHMARK = Benchmark(
    name="scorenet",
    title="ScoreNet ROI classification",
    order=50,
    columns=frozenset({"variant", "roi_px", "metric", "value"}),
    summarize=_summarize,
    headline=_headline,
    section=_section,
    figures=_figures,
    labels=_label,
    unranked=lambda column: column in ("scorenet_flops_ratio", "scorenet_scorer_only_weighted_f1"),
)

__all__ = ["BENCHMARK", "cost_table"]
