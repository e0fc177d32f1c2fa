"""The mitosis benchmark in the report: summary over runs, the leaderboard's headline rows, figures, section.

The summary keeps every setting column of the tidy rows (method, protocol, fraction, domains, …) and
averages over replicates (run, seed, fold, …). The headline, and with it the leaderboard, takes each numeric
setting at its largest value (e.g. 100% of the training data) and each text setting that has an "all" value
at "all" (pooled domains).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.chance import CHANCE, CHANCE_SE, at_chance, at_chance_reason
from histodistill.bench.registry import Benchmark, Figure, by_model

log = logging.getLogger(__name__)

KEYS = ("method", "protocol", "metric")
REPLICATE_COLUMNS = ("run", "seed", "fold", "repeat", "replicate")  # averaged over, never a setting
SUMMARY_STATS = ("mean", "std", "n")
HIDDEN_METRICS = (CHANCE, CHANCE_SE)  # recorded for the at-chance flag, not shown as scores
FLAGGED_METHOD = "linear_probe"  # the frozen-feature probe (LoRA fine-tunes the model: no test of features)


def _shown(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[~summary["metric"].isin(HIDDEN_METRICS)] if "metric" in summary.columns else summary


def _model_rows(frame: pd.DataFrame, model: str, path: Path) -> pd.DataFrame:
    """Rows of `model` when the file holds several models; the file's name names the model otherwise."""
    if "model" in frame.columns and frame["model"].nunique() > 1:
        frame = frame[frame["model"].astype(str) == model]
        if frame.empty:
            raise BenchmarkError(f"mitosis scores {path} hold several models, none of them {model!r}")
    return frame.drop(columns="model", errors="ignore")


def _keys(frame: pd.DataFrame) -> list[str]:
    """Method, protocol, every other setting column (fraction, domains, …) and metric: all but replicates."""
    skip = {"model", "value", *REPLICATE_COLUMNS, *KEYS}
    settings = [c for c in frame.columns if c not in skip]
    return [k for k in KEYS[:2] if k in frame.columns] + settings + ["metric"]


