"""Recovery only where the teacher − random-init gap exceeds noise: each benchmark's standard errors of its
headline numbers (`Benchmark.errors`) and the distillation table's test (`report.distillation`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from histodistill.bench import probe
from histodistill.bench.chance import CHANCE, CHANCE_SE, chance_metrics
from histodistill.bench.registry import benchmarks, complete_mean_se
from histodistill.provenance import read_parquet
from histodistill.report import error_board
from histodistill.report.distillation import GAP_Z, DistillationRoles, gap_resolved, recovery_table
from tests.unit.test_report import find_table, hest_rows, probe_rows, write_tidy
from tests.unit.test_report_distillation import BASELINE, HEST, TEACHER, _stores

MODELS = [TEACHER, BASELINE, "student-dino"]


def test_gap_resolved_is_a_one_sided_z_test_on_independent_errors():
    se = math.hypot(0.03, 0.04)  # 0.05
    assert gap_resolved(GAP_Z * 0.05 + 1e-6, 0.03, 0.04) == (pytest.approx(se), True)
    assert gap_resolved(GAP_Z * 0.05 - 1e-6, 0.03, 0.04) == (pytest.approx(se), False)
    assert gap_resolved(-0.5, 0.03, 0.04)[1] is False  # the teacher is worse: nothing to recover
    assert gap_resolved(0.5, float("nan"), 0.04)[1] is None  # no standard error: not judged
    assert gap_resolved(float("nan"), 0.03, 0.04)[1] is None


def test_recovery_table_drops_a_ratio_over_noise_and_keeps_an_untested_one():
    board = pd.DataFrame(
        {"model": MODELS, "a": [0.70, 0.50, 0.65], "b": [0.52, 0.50, 0.60], "c": [0.52, 0.50, 0.60]}
    )
    errors = pd.DataFrame({"model": MODELS, "a": [0.02] * 3, "b": [0.02] * 3})  # no "c" errors
    who = DistillationRoles(TEACHER, {"student-dino": BASELINE})
    table = recovery_table(board, ["a", "b", "c"], who, errors).set_index("column")
    # a: gap 0.20 > 1.645 × 0.0283: resolved, recovery (0.65 − 0.5) / 0.2
    assert bool(table.at["a", "resolved"]) and table.at["a", "recovery"] == pytest.approx(0.75)
    assert table.at["a", "gap_se"] == pytest.approx(math.hypot(0.02, 0.02))
    # b: gap 0.02 within noise: no ratio (it would read 5.0)
    assert not bool(table.at["b", "resolved"]) and math.isnan(table.at["b", "recovery"])
    # c: the same numbers without a standard error: shown, not judged
    assert pd.isna(table.at["c", "resolved"]) and table.at["c", "recovery"] == pytest.approx(5.0)


def test_complete_mean_se_combines_independent_tasks_and_needs_every_task():
    frame = pd.DataFrame(
        {"model": ["m", "m", "n"], "task": ["t1", "t2", "t1"], "se": [0.03, 0.04, 0.03]},
    )
    got = complete_mean_se(frame, "se", ["m", "n"])
    assert got["m"] == pytest.approx(0.05 / 2) and math.isnan(got["n"])  # n lacks t2


def test_probe_folds_record_the_null_error_of_their_mean():
    # three folds with disjoint test sets of 40/40/40, 30/30/30 and 20/20/20 items of 3 classes
    folds = []
    ses = []
    for n in (40, 30, 20):
        se = chance_metrics(np.repeat([0, 1, 2], n))[CHANCE_SE]
        ses.append(se)
        folds.append(
            pd.DataFrame(
                [
                    ("t", m, 0, metric, v)
                    for m in ("linear", "knn")
                    for metric, v in ((CHANCE_SE, se), (CHANCE, 1 / 3))
                ],
                columns=["task", "method", "seed", "metric", "value"],
            )
        )
    out = probe.fold_mean_chance_se(folds)
    expected = math.sqrt(sum(s * s for s in ses)) / 3
    assert np.allclose(out.loc[out["metric"] == CHANCE_SE, "value"], expected)
    assert (out.loc[out["metric"] == CHANCE, "value"] == 1 / 3).all() and len(out) == 12
    assert probe.fold_mean_chance_se(folds[:1]) is folds[0]  # one fold: as scored


def test_benchmark_errors_by_hand():
    bench = benchmarks()
    # HEST: std (ddof 0) over k folds / sqrt(k − 1) = sample std / √k
    summary = pd.DataFrame(
        {"model": ["m"], "task": ["t"], "pearson_mean": [0.5], "pearson_std": [0.1], "n_folds": [5]}
    )
    got = bench["hest"].errors(summary, ["m"])
    sample_std = 0.1 * math.sqrt(5 / 4)
    assert got.at["m", "hest_pearson_mean"] == pytest.approx(sample_std / math.sqrt(5))
    one_fold = summary.assign(n_folds=1)
    assert math.isnan(bench["hest"].errors(one_fold, ["m"]).at["m", "hest_pearson_mean"])
    # SLPD: k-NN accuracy over 4 folds, sample std / √4
    summary = pd.DataFrame(
        {"model": "m", "task": "t", "variant": ["slpd", "dino"], "method": "knn", "metric": "accuracy"}
    ).assign(mean=0.8, std=[0.1, 0.2], n_folds=4)
    got = bench["slpd"].errors(summary, ["m"])
    assert got.at["m", "slpd_slpd_knn_accuracy"] == pytest.approx(0.05)
    assert got.at["m", "slpd_dino_knn_accuracy"] == pytest.approx(0.1)
    # slide: ABMIL balanced accuracy's recorded null SE, two tasks combined
    summary = pd.DataFrame(
        {"model": "m", "task": ["t1", "t2"], "method": "abmil", "metric": CHANCE_SE, "mean": [0.06, 0.08]}
    )
    got = bench["slide"].errors(summary, ["m"])
    assert got.at["m", "slide_balanced_accuracy"] == pytest.approx(0.05)
    # mitosis: balanced accuracy's null SE; a binary AUROC's is √(4/3) of it (Hanley & McNeil 1982)
    rows = [
        ("linear_probe", "scaling", 1.0, "all", "all", metric, v)
        for metric, v in (
            ("balanced_accuracy", 0.6),
            ("auroc", 0.7),
            ("f1_weighted", 0.6),
            (CHANCE, 0.5),
            (CHANCE_SE, 0.05),
        )
    ]
    summary = pd.DataFrame(
        rows, columns=["method", "protocol", "fraction", "train_domain", "test_domain", "metric", "mean"]
    )
    summary = summary.assign(model="m", std=0.0, n=2)
    got = bench["mitosis"].errors(summary, ["m"])
    assert got.at["m", "mitosis_linear_probe_scaling_balanced_accuracy"] == pytest.approx(0.05)
    assert got.at["m", "mitosis_linear_probe_scaling_auroc"] == pytest.approx(0.05 * math.sqrt(4 / 3))
    assert "mitosis_linear_probe_scaling_f1_weighted" not in got.columns  # no standard error known


def test_binary_auroc_null_error_matches_its_permutation_spread():
    # the √(4/3) factor against the spread of AUROC over random labels of 60 + 60 scores (Mann–Whitney:
    # AUROC = (rank sum of the positives − n₁(n₁ + 1)/2) / (n₁n₂), ranks of continuous scores)
    rng = np.random.default_rng(0)
    n1 = n2 = 60
    ranks = np.arange(1, n1 + n2 + 1, dtype=float)
    positives = np.argsort(rng.random((20000, n1 + n2)), axis=1)[:, :n1]  # random label assignments
    aucs = (ranks[positives].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n2)
    se_ba = chance_metrics(np.repeat([0, 1], [n1, n2]))[CHANCE_SE]
    assert np.std(aucs) == pytest.approx(se_ba * math.sqrt(4 / 3), rel=0.03)


def test_plism_median_error_from_its_bootstrap_interval():
    summary = pd.DataFrame(
        {
            "model": ["m"],
            "group": ["all"],
            "metric": ["cosine"],
            "median": [0.9],
            "median_ci_low": [0.8],
            "median_ci_high": [0.96],
        }
    )
    got = benchmarks()["plism"].errors(summary, ["m"])
    assert got.at["m", "plism_cosine_median"] == pytest.approx(0.16 / (2 * 1.959964))
    assert math.isnan(got.at["m", "plism_leaderboard"])  # a composite without an interval


def test_report_says_within_noise_and_writes_the_gap(tmp_path):
    # probe: 30 test items of 3 classes (null SE ≈ 0.086): a 0.04 gap is noise; HEST's 0.4 gap is not
    probe_acc = {TEACHER: 0.60, BASELINE: 0.56, "student-dino": 0.59}
    se = chance_metrics(np.repeat([0, 1, 2], 10))[CHANCE_SE]
    files = []
    (tmp_path / "probe").mkdir()
    (tmp_path / "hest").mkdir()
    for model in MODELS:
        rows = probe_rows({"demo": [probe_acc[model]]})
        chance = pd.DataFrame(
            [
                ("demo", m, 0, metric, v)
                for m in ("linear", "knn")
                for metric, v in ((CHANCE, 1 / 3), (CHANCE_SE, se))
            ],
            columns=rows.columns,
        )
        files.append(
            write_tidy(pd.concat([rows, chance]), tmp_path / "probe" / f"{model}.parquet", benchmark="probe")
        )
        files.append(
            write_tidy(
                hest_rows({"t1": HEST[model]}), tmp_path / "hest" / f"{model}.parquet", benchmark="hest"
            )
        )
    from histodistill.report import run as run_report

    out = tmp_path / "report"
    run_report(
        files,
        _stores(tmp_path, {TEACHER: "abc", BASELINE: "random-init:0", "student-dino": "d1"}),  # MODELS order
        out,
        benchmarks=["hest", "probe"],
        models=MODELS,
        students={"dino": BASELINE},
        teacher=TEACHER,
    )
    table, _ = read_parquet(out / "distillation.parquet", "distillation", AssertionError)
    rows = table.set_index("column")
    linear = rows.loc["probe_balanced_accuracy_linear"]
    assert linear["gap_se"] == pytest.approx(math.hypot(se, se)) and not linear["resolved"]
    assert math.isnan(linear["recovery"])
    assert rows.loc["hest_pearson_mean", "resolved"] and rows.loc[
        "hest_pearson_mean", "recovery"
    ] == pytest.approx(0.75)
    shown = find_table((out / "index.html").read_text(), "recovery student-dino").set_index("score")
    assert shown["recovery student-dino"].str.contains("within noise").sum() == 2  # linear and k-NN
    assert shown.loc["HEST Pearson r (mean over tasks)", "recovery student-dino"] == "0.75"
    gap_col = "gap ± SE"
    assert shown.loc["HEST Pearson r (mean over tasks)", gap_col] == "0.400 ± 0.141"


def test_error_board_has_the_leaderboard_layout():
    board = error_board({}, ["a", "b"])
    assert list(board["model"]) == ["a", "b"] and list(board.columns) == ["model"]


def test_recovery_cells():
    from histodistill.report.distillation import _recovery_cell

    def cell(gap, resolved, recovery):
        return _recovery_cell(pd.Series({"gap": gap, "resolved": resolved, "recovery": recovery}))

    assert (
        cell(0.0, False, float("nan")) == "–"
    )  # teacher = random init (PLISM top-10 at 1.000): nothing to recover
    assert cell(0.01, False, float("nan")) == "– (within noise)"
    assert cell(0.2, True, 0.754) == "0.75"
    assert cell(0.2, pd.NA, 0.754) == "0.75 *"  # no standard error: shown, untested
