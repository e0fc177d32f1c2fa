"""The benchmark registry: every benchmark module declares itself once, and the report iterates over them.

A benchmark is one module (or package) under `histodistill.bench` that defines `BENCHMARK = Benchmark(...)`,
plus its `score_<name>` rule, which writes one tidy Parquet file per model
(`benchmarks/<name>/<model>.parquet`). The declaration says what the report needs and nothing else:

- `columns`: the tidy columns a score file must have;
- `summarize(frame, **settings)`: one model's tidy rows → its summary rows (the published protocol's
  statistics; `settings` are the report's settings of that benchmark, e.g. PLISM's `n_boot`);
- `headline(summary, models)`: every model's summary (a `model` column first) → the leaderboard's columns of
  this benchmark (each named `<name>_…`), one row per model in `models` order (NaN where a model has no
  number);
- `labels`: the leaderboard column titles (a mapping, or a function of the column name);
- `unranked(column)`: True for a leaderboard column that is not a score (higher is not better: a count, a
  diagnostic such as PLISM's unmatched cosine), which the report never marks best;
- `figures(summary, fig_dir, colors)`: its figures (PNG bytes, file name, caption), drawn with the report's
  model colors;
- `section(summary, models, figures)`: the HTML of its report section;
- `errors(summary, models)`: the standard error of each headline number, in `headline`'s layout (NaN where
  the protocol gives none), from the benchmark's own statistics (a null standard error of the test set, or
  the spread over folds or runs; each benchmark's docstring says which); the report's distillation section
  uses it to tell a teacher − random-init gap from noise;
- `flags(summary, models)`: models whose numbers say they are collapsed or uninformative, with the reason;
  the report marks them and never shows them as best;
- `eva_scores(summary)`: the benchmark's numbers of EVA tasks (rows model, task, value: the EVA
  leaderboard's metric, mean over runs), which the derived `eva` benchmark averages
  (`histodistill.bench.eva`); a task counts when it is named as EVA's;
- `derive(summaries)`: a *derived* benchmark has no rule and no score files: its summary is computed from
  the other benchmarks' summaries ({name: summary}), after them (e.g. the EVA average).

`benchmarks()` finds the declarations by importing every module of the package, so adding a benchmark
touches no list here or in the report.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Figure:
    """One report figure: PNG bytes, its file name under `figures/`, and its caption."""

    png: bytes
    name: str
    caption: str


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    """What the report needs of one benchmark (see the module docstring). `order` sorts the sections."""

    name: str
    title: str
    order: int
    columns: frozenset[str]
    summarize: Callable[..., pd.DataFrame]
    headline: Callable[[pd.DataFrame, Sequence[str]], pd.DataFrame]
    section: Callable[[pd.DataFrame, Sequence[str], Sequence[Figure]], str]
    figures: Callable[[pd.DataFrame, Path, Mapping[str, str]], list[Figure]] | None = None
    labels: Mapping[str, str] | Callable[[str], str] = field(default_factory=dict)
    model_rows: Callable[[pd.DataFrame, str, Path], pd.DataFrame] | None = None  # one model's rows of a file
    flags: Callable[[pd.DataFrame, Sequence[str]], dict[str, str]] | None = None
    errors: Callable[[pd.DataFrame, Sequence[str]], pd.DataFrame] | None = None
    unranked: Callable[[str], bool] = field(default=lambda column: False)
    eva_scores: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    derive: Callable[[Mapping[str, pd.DataFrame]], pd.DataFrame] | None = None

    @property
    def rule(self) -> str | None:
        """The Snakemake rule that writes `benchmarks/<name>/<model>.parquet` (None for a derived one)."""
        return None if self.derive is not None else f"score_{self.name}"

    def label(self, column: str) -> str:
        """The leaderboard title of one of this benchmark's columns."""
        if callable(self.labels):
            return self.labels(column)
        return self.labels.get(column, column.replace("_", " "))


@cache
def benchmarks() -> dict[str, Benchmark]:
    """Every declared benchmark by name, in report order. Raises ValueError on two with one name."""
    import histodistill.bench as package

    found: dict[str, Benchmark] = {}
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        declared = getattr(importlib.import_module(info.name), "BENCHMARK", None)
        if isinstance(declared, Benchmark):
            if declared.name in found:
                raise ValueError(f"two benchmarks are called {declared.name!r} ({info.name})")
            found[declared.name] = declared
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


def complete_mean(frame: pd.DataFrame, value: str, models: Sequence[str]) -> dict[str, float]:
    """Per model the mean of `value` over the tasks in `frame`, NaN unless the model has every task.

    A mean over fewer tasks than the others have would not be comparable with theirs.
    """
    tasks = set(frame["task"]) if len(frame) else set()
    out = {}
    for model in models:
        own = frame[frame["model"] == model] if len(frame) else frame
        out[model] = float(own[value].mean()) if tasks and set(own["task"]) >= tasks else np.nan
    return out


def complete_mean_se(frame: pd.DataFrame, se: str, models: Sequence[str]) -> dict[str, float]:
    """Per model the standard error of `complete_mean` over the tasks in `frame`, from each task's standard
    error in column `se`: sqrt(Σ_t se_t²) / T (tasks scored on independent test sets); NaN unless the model
    has every task, or when a task's standard error is missing."""
    tasks = set(frame["task"]) if len(frame) else set()
    out = {}
    for model in models:
        own = frame[frame["model"] == model] if len(frame) else frame
        values = own[se].to_numpy(dtype=float) if len(own) else np.array([])
        complete = tasks and set(own["task"]) >= tasks and np.isfinite(values).all()
        out[model] = float(np.sqrt(np.sum(values**2)) / len(values)) if complete else np.nan
    return out


def with_mean_over_tasks(frame: pd.DataFrame, value: str, models: Sequence[str]) -> pd.DataFrame:
    """`frame` (rows: model, task, `value`, …) sorted by task, plus a row "mean over tasks" per model
    (`complete_mean`: only for a model that has every task); rows without `value` dropped. For a report
    section's per-task table."""
    means = complete_mean(frame, value, models)
    mean_rows = pd.DataFrame({"model": list(models), "task": "mean over tasks", value: list(means.values())})
    frame = pd.concat([frame.sort_values("task", kind="stable"), mean_rows], ignore_index=True)
    return frame.dropna(subset=[value])


def by_model(columns: Mapping[str, Mapping[str, float]], models: Sequence[str]) -> pd.DataFrame:
    """Leaderboard columns {column: {model: value}} → a frame with one row per model (NaN where absent)."""
    return pd.DataFrame(
        {col: [float(values.get(m, np.nan)) for m in models] for col, values in columns.items()},
        index=pd.Index(list(models), name="model"),
    )
