"""The paired-view section: the seed paper's Tables 1–2 (pairing × symmetry × weights) from a small frame."""

from __future__ import annotations

import numpy as np
import pandas as pd

from histodistill.bench.plism import score_plism
from histodistill.distill.trainer import DistillConfig
from histodistill.report import build_report, paired
from tests.unit.test_report import find_table, plism_slides, probe_rows, write_tidy

RUNS = {
    "student-reg-asym-sep": {
        "pairing": {"source": "registered"},
        "objective": "vicreg",
        "teacher_mode": "cotrained_separate",
        "seed": 0,
    },
    "student-reg-sym-shared": {
        "pairing": {"source": "registered", "symmetric": True},
        "objective": "vicreg",
        "teacher_mode": "cotrained_shared",
        "seed": 0,
    },
    "student-ctx-asym-sep": {
        "pairing": {"source": "context"},
        "objective": "vicreg",
        "teacher_mode": "cotrained_separate",
        "seed": 0,
    },
    # one recipe (feature objective, frozen teacher) with and without pairing, two seeds each
    "student-unpaired": {
        "pairing": {"source": "registered", "slides": ["REF"]},
        "objective": "feature",
        "seed": 0,
    },
    "student-unpaired-s1": {
        "pairing": {"source": "registered", "slides": ["REF"]},
        "objective": "feature",
        "seed": 1,
    },
    "student-registered": {"pairing": {"source": "registered"}, "objective": "feature", "seed": 0},
    "student-registered-s1": {"pairing": {"source": "registered"}, "objective": "feature", "seed": 1},
}
SCORES = {
    "student-reg-asym-sep": 0.61,
    "student-reg-sym-shared": 0.55,
    "student-ctx-asym-sep": np.nan,  # run, not scored
    "student-unpaired": 0.40,
    "student-unpaired-s1": 0.50,
    "student-registered": 0.70,
    "student-registered-s1": 0.80,
}


def test_defaults_are_distill_configs():
    """paired.py avoids importing torch for the defaults: they must stay DistillConfig's."""
    assert paired.DEFAULT_OBJECTIVE == DistillConfig.objective
    assert paired.DEFAULT_TEACHER_MODE == DistillConfig.teacher_mode


def test_paired_runs_labels_pairing_symmetry_weights():
    runs = paired.paired_runs(RUNS, reference="REF").set_index("model")
    assert runs.loc["student-unpaired", "pairing"] == paired.UNPAIRED  # student side = the reference only
    assert runs.loc["student-registered", "pairing"] == "registered"
    assert runs.loc["student-registered", "weights"] == "frozen teacher"  # teacher_mode default: cached
    assert runs.loc["student-reg-sym-shared", ["symmetry", "weights"]].tolist() == ["symmetric", "shared"]
    assert runs.loc["student-ctx-asym-sep", ["symmetry", "weights"]].tolist() == ["asymmetric", "separate"]
    # without the reference, slides [REF] is just a registered run on that slide; an explicit override wins
    assert paired.paired_runs(RUNS)["pairing"].tolist().count(paired.UNPAIRED) == 0
    other = {"m": {"pairing": {"source": "registered", "reference": "A", "slides": ["A"]}}}
    assert (
        paired.paired_runs(other | {"n": {"pairing": {"source": "context"}}}, "REF")["pairing"][0]
        == paired.UNPAIRED
    )
    # only unpaired controls: no table
    assert paired.paired_runs({"m": {"pairing": {"source": "none"}}}).empty


