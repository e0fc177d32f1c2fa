"""Benchmark report: the leaderboard table and one self-contained HTML page from the scorers' tidy files.

`build_report` reads each benchmark's per-model Parquet file, summarises it with the scorer's own summary
function (so the report shows exactly the published protocol's numbers), writes `leaderboard.parquet`
(one row per model, provenance in the metadata), `figures/*.png` and `index.html`, all atomically and
`index.html` last. A benchmark or a model that is absent shows as NaN in the leaderboard and "–" in the
page. A mean over tasks is only given for a model that has every task of that benchmark: a mean over
fewer tasks would not be comparable with the others.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from histodistill import __version__
from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench import hest as hest_bench
from histodistill.bench import plism as plism_bench
from histodistill.bench import probe as probe_bench
from histodistill.provenance import META_KEY, config_hash, library_versions, provenance, write_parquet
from histodistill.report import figures
from histodistill.report import html as page
from histodistill.report.model_card import FLOP_CONVENTION, count_flops, model_profile

__all__ = [
    "BENCHMARKS",
    "ReportError",
    "build_report",
    "count_flops",
    "leaderboard",
    "model_profile",
    "read_tidy",
    "run",
    "summarize_benchmarks",
]

log = logging.getLogger(__name__)


BENCHMARKS = ("plism", "hest", "probe", "mitosis")
REQUIRED = {
    "plism": {"slide_a", "slide_b", "group", "metric", "value"},
    "hest": {"task", "fold", "gene", "metric", "value"},
    "probe": {"task", "method", "seed", "metric", "value"},
    "mitosis": {"metric", "value"},
}
BOOT_SEED = 0
PLISM_TOP10_GROUPS = (plism_bench.INTER_SCANNER, plism_bench.INTER_STAINING, plism_bench.INTER_BOTH)
PROBE_METHOD_ORDER = ("linear", "knn", "logreg", "abmil")
MITOSIS_KEYS = ("method", "protocol", "metric")
REPLICATE_COLUMNS = ("run", "seed", "fold", "repeat", "replicate")  # averaged over, never a setting
SUMMARY_STATS = ("mean", "std", "n")
MODEL_COLUMNS = ("params_m", "gflops", "tiles_per_s", "device")
CONFIG_KEYS = (
    "seed",
    "tiling.mpp",
    "tiling.tile_px",
    "teacher.model",
    "embeddings.models",
    "benchmarks.models",
)
LABELS = {
    "model": "model",
    "params_m": "params (M)",
    "gflops": "GFLOPs @224",
    "tiles_per_s": "tiles/s",
    "device": "device",
    "plism_leaderboard": "PLISM leaderboard",
    "plism_cosine_median": "PLISM cosine (median, all)",
    "plism_top10_inter_scanner": "PLISM top-10 inter-scanner",
    "plism_top10_inter_staining": "PLISM top-10 inter-staining",
    "plism_top10_inter_scanner_staining": "PLISM top-10 inter-scanner+staining",
    "hest_pearson_mean": "HEST Pearson r (mean over tasks)",
}


class ReportError(BenchmarkError):
    """A score file given to the report is missing, unreadable or lacks the benchmark's columns."""


# ----------------------------------------------------------------------------------------------- reading


