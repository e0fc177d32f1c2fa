"""The EVA leaderboard: EVA's 8 pathology tasks side by side and their average over all tasks but BACH.

H0-mini's Table 2 (Filiot et al. 2025) reports the EVA benchmark of kaiko-ai/eva: 4 patch classification
tasks (BACH, CRC, MHIST, PCam: linear probe, `histodistill.bench.probe`), 2 slide-level tasks
(Camelyon16-small, PANDA-small: ABMIL, `histodistill.bench.slide`) and 2 segmentation tasks (CoNSeP,
MoNuSAC: Dice). EVA's leaderboard (`docs/leaderboards.md` L11 at eva commit 73b61a79) reports balanced
accuracy for the classification tasks and the Dice score without background for segmentation, each the
mean over its runs, and ranks the models by "the average performance across all tasks, excluding BACH
(not comparable due to uncommon MPP after resizing)"; that average (of the 7 other tasks, equal weights,
the 0-1 scores) is `eva_average`.

This is a *derived* benchmark (no rule, no score files): its summary is built from the other benchmarks'
summaries, each of which declares its EVA numbers (`Benchmark.eva_scores`: rows model, task, value). A
task counts when it is named as EVA's (the keys of `EVA_TASKS`, as configs/h0mini.yaml names them). A
model missing any of the 7 averaged tasks gets no average (NaN, "–" on the page) and the section names the
missing tasks: an average over fewer tasks would not be comparable. Segmentation enters once a
segmentation benchmark declares `eva_scores` for `consep` and `monusac`; until then the average is
missing, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.registry import Benchmark, benchmarks, by_model


@dataclass(frozen=True)
class EvaTask:
    title: str
    kind: str  # patch, slide or segmentation
    metric: str  # the leaderboard's metric
    averaged: bool = True  # in the leaderboard's average (all but BACH)


EVA_TASKS: dict[str, EvaTask] = {
    "bach": EvaTask("BACH", "patch", "balanced accuracy", averaged=False),
    "crc": EvaTask("CRC", "patch", "balanced accuracy"),
    "mhist": EvaTask("MHIST", "patch", "balanced accuracy"),
    "pcam": EvaTask("PCam", "patch", "balanced accuracy"),
    "camelyon16_small": EvaTask("Camelyon16-small", "slide", "balanced accuracy"),
    "panda_small": EvaTask("PANDA-small", "slide", "balanced accuracy"),
    "consep": EvaTask("CoNSeP", "segmentation", "Dice (no background)"),
    "monusac": EvaTask("MoNuSAC", "segmentation", "Dice (no background)"),
}
AVERAGED = tuple(name for name, task in EVA_TASKS.items() if task.averaged)
COLUMNS = ["model", "task", "value"]


def collect(summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every benchmark's EVA numbers (`eva_scores`) as rows model, task, value, EVA tasks only, in
    `EVA_TASKS` order. Raises BenchmarkError when two benchmarks give one model's task."""
    parts = []
    for name, bench in benchmarks().items():
        summary = summaries.get(name)
        if bench.eva_scores is None or summary is None or summary.empty:
            continue
        part = bench.eva_scores(summary)[COLUMNS]
        parts.append(part[part["task"].isin(list(EVA_TASKS))].assign(_from=name))
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    twice = table[table.duplicated(["model", "task"], keep=False)]
    if len(twice):
        row = twice.iloc[0]
        sources = sorted(twice.loc[(twice.model == row.model) & (twice.task == row.task), "_from"])
        raise BenchmarkError(f"EVA task {row.task!r} of model {row.model!r} is scored by {sources}; keep one")
    order = {t: i for i, t in enumerate(EVA_TASKS)}
    table = table.sort_values("task", key=lambda s: s.map(order), kind="stable")
    return table[COLUMNS].reset_index(drop=True)


def eva_average(table: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Per model (index, in `models` order): `average` over the `AVERAGED` tasks (all but BACH) when every
    one has a finite value, else NaN; `n_tasks` (how many of them it has) and `missing` (their names,
    comma-separated; "" when none)."""
    out = []
    for model in models:
        own = table[table["model"] == model] if len(table) else table
        values = {t: float(v) for t, v in zip(own["task"], own["value"], strict=True) if np.isfinite(v)}
        missing = [t for t in AVERAGED if t not in values]
        average = float(np.mean([values[t] for t in AVERAGED])) if not missing else np.nan
        out.append((model, average, len(AVERAGED) - len(missing), ", ".join(missing)))
    return pd.DataFrame(out, columns=["model", "average", "n_tasks", "missing"]).set_index("model")


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    return by_model({"eva_average": eva_average(summary, models)["average"].to_dict()}, models)


def _section(summary: pd.DataFrame, models: Sequence[str], figs) -> str:
    from histodistill.report import html as page

    models = list(models)
    rows = [
        [f"{task.title} ({task.metric}{'' if task.averaged else '; not averaged'})"]
        + [page.fmt(_value(summary, m, name)) for m in models]
        for name, task in EVA_TASKS.items()
    ]
    avg = eva_average(summary, models)
    rows.append(
        [f"average of {len(AVERAGED)} tasks (all but BACH)"]
        + [page.fmt(avg.loc[m, "average"]) for m in models]
    )
    rows.append(["tasks missing from the average"] + [avg.loc[m, "missing"] or "none" for m in models])
    body = page.note(
        "EVA's leaderboard numbers (mean over runs; scores in 0-1): balanced accuracy for classification, "
        "Dice without background for segmentation. Its ranking average leaves BACH out (EVA: not comparable "
        "due to its uncommon µm/px after resizing), as H0-mini's Table 2. A model missing any averaged task "
        "has no average (–): an average over fewer tasks would not be comparable."
    )
    return body + page.table(["task", *models], rows, n_keys=1)


def _value(summary: pd.DataFrame, model: str, task: str) -> float:
    hit = summary[(summary["model"] == model) & (summary["task"] == task)]["value"]
    return float(hit.iloc[0]) if len(hit) else np.nan


BENCHMARK = Benchmark(
    name="eva",
    title="EVA leaderboard",
    order=38,
    columns=frozenset(COLUMNS),
    summarize=lambda frame: frame,
    headline=_headline,
    section=_section,
    labels={"eva_average": "EVA average (7 tasks, no BACH)"},
    derive=collect,
)