def _summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof 1; 0 for one run) and count over replicates, per setting and metric."""
    values = frame.assign(value=pd.to_numeric(frame["value"], errors="coerce"))
    out = values.groupby(_keys(frame), sort=False, dropna=False)["value"].agg(
        mean="mean", std=lambda v: float(v.std(ddof=1)) if v.count() > 1 else 0.0, n="count"
    )
    return out.reset_index()


def headline_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard's mitosis rows: each numeric setting at its largest value and each text setting
    holding "all" at "all"; then the mean per (model, method, protocol, metric) in case another setting
    still varies."""
    rows = summary
    settings = [c for c in summary.columns if c not in ("model", *KEYS, *SUMMARY_STATS)]
    for col in settings:
        values = rows[col]
        if pd.api.types.is_numeric_dtype(values) and values.notna().any():
            rows = rows[values == values.max()]
        elif (values.astype(str) == "all").any():
            rows = rows[values.astype(str) == "all"]
    keys = ["model", *(k for k in KEYS if k in rows.columns)]
    return rows.groupby(keys, sort=False, dropna=False)[["mean", "std"]].mean().reset_index()


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    cols: dict[str, dict[str, float]] = {}
    summary = _shown(summary)
    if len(summary):
        rows = headline_rows(summary)
        keys = [k for k in KEYS if k in rows.columns]
        for key, part in rows.groupby(keys, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            cols["mitosis_" + "_".join(str(k) for k in key)] = dict(
                zip(part["model"], part["mean"], strict=True)
            )
    return by_model(cols, models)


AUROC_PER_BA_SE = (4 / 3) ** 0.5  # binary null SE of AUROC / that of balanced accuracy (see `_errors`)


def _errors(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Null standard errors of the headline numbers, from the recorded `CHANCE_SE` of each (method,
    protocol) at the headline's settings (`headline_rows`):

    - balanced accuracy: `CHANCE_SE` itself (`bench.chance.chance_metrics`);
    - AUROC of a binary task (chance level 1/2): `CHANCE_SE` × √(4/3). Under "scores carry no information"
      the Mann–Whitney AUROC has variance (n₁ + n₂ + 1) / (12 n₁ n₂) (Hanley & McNeil 1982), and two-class
      balanced accuracy (1/16)(1/n₁ + 1/n₂); the ratio of the standard errors is √(4/3) up to the
      1/(n₁n₂) term (below 1% for n₁, n₂ ≥ 50);
    - other metrics (weighted F1, training-set sizes): NaN.
    """
    cols: dict[str, dict[str, float]] = {}
    if len(summary) and "metric" in summary.columns:
        rows = headline_rows(summary)
        keys = [k for k in KEYS if k in rows.columns and k != "metric"]
        for key, part in rows.groupby(keys, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            per_model = part.pivot_table(index="model", columns="metric", values="mean", aggfunc="first")
            if CHANCE_SE not in per_model.columns:
                continue
            se = per_model[CHANCE_SE]
            binary = per_model.get(CHANCE, pd.Series(np.nan, index=per_model.index)).round(9) == 0.5
            prefix = "mitosis_" + "_".join(str(k) for k in key)
            for metric in per_model.columns.drop([CHANCE, CHANCE_SE], errors="ignore"):
                if metric == "balanced_accuracy":
                    cols[f"{prefix}_{metric}"] = se.to_dict()
                elif metric == "auroc":
                    cols[f"{prefix}_{metric}"] = se.where(binary).mul(AUROC_PER_BA_SE).to_dict()
    return by_model(cols, models)


def _figures(summary: pd.DataFrame, fig_dir: Path, colors: Mapping[str, str]) -> list[Figure]:
    """Scaling curves and the cross-domain AUROC heat maps (`histodistill.report.mitosis_figures`, in the
    report's model colours), where the summary has their rows."""
    from histodistill.report.mitosis_figures import plot_cross_domain, plot_scaling

    if not {"protocol", "mean", "std"} <= set(summary.columns):
        return []
    out = []
    for plot, name, caption in (
        (
            plot_scaling,
            "mitosis_scaling.png",
            "Mitosis: test scores vs training data (mean ± std over runs; colour: model, line: method).",
        ),
        (
            plot_cross_domain,
            "mitosis_cross_domain.png",
            "Mitosis: single-source cross-domain AUROC (rows: training domain; diagonal: in-domain holdout; "
            "one colour scale fitted to the values).",
        ),
    ):
        try:
            png = plot(summary, fig_dir / name, colors=colors)
        except BenchmarkError as exc:  # e.g. one domain only: no cross-domain protocol
            log.info("no %s: %s", name, exc)
            continue
        out.append(Figure(png, name, caption))
    return out


def _section(summary: pd.DataFrame, models: Sequence[str], figs: Sequence[Figure]) -> str:
    from histodistill.report import html as page

    summary = _shown(summary)
    if summary.empty:
        return page.note("No mitosis scores.")
    pictures = "".join(page.figure(f.png, f.name, f.caption) for f in figs)
    models = list(models)  # every model, so one absent from this benchmark shows as a column of "–"

    def cell(r: dict) -> str:
        return page.fmt_pm(r["mean"], r["std"])

    headline = headline_rows(summary)
    keys = [k for k in KEYS if k in headline.columns]
    body = page.note(
        "Mean ± sample std over runs. Headline (and leaderboard): each numeric setting at its largest value "
        "(e.g. all the training data) and each setting that has an 'all' value at 'all' (pooled domains)."
    )
    body += page.wide_table(headline, keys, models, cell)
    full_keys = [c for c in summary.columns if c not in ("model", *SUMMARY_STATS)]
    if full_keys != keys:
        body += page.details(
            f"all settings ({' × '.join(full_keys)})", page.wide_table(summary, full_keys, models, cell)
        )
    return pictures + body


def _flags(summary: pd.DataFrame, models: Sequence[str]) -> dict[str, str]:
    """Models whose linear probe is at chance (`histodistill.bench.chance.at_chance`) in every protocol's
    headline setting (all the training data, pooled domains). Files without the chance rows are not judged."""
    out: dict[str, str] = {}
    if summary.empty or not {"method", "protocol"} <= set(summary.columns):
        return out
    rows = headline_rows(summary[summary["method"] == FLAGGED_METHOD])
    for model, part in rows.groupby("model", sort=False):
        judged = []
        for protocol, g in part.groupby("protocol", sort=True):
            means = dict(zip(g["metric"], g["mean"], strict=True))
            if {"balanced_accuracy", CHANCE, CHANCE_SE} <= set(means):
                judged.append((protocol, means["balanced_accuracy"], means[CHANCE], means[CHANCE_SE]))
        if judged and all(at_chance(b, c, se) for _, b, c, se in judged):
            protocol, bacc, chance, se = judged[0]
            out[model] = (
                f"mitosis linear probe at chance ({protocol}: balanced accuracy {at_chance_reason(bacc, chance, se)})"
            )
    return out


def _label(column: str) -> str:
    return "mitosis " + column.removeprefix("mitosis_").replace("_", " ")


BENCHMARK = Benchmark(
    name="mitosis",
    title="Mitosis",
    order=40,
    columns=frozenset({"metric", "value"}),
    summarize=_summarize,
    headline=_headline,
    figures=_figures,
    section=_section,
    labels=_label,
    model_rows=_model_rows,
    flags=_flags,
    errors=_errors,
    unranked=lambda column: column.endswith("_n_train"),  # training-set sizes, not scores
)