def test_seed_table_layout_and_cells():
    table = paired.seed_table(paired.paired_runs(RUNS, reference="REF"), SCORES)
    # the seed's four columns only: the frozen-teacher runs are Table 3 (frozen_table), not empty columns
    assert list(table.columns) == [
        "asymmetric · separate",
        "asymmetric · shared",
        "symmetric · separate",
        "symmetric · shared",
    ]
    assert list(table.index) == [("registered", "vicreg"), ("context", "vicreg")]
    assert table.loc[("registered", "vicreg"), "asymmetric · separate"] == "0.610"
    assert table.loc[("registered", "vicreg"), "symmetric · shared"] == "0.550"
    assert table.loc[("registered", "vicreg"), "asymmetric · shared"] == "n/a"  # not run
    assert table.loc[("context", "vicreg"), "asymmetric · separate"] == "–"  # run, no score
    # no co-trained run: no rows, the same columns
    frozen = paired.paired_runs({k: v for k, v in RUNS.items() if "teacher_mode" not in v}, "REF")
    assert paired.seed_table(frozen, SCORES).empty


def test_frozen_table_seeds_share_a_cell():
    runs = paired.paired_runs(RUNS, reference="REF")
    top1 = {m: v + 0.1 for m, v in SCORES.items()}
    table = paired.frozen_table(runs, SCORES, top1)
    assert list(table.columns) == [paired.PROBE_LABEL, paired.TOP1_LABEL]
    assert list(table.index) == [
        ("registered", "feature", "asymmetric"),
        (paired.UNPAIRED, "feature", "asymmetric"),
    ]
    # two seeds: mean ± sample standard deviation (0.75 ± 0.0707...)
    assert table.loc[("registered", "feature", "asymmetric"), paired.PROBE_LABEL] == "0.750 ± 0.071 (n=2)"
    assert table.loc[("registered", "feature", "asymmetric"), paired.TOP1_LABEL] == "0.850 ± 0.071 (n=2)"
    assert table.loc[(paired.UNPAIRED, "feature", "asymmetric"), paired.PROBE_LABEL] == "0.450 ± 0.071 (n=2)"
    # a seed without a score is counted
    partial = paired.frozen_table(runs, {**SCORES, "student-registered-s1": np.nan}, top1)
    assert partial.loc[("registered", "feature", "asymmetric"), paired.PROBE_LABEL] == "0.700 (n=1 of 2)"
    cotrained = paired.paired_runs({k: v for k, v in RUNS.items() if "teacher_mode" in v}, "REF")
    assert paired.frozen_table(cotrained, SCORES, top1).empty


def test_describe_holdout_names_blocks_and_tables():
    blocks = {"method": "blocks", "blocks": [2, 3], "held_out": ["r1c1"]}
    text = paired.describe_holdout("r1c1", blocks)
    assert text.startswith("r1c1 (") and "2 × 3 equal blocks" in text and "r0c0 at the top left" in text
    table = paired.describe_holdout("liver", {"method": "table", "table": "t.tsv", "held_out": ["liver"]})
    assert table == "liver (tissue ids of t.tsv; plism.tissue_holdout method table)"
    assert paired.describe_holdout("r1c1", None) == "r1c1"


def test_report_shows_the_seed_tables_and_names_the_held_out_tissues(tmp_path):
    """build_report with paired runs: Table 1 from the probe scores, Table 2 from PLISM top-1 (hand-made
    embeddings: a perfect model has top-1 1.0), the held-out tissues named."""
    held_out = ["r1c1"]
    rng = np.random.default_rng(0)
    slides = plism_slides()
    tissue = rng.normal(size=(12, 8))
    scores = {"plism": {}, "probe": {}}
    for name, noise in (("student-registered", 0.0), ("student-unpaired", 5.0)):
        feats = (tissue[None] + noise * rng.normal(size=(len(slides), 12, 8))).astype(np.float32)
        path = tmp_path / f"plism-{name}.parquet"
        score_plism(feats, slides, path, model=name, top_k=(1,), held_out_tissues=held_out)
        scores["plism"][name] = path
    for name, acc in (("student-registered", 0.8), ("student-unpaired", 0.6)):
        rows = probe_rows({"tissue": [acc, acc, acc]})
        scores["probe"][name] = write_tidy(rows, tmp_path / f"probe-{name}.parquet", benchmark="probe")
    runs = {k: RUNS[k] for k in ("student-registered", "student-unpaired")}
    holdout = {"method": "blocks", "blocks": [2, 2], "held_out": held_out}
    build_report(
        scores, tmp_path / "out", n_boot=0, paired_runs=runs, plism_reference="REF", tissue_holdout=holdout
    )
    page = (tmp_path / "out" / "index.html").read_text()
    section = page.split('id="paired"')[1].split("</section>")[0]
    table = find_table(section, paired.PROBE_LABEL).set_index("pairing")  # Table 3: frozen teacher
    assert table.loc["registered", paired.PROBE_LABEL] == "0.800"
    assert table.loc[paired.UNPAIRED, paired.PROBE_LABEL] == "0.600"
    assert table.loc["registered", paired.TOP1_LABEL] == "1.000"  # same embedding on every slide
    assert float(table.loc[paired.UNPAIRED, paired.TOP1_LABEL]) < 1.0
    assert "Table 1" not in section  # no co-trained run: no seed-layout table of empty cells
    assert "held-out tissues" in section and "them): r1c1 (spatial blocks" in section
    assert "2 × 2 equal blocks" in section


