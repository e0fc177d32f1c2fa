"""The benchmark registry: a new benchmark is one module, and the report picks it up with no other edit."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

import histodistill.bench as bench_package
from histodistill.bench.registry import Benchmark, benchmarks, by_model, complete_mean
from histodistill.report import ReportError, build_report

TOY_MODULE = '''
"""A toy benchmark: one score per task; its headline is the mean over tasks."""

import pandas as pd

from histodistill.bench.registry import Benchmark, by_model, complete_mean


def _summarize(frame):
    return frame.groupby("task", as_index=False)["value"].mean()


def _headline(summary, models):
    return by_model({"toy_mean": complete_mean(summary, "value", models)}, models)


def _section(summary, models, figures):
    from histodistill.report import html as page

    return page.wide_table(summary, ["task"], list(models), lambda r: page.fmt(r["value"]))


BENCHMARK = Benchmark(
    name="toy",
    title="Toy benchmark",
    order=99,
    columns=frozenset({"task", "value"}),
    summarize=_summarize,
    headline=_headline,
    section=_section,
    labels={"toy_mean": "toy score (mean over tasks)"},
)
'''


def test_the_declared_benchmarks_in_report_order():
    found = benchmarks()
    assert list(found) == [
        "plism",
        "hest",
        "probe",
        "slide",
        "segmentation",
        "eva",
        "mitosis",
        "scorenet",
        "slpd",
    ]
    assert all(isinstance(b, Benchmark) for b in found.values())
    rules = {b.rule for b in found.values() if b.derive is None}
    assert rules == {
        "score_plism",
        "score_hest",
        "score_probe",
        "score_segmentation",
        "score_slide",
        "score_mitosis",
        "score_slpd",
        "score_scorenet",
    }
    assert found["eva"].rule is None  # derived from the others' summaries: no rule, no score files


@pytest.fixture
def toy_benchmark(tmp_path, monkeypatch):
    """A benchmark module dropped into the package's search path, as a new bench/toy.py would be."""
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.setattr(bench_package, "__path__", [*bench_package.__path__, str(tmp_path)])
    benchmarks.cache_clear()
    yield
    benchmarks.cache_clear()


def test_a_new_benchmark_module_reaches_the_leaderboard_and_the_page(toy_benchmark, tmp_path):
    assert list(benchmarks())[-1] == "toy"
    scores = {}
    for model, values in {"a": [0.2, 0.4], "b": [0.9]}.items():
        path = tmp_path / f"{model}.parquet"
        pd.DataFrame({"task": ["t1", "t2"][: len(values)], "value": values}).to_parquet(path)
        scores[model] = path
    board = build_report({"toy": scores}, tmp_path / "report")
    row = board.set_index("model")["toy_mean"]
    assert row["a"] == pytest.approx(0.3)
    assert np.isnan(row["b"])  # a task missing: no mean over tasks
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Toy benchmark" in page and "toy score (mean over tasks)" in page


def test_a_score_file_without_the_declared_columns_is_an_error_naming_it(toy_benchmark, tmp_path):
    path = tmp_path / "a.parquet"
    pd.DataFrame({"task": ["t1"]}).to_parquet(path)
    with pytest.raises(ReportError, match=r"toy scores of model 'a'.*lacks column\(s\) \['value'\]"):
        build_report({"toy": {"a": path}}, tmp_path / "report")


def test_an_unknown_benchmark_is_an_error_listing_the_known_ones(tmp_path):
    with pytest.raises(ReportError, match=r"unknown benchmark\(s\) \['nope'\].*plism"):
        build_report({"nope": {"a": tmp_path / "a.parquet"}}, tmp_path / "report")


def test_complete_mean_needs_every_task_and_by_model_keeps_the_order():
    frame = pd.DataFrame({"model": ["a", "a", "b"], "task": ["x", "y", "x"], "v": [1.0, 3.0, 5.0]})
    means = complete_mean(frame, "v", ["b", "a", "c"])
    assert means["a"] == 2.0 and np.isnan(means["b"]) and np.isnan(means["c"])
    board = by_model({"t_v": means}, ["c", "a"])
    assert list(board.index) == ["c", "a"] and board.loc["a", "t_v"] == 2.0
