"""The ScoreNet benchmark in the report: summary over seeds, leaderboard columns, section (scores, cost).

Leaderboard columns: `scorenet_weighted_f1` (ScoreNet with the model as local encoder),
`scorenet_scorer_only_weighted_f1` (the scorer alone; a model-independent reference, shown per model because
each model's file trains its own), `scorenet_topk_hit_rate`; and, unranked, `scorenet_flops_ratio` (FLOPs of
the local encoder over all regions / ScoreNet's, at the largest ROI side).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from histodistill.bench.registry import Benchmark, Figure, by_model

KEYS = ("variant", "roi_px", "metric")


def _summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof 1; 0 for one seed) and count over seeds, per variant, ROI side and metric."""
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
    scores = summary[summary["variant"] != "cost"]
    body = page.note(
        "ScoreNet (Stegmüller et al., WACV 2023) with each model as the frozen local encoder on the K regions "
        "its scorer selects, trained on the ROI manifest; test scores, mean ± sample std over seeds. "
        "scorer_only: the scorer's low-resolution global token alone (the paper's 'glorified low-resolution "
        "ViT' check). topk_hit_rate: share of test ROIs whose K regions include the decisive pattern "
        "(topk_hit_chance: the same for K random regions). masked_accuracy: 75% of the selected regions "
        "dropped at test time (the paper's Table 7 probe)."
    )
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
    labels=_label,
    unranked=lambda column: column in ("scorenet_flops_ratio", "scorenet_scorer_only_weighted_f1"),
)

__all__ = ["BENCHMARK", "cost_table"]
