"""The report's distillation section: recovery = (student − random init) / (teacher − random init)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import zarr

from histodistill.provenance import read_parquet
from histodistill.report import run as run_report
from histodistill.report.distillation import busy, recovery
from tests.unit.test_report import find_table, hest_rows, probe_rows, write_tidy

TEACHER, BASELINE = "h_optimus_0_tiny", "h0_mini_tiny"
# HEST fold means per model (one task) and probe linear balanced accuracies per seed (one task)
HEST = {
    TEACHER: [0.80, 0.60],
    BASELINE: [0.40, 0.20],
    "student-dino": [0.70, 0.50],
    "student-feat": [0.5, 0.5],
}
PROBE = {
    TEACHER: [0.90, 0.90, 0.90],
    BASELINE: [0.50, 0.50, 0.50],
    "student-dino": [0.80, 0.80, 0.80],
    "student-feat": [0.40, 0.40, 0.40],
}


def test_recovery_by_hand():
    assert recovery(0.8, 0.5, 0.9) == pytest.approx(0.75)
    assert recovery(0.9, 0.5, 0.9) == pytest.approx(1.0)
    assert recovery(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # worse than random init
    assert math.isnan(recovery(0.8, 0.9, 0.9))  # the teacher does not beat the random init
    assert math.isnan(recovery(0.8, 0.9, 0.5))
    assert math.isnan(recovery(float("nan"), 0.5, 0.9))


def _stores(tmp_path, digests, loads=None):
    """One embedding store per model; `loads[model]`: the 1-minute load its throughput was measured under
    (on 2 CPUs; quiet when not given)."""
    stores = []
    for model, digest in digests.items():
        store = tmp_path / "emb" / model / "cohort.zarr"
        rate = {TEACHER: 100.0, BASELINE: 150.0}.get(model, 400.0)
        zarr.open_group(store, mode="w", zarr_format=3).attrs.update(
            {
                "complete": True,
                "tiles_per_s": rate,
                "throughput_device": "cpu",
                "provenance": {"weights_digest": digest},
                "throughput_conditions": {"load_1min": (loads or {}).get(model, 0.5), "cpus": 2},
            }
        )
        stores.append(store)
    return stores


def _files(tmp_path, models):
    files = []
    for bench, rows, table in (("hest", hest_rows, HEST), ("probe", probe_rows, PROBE)):
        (tmp_path / bench).mkdir(exist_ok=True)
        for model in models:
            data = {"t1": table[model]} if bench == "hest" else {"demo": table[model]}
            files.append(write_tidy(rows(data), tmp_path / bench / f"{model}.parquet", benchmark=bench))
    return files


def _report(tmp_path, digests, students, loads=None):
    """The workflow's report of HEST and probe scores for the models of `digests` (weights digest each)."""
    models = list(digests)
    out = tmp_path / "report"
    run_report(
        _files(tmp_path, models),
        _stores(tmp_path, digests, loads),
        out,
        benchmarks=["hest", "probe"],
        models=models,
        students=students,
        teacher=TEACHER,
    )
    return out


def test_report_gives_each_students_recovery_and_cost(tmp_path):
    digests = {TEACHER: "abc123", "student-dino": "d1", "student-feat": "d2", BASELINE: "random-init:0"}
    students = {"dino": BASELINE, "feat": BASELINE, "other": BASELINE}  # "other" is not reported
    out = _report(tmp_path, digests, students)
    table, _ = read_parquet(out / "distillation.parquet", "distillation", AssertionError)
    got = table.set_index(["student", "column"])["recovery"]
    assert set(table["student"]) == {"student-dino", "student-feat"} and set(table["baseline"]) == {BASELINE}
    # HEST: mean Pearson teacher 0.7, baseline 0.3; dino 0.6, feat 0.5
    assert got["student-dino", "hest_pearson_mean"] == pytest.approx((0.6 - 0.3) / (0.7 - 0.3))
    assert got["student-feat", "hest_pearson_mean"] == pytest.approx((0.5 - 0.3) / (0.7 - 0.3))
    # probe linear: teacher 0.9, baseline 0.5; knn rows are the linear values − 0.05 (same gap)
    assert got["student-dino", "probe_balanced_accuracy_linear"] == pytest.approx(0.75)
    assert got["student-feat", "probe_balanced_accuracy_linear"] == pytest.approx(-0.25)
    assert got["student-dino", "probe_balanced_accuracy_knn"] == pytest.approx(0.75)
    html = (out / "index.html").read_text()
    assert 'id="distillation"' in html
    shown = find_table(html, "recovery student-dino").set_index("score")
    assert shown.loc["HEST Pearson r (mean over tasks)", "recovery student-dino"] == "0.75"
    cost = find_table(html, "× faster").set_index("student")
    assert cost.loc["student-dino", "× faster"] == "4.00"  # 400 / 100 tiles/s
    assert cost.loc["student-dino", "× smaller"] != "–"


@pytest.mark.parametrize("busy_model", ["student-dino", TEACHER])
def test_a_speedup_timed_on_a_busy_machine_is_not_shown(tmp_path, busy_model):
    digests = {TEACHER: "abc123", "student-dino": "d1", BASELINE: "random-init:0"}
    out = _report(tmp_path, digests, students={"dino": BASELINE}, loads={busy_model: 3.3})  # 3.3 > 2 CPUs
    cost = find_table((out / "index.html").read_text(), "× faster").set_index("student")
    assert cost.loc["student-dino", "× faster"] == "BUSY"
    assert cost.loc["student-dino", "tiles/s"] == "400.0"  # the measurements stay, the ratio goes
    assert cost.loc["student-dino", "× smaller"] != "–"


def test_busy_flag():
    assert busy({"load_1min": 2.1, "cpus": 2}) and not busy({"load_1min": 2.0, "cpus": 2})
    assert not busy(None) and not busy({"cpus": 2}) and not busy({"load_1min": 5.0})


def test_no_recovery_without_a_random_init_baseline(tmp_path):
    # the student's architecture is reported with trained weights (e.g. the published H0-mini): no baseline
    digests = {TEACHER: "abc123", "student-dino": "d1", BASELINE: "sha256-of-published-weights"}
    out = _report(tmp_path, digests, students={"dino": BASELINE})
    table, _ = read_parquet(out / "distillation.parquet", "distillation", AssertionError)
    assert table["recovery"].isna().all() and table["baseline"].isna().all()
    assert "No random-init baseline of student-dino" in (out / "index.html").read_text()


def test_no_section_without_a_teacher(tmp_path):
    digests = {"student-dino": "d1", BASELINE: "random-init:0"}
    out = _report(tmp_path, digests, students={"dino": BASELINE})  # the teacher: configured, not reported
    assert 'id="distillation"' not in (out / "index.html").read_text()
    table, _ = read_parquet(out / "distillation.parquet", "distillation", AssertionError)
    assert isinstance(table, pd.DataFrame) and table.empty