def test_section_lays_out_cotrained_and_frozen_runs():
    runs = paired.paired_runs(RUNS, "REF")
    board = pd.DataFrame({"model": [*SCORES, "t", "r"], paired.PROBE_COLUMN: [*SCORES.values(), 0.9, 0.3]})
    summary = pd.DataFrame(
        {
            "model": ["student-reg-asym-sep", "t", "r"],
            "group": "all",
            "metric": "top_1",
            "median": [0.5, 0.6, 0.1],
        }
    )
    summary["held_out"] = "r1c1"
    body = paired.section(runs, board, summary, teacher="t", random_init="r")
    probe = find_table(body, "asymmetric · separate")
    assert probe.set_index("pairing").loc["registered", "asymmetric · separate"] == "0.610"
    top1 = find_table(body.split("Table 2")[1], "asymmetric · separate").set_index("pairing")
    assert top1.loc["registered", "asymmetric · separate"] == "0.500"
    assert top1.loc["context", "asymmetric · separate"] == "–"  # run, no PLISM score
    assert find_table(body.split("<h3>Table 3")[1], paired.TOP1_LABEL).shape == (2, 5)
    assert "Teacher t: linear probe 0.900, PLISM top-1 0.600." in body
    assert "Random-init twin r: linear probe 0.300, PLISM top-1 0.100." in body


def test_section_without_held_out_tissues_says_so():
    runs = paired.paired_runs({k: RUNS[k] for k in ("student-registered", "student-unpaired")}, "REF")
    summary = pd.DataFrame(
        {
            "model": ["student-registered"],
            "group": ["all"],
            "metric": ["top_1"],
            "median": [0.5],
            "held_out": [""],
        }
    )
    board = pd.DataFrame({"model": ["student-registered"], paired.PROBE_COLUMN: [0.7]})
    body = paired.section(runs, board, summary, teacher="t")
    assert "No tissues held out" in body and "all tiles" in body
    assert "Teacher t: linear probe –, PLISM top-1 –." in body  # a teacher without scores


def test_plism_top1_and_held_out_from_a_summary():
    summary = pd.DataFrame(
        {
            "model": ["a", "a", "b"],
            "group": ["all", "inter_scanner", "all"],
            "metric": ["top_1", "top_1", "top_1"],
            "median": [0.5, 0.9, 0.25],
            "held_out": ["r1c1", "r1c1", ""],
        }
    )
    assert paired.plism_top1(summary) == {"a": 0.5, "b": 0.25}
    assert paired.held_out_tissues(summary, ["a"]) == "r1c1"
    assert paired.held_out_tissues(summary, ["a", "b"]) == "a: r1c1; b: all tiles"
    assert paired.plism_top1(None) == {} and paired.held_out_tissues(None, ["a"]) == ""
