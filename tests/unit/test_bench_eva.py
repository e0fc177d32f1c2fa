"""The EVA leaderboard: its average over all tasks but BACH, on hand-made numbers, and its place in the report."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

import histodistill.bench as bench_package
from histodistill.bench import BenchmarkError
from histodistill.bench.eva import AVERAGED, EVA_TASKS, collect, eva_average
from histodistill.bench.registry import benchmarks
from histodistill.report import build_report

# model a has all 8 tasks; b lacks MoNuSAC; c has only BACH
TABLE = pd.DataFrame(
    [
        ("a", "bach", 0.10),  # not averaged: a low BACH must not move the average
        ("a", "crc", 0.95),
        ("a", "mhist", 0.80),
        ("a", "pcam", 0.90),
        ("a", "camelyon16_small", 0.85),
        ("a", "panda_small", 0.60),
        ("a", "consep", 0.65),
        ("a", "monusac", 0.70),
        ("b", "crc", 0.90),
        ("b", "mhist", 0.70),
        ("b", "pcam", 0.80),
        ("b", "camelyon16_small", 0.75),
        ("b", "panda_small", 0.50),
        ("b", "consep", 0.60),
        ("c", "bach", 0.99),
    ],
    columns=["model", "task", "value"],
)


def test_the_average_is_over_the_seven_tasks_but_bach():
    assert list(EVA_TASKS) == [
        "bach",
        "crc",
        "mhist",
        "pcam",
        "camelyon16_small",
        "panda_small",
        "consep",
        "monusac",
    ]
    assert AVERAGED == ("crc", "mhist", "pcam", "camelyon16_small", "panda_small", "consep", "monusac")
    out = eva_average(TABLE, ["a", "b", "c", "d"])
    # (0.95 + 0.80 + 0.90 + 0.85 + 0.60 + 0.65 + 0.70) / 7 = 5.45 / 7
    assert out.loc["a", "average"] == pytest.approx(5.45 / 7) and out.loc["a", "missing"] == ""
    assert out.loc["a", "n_tasks"] == 7


def test_a_missing_task_leaves_no_average_and_is_named():
    out = eva_average(TABLE, ["b", "c", "d"])
    assert np.isnan(out.loc["b", "average"])  # not the mean of the 6 it has (0.708…)
    assert out.loc["b", "n_tasks"] == 6 and out.loc["b", "missing"] == "monusac"
    assert np.isnan(out.loc["c", "average"]) and out.loc["c", "n_tasks"] == 0
    assert out.loc["d", "missing"] == ", ".join(AVERAGED)  # a model with no EVA numbers at all
    nan_score = TABLE.copy()
    nan_score.loc[(nan_score.model == "a") & (nan_score.task == "crc"), "value"] = np.nan
    assert eva_average(nan_score, ["a"]).loc["a", "missing"] == "crc"  # a NaN score counts as missing


def _summary(rows, method):
    return pd.DataFrame(
        [(m, t, method, "balanced_accuracy", v, 0.01, 5) for m, t, v in rows],
        columns=["model", "task", "method", "metric", "mean", "std", "n"],
    )


def test_collect_takes_each_benchmarks_eva_tasks_only():
    probe = pd.concat(
        [
            _summary([("a", "crc", 0.95), ("a", "demo_tissue", 0.5), ("a", "bach", 0.1)], "linear"),
            _summary([("a", "crc", 0.2)], "knn"),  # EVA's patch tasks are its linear probe
        ]
    )
    slide = _summary([("a", "panda_small", 0.6), ("a", "camelyon16_small", 0.85)], "abmil")
    table = collect({"probe": probe, "slide": slide})
    assert table.values.tolist() == [
        ["a", "bach", 0.1],
        ["a", "crc", 0.95],
        ["a", "camelyon16_small", 0.85],
        ["a", "panda_small", 0.6],
    ]
    assert collect({}).empty
    twice = _summary([("a", "crc", 0.9)], "abmil")  # a slide task named as a patch task
    with pytest.raises(
        BenchmarkError, match=r"EVA task 'crc' of model 'a' is scored by \['probe', 'slide'\]"
    ):
        collect({"probe": probe, "slide": twice})


SEGMENTATION = '''
"""A stand-in for the segmentation benchmark: it declares its EVA numbers (Dice) and nothing else."""

import pandas as pd

from histodistill.bench.registry import Benchmark, by_model

BENCHMARK = Benchmark(
    name="toyseg",
    title="Toy segmentation",
    order=36,
    columns=frozenset({"task", "dice"}),
    summarize=lambda frame: frame.groupby("task", as_index=False)["dice"].mean(),
    headline=lambda summary, models: by_model({}, models),
    section=lambda summary, models, figures: "",
    eva_scores=lambda summary: summary.rename(columns={"dice": "value"})[["model", "task", "value"]],
)
'''


@pytest.fixture
def toy_segmentation(tmp_path, monkeypatch):
    (tmp_path / "toyseg.py").write_text(textwrap.dedent(SEGMENTATION))
    monkeypatch.setattr(bench_package, "__path__", [*bench_package.__path__, str(tmp_path)])
    benchmarks.cache_clear()
    yield
    benchmarks.cache_clear()


def _tidy(path, rows, method):
    frame = pd.DataFrame(
        [
            (task, method, seed, "balanced_accuracy", value)
            for task, values in rows.items()
            for seed, value in enumerate(values)
        ],
        columns=["task", "method", "seed", "metric", "value"],
    )
    frame.to_parquet(path)
    return path


def test_the_report_shows_the_average_once_segmentation_declares_its_dice(toy_segmentation, tmp_path):
    scores: dict[str, dict] = {"probe": {}, "slide": {}, "toyseg": {}}
    for model, monusac in (("a", [0.7, 0.7]), ("b", [])):
        scores["probe"][model] = _tidy(
            tmp_path / f"probe_{model}.parquet",
            {"bach": [0.1], "crc": [0.9, 1.0], "mhist": [0.8], "pcam": [0.9]},  # crc: mean over runs 0.95
            "linear",
        )
        scores["slide"][model] = _tidy(
            tmp_path / f"slide_{model}.parquet",
            {"camelyon16_small": [0.8, 0.9], "panda_small": [0.6]},
            "abmil",
        )
        seg = pd.DataFrame({"task": ["consep"] + ["monusac"] * len(monusac), "dice": [0.65, *monusac]})
        seg.to_parquet(tmp_path / f"seg_{model}.parquet")
        scores["toyseg"][model] = tmp_path / f"seg_{model}.parquet"
    board = build_report(scores, tmp_path / "report").set_index("model")
    assert board.loc["a", "eva_average"] == pytest.approx(5.45 / 7)
    assert np.isnan(board.loc["b", "eva_average"])
    page = (tmp_path / "report" / "index.html").read_text()
    assert "EVA leaderboard" in page and "EVA average (7 tasks, no BACH)" in page
    assert "tasks missing from the average" in page and "<td>monusac</td>" in page