def read_tidy(path: str | os.PathLike, benchmark: str, model: str) -> tuple[pd.DataFrame, dict | None]:
    """One model's tidy score file and its provenance (None when the file carries none)."""
    path = Path(path)
    who = f"{benchmark} scores of model {model!r}"
    if not path.is_file():
        raise ReportError(f"{who}: {path} does not exist (run the score_{benchmark} rule first)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ReportError(f"{who}: cannot read {path} as Parquet ({exc})") from exc
    prov = None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is not None:
        try:
            prov = json.loads(raw)
        except ValueError:
            log.warning("%s: %s has unreadable provenance metadata", who, path)
    frame = table.to_pandas()
    if missing := REQUIRED[benchmark] - set(frame.columns):
        raise ReportError(f"{who}: {path} lacks column(s) {sorted(missing)}; is it a {benchmark} score file?")
    return frame, prov


def _mitosis_rows(frame: pd.DataFrame, model: str, path: Path) -> pd.DataFrame:
    """Rows of `model` when the file holds several models; the dict key names the model otherwise."""
    if "model" in frame.columns and frame["model"].nunique() > 1:
        frame = frame[frame["model"].astype(str) == model]
        if frame.empty:
            raise ReportError(f"mitosis scores {path} hold several models, none of them {model!r}")
    return frame.drop(columns="model", errors="ignore")


# ----------------------------------------------------------------------------------------------- summaries


def _summarize_one(benchmark: str, frame: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    if benchmark == "plism":
        return plism_bench.summarize_scores(frame, n_boot=n_boot, seed=BOOT_SEED)
    if benchmark == "hest":
        rows = hest_bench.summarize(frame)
        rows = rows[rows["task"] != hest_bench.MEAN]
        wide = rows.pivot(index="task", columns="metric", values="value").reset_index()
        folds = frame[frame["gene"] == hest_bench.MEAN].groupby("task")["fold"].nunique()
        wide["n_folds"] = wide["task"].map(folds).astype(int)
        return wide[["task", "pearson_mean", "pearson_std", "n_folds"]]
    if benchmark == "probe":
        return probe_bench.summarize(frame)
    keys = _mitosis_keys(frame)
    values = frame.assign(value=pd.to_numeric(frame["value"], errors="coerce"))
    out = values.groupby(keys, sort=False, dropna=False)["value"].agg(
        mean="mean", std=lambda v: float(v.std(ddof=1)) if v.count() > 1 else 0.0, n="count"
    )
    return out.reset_index()


def summarize_benchmarks(
    scores: Mapping[str, Mapping[str, str | os.PathLike]], n_boot: int = plism_bench.N_BOOT
) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """Per benchmark, the concatenated per-model summaries (a `model` column first), and the inputs read.

    `n_boot` is the number of cluster-bootstrap replicates of the PLISM CIs (0: no CIs, NaN bounds).
    An empty score file counts as the model being absent from that benchmark (with a warning).
    """
    if unknown := sorted(set(scores) - set(BENCHMARKS)):
        raise ReportError(f"unknown benchmark(s) {unknown} in the report's scores; known: {list(BENCHMARKS)}")
    summaries: dict[str, pd.DataFrame] = {}
    inputs: list[dict[str, Any]] = []
    for benchmark in BENCHMARKS:
        if benchmark not in scores:
            continue
        parts = []
        for model, path in scores[benchmark].items():
            model = str(model)
            frame, prov = read_tidy(path, benchmark, model)
            if benchmark == "mitosis":
                frame = _mitosis_rows(frame, model, Path(path))
            prov = prov or {}
            inputs.append(
                {
                    "benchmark": benchmark,
                    "model": model,
                    "file": Path(path).name,
                    "rows": len(frame),
                    "config_hash": prov.get("config_hash"),
                    "histodistill_version": prov.get("histodistill_version"),
                }
            )
            if frame.empty:
                log.warning("%s scores of model %r (%s) are empty; shown as missing", benchmark, model, path)
                continue
            try:
                summary = _summarize_one(benchmark, frame, n_boot)
            except BenchmarkError as exc:
                raise ReportError(f"{benchmark} scores of model {model!r} ({path}): {exc}") from exc
            parts.append(summary.assign(model=model))
        if parts:
            frame = pd.concat(parts, ignore_index=True)
            summaries[benchmark] = frame[["model", *[c for c in frame.columns if c != "model"]]]
        else:
            summaries[benchmark] = pd.DataFrame(columns=["model"])
    return summaries, inputs


# ----------------------------------------------------------------------------------------------- leaderboard


def _probe_methods(summary: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(summary["method"])) if "method" in summary.columns else []
    return [m for m in PROBE_METHOD_ORDER if m in present] + [
        m for m in present if m not in PROBE_METHOD_ORDER
    ]


def _complete_mean(frame: pd.DataFrame, value: str, models: list[str]) -> dict[str, float]:
    """Per model the mean of `value` over tasks, NaN unless the model has every task in `frame`."""
    tasks = set(frame["task"])
    out = {}
    for model in models:
        own = frame[frame["model"] == model]
        out[model] = float(own[value].mean()) if tasks and set(own["task"]) >= tasks else np.nan
    return out


def _mitosis_keys(frame: pd.DataFrame) -> list[str]:
    """Method, protocol, every other setting column (fraction, domains, …) and metric: all but replicates."""
    skip = {"model", "value", *REPLICATE_COLUMNS, *MITOSIS_KEYS}
    settings = [c for c in frame.columns if c not in skip]
    return [k for k in MITOSIS_KEYS[:2] if k in frame.columns] + settings + ["metric"]


def _mitosis_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard's mitosis rows: each numeric setting at its largest value (e.g. 100% of the training
    data) and each text setting holding "all" at "all" (pooled domains); then mean per (method, protocol,
    metric) in case another setting still varies."""
    rows = summary
    settings = [c for c in summary.columns if c not in ("model", *MITOSIS_KEYS, *SUMMARY_STATS)]
    for col in settings:
        values = rows[col]
        if pd.api.types.is_numeric_dtype(values) and values.notna().any():
            rows = rows[values == values.max()]
        elif (values.astype(str) == "all").any():
            rows = rows[values.astype(str) == "all"]
    keys = ["model", *(k for k in MITOSIS_KEYS if k in rows.columns)]
    return rows.groupby(keys, sort=False, dropna=False)[["mean", "std"]].mean().reset_index()


def _mitosis_column(key: tuple) -> str:
    return "mitosis_" + "_".join(str(k) for k in key)


def leaderboard(
    summaries: Mapping[str, pd.DataFrame],
    models: Mapping[str, Mapping[str, Any]] | None,
    order: list[str],
) -> pd.DataFrame:
    """One row per model: size columns, then each present benchmark's headline numbers (NaN if absent)."""
    models = models or {}
    board = pd.DataFrame({"model": pd.Series(order, dtype="str")})
    for col in MODEL_COLUMNS[:3]:
        board[col] = [_as_float(models.get(m, {}).get(col)) for m in order]
    board["device"] = pd.Series([_as_str(models.get(m, {}).get("device")) for m in order], dtype="str")

    if "plism" in summaries:
        s = summaries["plism"]
        cols: dict[str, dict[str, float]] = {c: {} for c in ("plism_leaderboard", "plism_cosine_median")}
        cols |= {f"plism_top10_{g}": {} for g in PLISM_TOP10_GROUPS}
        for model, part in s.groupby("model", sort=False) if len(s) else []:
            part = part.drop(columns="model")
            try:
                cols["plism_leaderboard"][model] = plism_bench.leaderboard_metric(part)
            except BenchmarkError as exc:
                log.warning("PLISM leaderboard of %r: %s", model, exc)
            cols["plism_cosine_median"][model] = _median(part, plism_bench.ALL, plism_bench.COSINE)
            for g in PLISM_TOP10_GROUPS:
                cols[f"plism_top10_{g}"][model] = _median(part, g, "top_10")
        for col, by_model in cols.items():
            board[col] = [by_model.get(m, np.nan) for m in order]

    if "hest" in summaries:
        s = summaries["hest"]
        means = _complete_mean(s, "pearson_mean", order) if len(s) else {}
        board["hest_pearson_mean"] = [means.get(m, np.nan) for m in order]

    if "probe" in summaries:
        s = summaries["probe"]
        for method in _probe_methods(s):
            rows = s[(s["method"] == method) & (s["metric"] == "balanced_accuracy")]
            means = _complete_mean(rows, "mean", order) if len(rows) else {}
            board[f"probe_balanced_accuracy_{method}"] = [means.get(m, np.nan) for m in order]

    if "mitosis" in summaries and len(summaries["mitosis"]):
        s = _mitosis_headline(summaries["mitosis"])
        keys = [k for k in MITOSIS_KEYS if k in s.columns]
        for key, part in s.groupby(keys, sort=False, dropna=False):
            key = key if isinstance(key, tuple) else (key,)
            by_model = dict(zip(part["model"], part["mean"], strict=True))
            board[_mitosis_column(key)] = [by_model.get(m, np.nan) for m in order]
    return board


def _median(summary: pd.DataFrame, group: str, metric: str) -> float:
    hit = summary[(summary["group"] == group) & (summary["metric"] == metric)]
    return float(hit["median"].iloc[0]) if len(hit) == 1 else np.nan


def _as_float(value: Any) -> float:
    try:
        return float(value) if value is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def _as_str(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _model_order(scores: Mapping[str, Mapping[str, Any]], models: Mapping[str, Any] | None) -> list[str]:
    order = [str(m) for m in (models or {})]
    for benchmark in BENCHMARKS:
        order += [str(m) for m in scores.get(benchmark, {})]
    return list(dict.fromkeys(order))


# ----------------------------------------------------------------------------------------------- figures


def _plism_k(metrics: set[str], preferred: int, pick) -> int | None:
    ks = sorted(int(m.removeprefix("top_")) for m in metrics if m.startswith("top_"))
    if not ks:
        return None
    return preferred if preferred in ks else pick(ks)


def _plism_has(summary: pd.DataFrame, pairs: list[tuple[str, str]]) -> list[str]:
    ok = []
    for model, part in summary.groupby("model", sort=False):
        if all(((part["group"] == g) & (part["metric"] == m)).sum() == 1 for g, m in pairs):
            ok.append(model)
    return ok


def _plism_figures(
    summary: pd.DataFrame, fig_dir: Path, colors: dict[str, str]
) -> list[tuple[bytes, str, str]]:
    """The two PLISM scatters over the models that have the rows each needs; notes for what was left out."""
    out = []
    metrics = set(summary["metric"])
    k1 = _plism_k(metrics, 5, max)
    k2 = _plism_k(metrics, 1, min)
    specs = []
    if k1 is not None:
        specs.append(
            (
                plism_bench.plot_topk_vs_cosine,
                {"k": k1},
                [(plism_bench.ALL, plism_bench.COSINE), (plism_bench.ALL, f"top_{k1}")],
                "plism_topk_vs_cosine.png",
                f"PLISM: median top-{k1} accuracy against median cosine similarity over all slide pairs "
                "(bars: 95% cluster-bootstrap CIs of the medians). Up and right is more robust.",
            )
        )
    if k2 is not None:
        specs.append(
            (
                plism_bench.plot_scanner_vs_staining,
                {"k": k2},
                [(plism_bench.INTER_SCANNER, f"top_{k2}"), (plism_bench.INTER_STAINING, f"top_{k2}")],
                "plism_scanner_vs_staining.png",
                f"PLISM: median top-{k2} accuracy across scanners (same staining) against across stainings "
                "(same scanner); dashed: equal robustness.",
            )
        )
    for plot, kwargs, needs, name, caption in specs:
        ok = _plism_has(summary, needs)
        left_out = [m for m in dict.fromkeys(summary["model"]) if m not in ok]
        if left_out:
            caption += (
                f" Not shown (no {', '.join(f'{g}/{m}' for g, m in needs)} scores): {', '.join(left_out)}."
            )
        if not ok:
            continue
        part = summary[summary["model"].isin(ok)]
        png = figures.plism_scatter(plot, part, fig_dir / name, colors, **kwargs)
        out.append((png, name, caption))
    return out


# ----------------------------------------------------------------------------------------------- sections


def _plism_section(summary: pd.DataFrame, order: list[str], figs: list[tuple[bytes, str, str]]) -> str:
    if summary.empty:
        return page.note("No PLISM scores.")
    models = order  # every model, so one absent from this benchmark shows as a column of "–"
    groups = [plism_bench.ALL, *plism_bench.PAIR_GROUPS]
    metrics = list(dict.fromkeys(summary["metric"]))
    ordered = summary.assign(
        _g=summary["group"].map({g: i for i, g in enumerate(groups)}).fillna(len(groups)),
        _m=summary["metric"].map({m: i for i, m in enumerate(metrics)}),
    ).sort_values(["_g", "_m"], kind="stable")
    pairs = ordered.groupby(["group", "model"], sort=False)["n_pairs"].first()
    body = "".join(page.figure(png, name, caption) for png, name, caption in figs)
    body += page.note(
        "Median over slide pairs [95% cluster-bootstrap CI, resampling slides], per pair group and metric. "
        "Leaderboard = mean of the medians of cosine (all pairs) and top-10 accuracy in the three "
        "inter-scanner/inter-staining groups. Pairs per group: "
        + "; ".join(f"{g}: {n}" for g, n in pairs.groupby(level=0, sort=False).max().items())
    )
    body += page.wide_table(
        ordered,
        ["group", "metric"],
        models,
        lambda r: page.fmt_ci(r["median"], r.get("median_ci_low"), r.get("median_ci_high")),
    )
    return body


def _hest_section(summary: pd.DataFrame, order: list[str], figs: list[tuple[bytes, str, str]]) -> str:
    if summary.empty:
        return page.note("No HEST scores.")
    models = order  # every model, so one absent from this benchmark shows as a column of "–"
    body = "".join(page.figure(png, name, caption) for png, name, caption in figs)
    body += page.note(
        "Pearson r between predicted and measured log1p expression, mean over the task's genes per fold; "
        "cells: mean ± std (ddof 0, as HEST) over folds. The last row is the mean over tasks, given only "
        "for a model that has every task."
    )
    means = _complete_mean(summary, "pearson_mean", models)
    mean_rows = pd.DataFrame(
        {"model": models, "task": hest_bench.MEAN + " over tasks", "pearson_mean": means.values()}
    )
    frame = pd.concat([summary.sort_values("task", kind="stable"), mean_rows], ignore_index=True)
    body += page.wide_table(
        frame.dropna(subset=["pearson_mean"]),
        ["task"],
        models,
        lambda r: page.fmt_pm(r["pearson_mean"], r.get("pearson_std")),
    )
    return body


def _probe_section(summary: pd.DataFrame, order: list[str], figs: list[tuple[bytes, str, str]]) -> str:
    if summary.empty:
        return page.note("No probe scores.")
    models = order  # every model, so one absent from this benchmark shows as a column of "–"
    body = "".join(page.figure(png, name, caption) for png, name, caption in figs)
    body += page.note(
        "Mean ± sample std over seeds (one run for deterministic methods), on the test split "
        "(on validation where a task has none)."
    )
    for metric in (*probe_bench.METRICS, "k"):
        rows = summary[summary["metric"] == metric]
        if rows.empty:
            continue
        methods = {m: i for i, m in enumerate(_probe_methods(summary))}
        rows = rows.assign(_m=rows["method"].map(methods)).sort_values(["task", "_m"], kind="stable")
        if metric == "k":
            title, cell = "k chosen on validation (k-NN)", lambda r: page.fmt(r["mean"], 0)
        else:
            title, cell = metric.replace("_", " "), lambda r: page.fmt_pm(r["mean"], r["std"])
        body += f"<h3>{page.esc(title)}</h3>" + page.wide_table(rows, ["task", "method"], models, cell)
    return body


def _mitosis_figures(summary: pd.DataFrame, fig_dir: Path) -> list[tuple[bytes, str, str]]:
    """The mitosis benchmark's own figures: scaling curves and the cross-domain AUROC heat maps."""
    from histodistill.bench import mitosis

    out = []
    for plot, name, caption in (
        (
            mitosis.plot_scaling,
            "mitosis_scaling.png",
            "Mitosis: test scores vs training data (mean ± std over runs).",
        ),
        (
            mitosis.plot_cross_domain,
            "mitosis_cross_domain.png",
            "Mitosis: single-source cross-domain AUROC (rows: training domain; diagonal: in-domain holdout).",
        ),
    ):
        try:
            plot(summary, fig_dir / name)
        except BenchmarkError as exc:  # e.g. one domain only: no cross-domain protocol
            log.info("no %s: %s", name, exc)
            continue
        out.append(((fig_dir / name).read_bytes(), name, caption))
    return out


def _mitosis_section(summary: pd.DataFrame, order: list[str], figs=()) -> str:
    if summary.empty:
        return page.note("No mitosis scores.")
    pictures = "".join(page.figure(png, name, caption) for png, name, caption in figs)
    models = order  # every model, so one absent from this benchmark shows as a column of "–"

    def cell(r: dict) -> str:
        return page.fmt_pm(r["mean"], r["std"])

    headline = _mitosis_headline(summary)
    keys = [k for k in MITOSIS_KEYS if k in headline.columns]
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


def _size_section(board: pd.DataFrame, models: Mapping[str, Mapping[str, Any]] | None) -> str:
    conventions = {str(v.get("flop_convention")) for v in (models or {}).values() if v.get("flop_convention")}
    rows = [
        [
            r.model,
            page.fmt(r.params_m, 1),
            page.fmt(r.gflops, 2),
            page.fmt(r.tiles_per_s, 1),
            page.fmt(r.device),
        ]
        for r in board.itertuples(index=False)
    ]
    body = page.table(["model", "params (M)", "GFLOPs @224", "tiles/s", "device"], rows)
    body += page.note(
        "GFLOPs of one 224 × 224 forward pass: "
        + ("; ".join(sorted(conventions)) if conventions else FLOP_CONVENTION)
        + ". Throughput (tiles/s) is passed in as measured by the pipeline on the device shown; – where not "
        "measured."
    )
    return body


def _provenance_block(
    config: Mapping[str, Any] | None, inputs: list[dict[str, Any]], run_hash: str | None, created: str
) -> str:
    versions = {**library_versions(), **_versions("pandas", "matplotlib", "scikit-learn")}
    items: list[tuple[str, Any]] = [
        ("created (UTC)", created),
        ("config hash", run_hash or "\u2013"),
        ("histodistill", __version__),
        ("libraries", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]
    for key in CONFIG_KEYS:
        found, value = _lookup(config or {}, key)
        if found:
            items.append((f"config: {key}", value))
    body = page.key_values(items)
    if inputs:
        rows = [
            [
                i["benchmark"],
                i["model"],
                i["file"],
                str(i["rows"]),
                i["config_hash"] or "\u2013",
                i["histodistill_version"] or "\u2013",
            ]
            for i in inputs
        ]
        body += page.details(
            f"score files ({len(inputs)})",
            page.table(["benchmark", "model", "file", "rows", "config hash", "histodistill"], rows, n_keys=3),
        )
    if config:
        body += page.details(
            "run config", page.pre(json.dumps(config, indent=1, sort_keys=True, default=str))
        )
    return body


def _lookup(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _leaderboard_labels(board: pd.DataFrame) -> dict[str, str]:
    labels = dict(LABELS)
    for col in board.columns:
        if col.startswith("probe_balanced_accuracy_"):
            labels[col] = f"probe bal. acc. ({col.removeprefix('probe_balanced_accuracy_')}, mean over tasks)"
        elif col.startswith("mitosis_"):
            labels[col] = "mitosis " + col.removeprefix("mitosis_").replace("_", " ")
    return labels


# ----------------------------------------------------------------------------------------------- entry point


def build_report(
    scores: dict[str, dict[str, str | Path]],
    out_dir: str | Path,
    models: dict[str, dict] | None = None,
    config: dict | None = None,
    title: str = "histodistill benchmarks",
    n_boot: int = plism_bench.N_BOOT,
) -> pd.DataFrame:
    """Write `out_dir/leaderboard.parquet`, `out_dir/figures/*.png` and `out_dir/index.html`; return the board.

    `scores[benchmark][model]` is that model's tidy score file; `models[model]` holds params_m, gflops,
    tiles_per_s and device (see `model_profile`); `config` is the run's config, hashed into the provenance;
    `n_boot` is the number of cluster-bootstrap replicates of the PLISM CIs (benchmarks.plism.n_boot).
    """
    out_dir = Path(out_dir)
    scores = {str(b): dict(v) for b, v in (scores or {}).items()}
    order = _model_order(scores, models)
    colors = figures.model_colors(order)
    summaries, inputs = summarize_benchmarks(scores, n_boot)
    board = leaderboard(summaries, models, order)
    run_hash = config_hash(config) if config is not None else None
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    figs: dict[str, list[tuple[bytes, str, str]]] = {b: [] for b in BENCHMARKS}
    with atomic_path(out_dir / "figures") as fig_dir:
        fig_dir.mkdir(parents=True)
        if len(summaries.get("plism", [])):
            figs["plism"] = _plism_figures(summaries["plism"], fig_dir, colors)
        if len(summaries.get("hest", [])):
            png = figures.hest_bars(summaries["hest"], colors)
            figures.write_png(png, fig_dir / "hest_pearson.png")
            figs["hest"].append(
                (
                    png,
                    "hest_pearson.png",
                    "HEST: per task, mean Pearson r over folds (error bars: std over folds).",
                )
            )
        probe = summaries.get("probe")
        if probe is not None and "metric" in probe.columns and (probe["metric"] == "balanced_accuracy").any():
            methods = [m for m in _probe_methods(probe) if not m.startswith("knn_k")]  # not every k
            png = figures.probe_bars(probe, colors, methods=methods)
            figures.write_png(png, fig_dir / "probe_balanced_accuracy.png")
            figs["probe"].append(
                (
                    png,
                    "probe_balanced_accuracy.png",
                    "Probes: per task and method, balanced accuracy (error bars: std over seeds).",
                )
            )

        mitosis = summaries.get("mitosis")
        if mitosis is not None and len(mitosis) and {"protocol", "mean", "std"} <= set(mitosis.columns):
            figs["mitosis"] = _mitosis_figures(mitosis, fig_dir)

    params = {
        "config_hash": run_hash,
        "inputs": {
            b: {
                m: next((i["config_hash"] for i in inputs if i["benchmark"] == b and i["model"] == m), None)
                for m in v
            }
            for b, v in scores.items()
        },
        "models": models or {},
        "n_boot": n_boot,
        "boot_seed": BOOT_SEED,
    }
    meta = provenance(params, artifact="leaderboard", created=created)
    write_parquet(board, out_dir / "leaderboard.parquet", meta)

    labels = _leaderboard_labels(board)
    shown = board.drop(columns=["gflops", "tiles_per_s", "device"])
    higher_better = {c for c in shown.columns if c not in ("model", *MODEL_COLUMNS)}
    lead = page.model_legend(colors) + page.leaderboard_table(shown, labels, higher_better)
    lead += page.note(
        "Bold: best per column. –: no scores (for a mean over tasks: at least one task missing)."
    )
    sections = [("provenance", "Run provenance", _provenance_block(config, inputs, run_hash, created))]
    sections.append(("leaderboard", "Leaderboard", lead))
    if "plism" in summaries:
        sections.append(
            ("plism", "PLISM robustness", _plism_section(summaries["plism"], order, figs["plism"]))
        )
    if "hest" in summaries:
        sections.append(
            ("hest", "HEST gene expression", _hest_section(summaries["hest"], order, figs["hest"]))
        )
    if "probe" in summaries:
        sections.append(
            ("probe", "Classification probes", _probe_section(summaries["probe"], order, figs["probe"]))
        )
    if "mitosis" in summaries:
        sections.append(
            ("mitosis", "Mitosis", _mitosis_section(summaries["mitosis"], order, figs["mitosis"]))
        )
    sections.append(("size", "Model size", _size_section(board, models)))
    document = page.page(title, sections)
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(document, encoding="utf-8")
    log.info("report: %d models, benchmarks %s → %s", len(order), sorted(summaries), out_dir / "index.html")
    return board


def run(
    score_files: list[str | Path],
    embedding_stores: list[str | Path],
    out_dir: str | Path,
    *,
    benchmarks: list[str],
    models: list[str],
    students: Mapping[str, str | None] | None = None,
    config: dict | None = None,
    n_boot: int = plism_bench.N_BOOT,
) -> pd.DataFrame:
    """The report of a workflow run: `build_report` with each model's size and measured throughput.

    `score_files`: `<benchmark>/<model>.parquet` paths (the directory names the benchmark, the stem the
    model); `benchmarks`: every enabled benchmark (one with no file shows as absent); `models[i]` and
    `embedding_stores[i]`: a model and one of its embedding stores, whose attributes give `tiles_per_s` and
    `throughput_device`. A distilled student `student-<run>` is profiled as its run's architecture
    (`students[run]`); `n_boot`: replicates of the PLISM CIs. Writes `out_dir/{leaderboard.parquet,figures/,index.html}`; returns the leaderboard.
    Raises ReportError when a score file's directory is not one of `benchmarks` or the two model lists
    differ in length.
    """
    from histodistill.embed import EmbeddingStore
    from histodistill.models.ref import ModelRef

    if len(models) != len(embedding_stores):
        raise ReportError(f"{len(models)} model(s) but {len(embedding_stores)} embedding store(s)")
    scores: dict[str, dict[str, Path]] = {b: {} for b in benchmarks}
    for path in map(Path, score_files):
        if path.parent.name not in scores:
            raise ReportError(f"score file {path}: benchmark {path.parent.name!r} is not one of {benchmarks}")
        scores[path.parent.name][path.stem] = path
    students = students or {}
    profiles = {}
    for model, emb_path in zip(models, embedding_stores, strict=True):
        # a distilled student has its run's architecture; its size is that of the architecture
        ref = ModelRef.parse(model)
        arch = students.get(ref.run, model) if ref.is_student else model
        attrs = EmbeddingStore(emb_path).attrs
        profiles[model] = {
            **model_profile(arch),
            "tiles_per_s": attrs.get("tiles_per_s"),
            "device": attrs.get("throughput_device"),
        }
    return build_report(scores, out_dir, models=profiles, config=config, n_boot=n_boot)
