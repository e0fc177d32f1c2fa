"""The ScoreNet benchmark on the demo's synthetic ROIs, with config.yaml's settings (slow: minutes of CPU).

README's demo (config.yaml) runs `score_scorenet`; the test demo (tests/workflow/demo_config.py) keeps it off,
over the suite's CPU budget. This test runs what `score_scorenet` runs there, with the tiny random-init twin
of the student's architecture as local encoder.
Last run 2026-11-30 on the branch `scorenet` (60 epochs, threads 1, standardized embeddings; 2 shared CPUs at
load ~20): passed in 333 s. F1 0.689 vs scorer-only 0.266, top-K hit rate 0.656 vs chance 0.179, accuracy
0.688, and 0.563 with the selected regions blanked.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from histodistill.bench.scorenet import ScoreNetConfig, make_demo_rois, run
from histodistill.bench.scorenet.report import BENCHMARK, cost_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_rois_and_benchmark(tmp_path):
    manifest = make_demo_rois(tmp_path / "rois", seed=0)
    assert set(manifest["label"]) == {"hyperchromatic", "vesicular"}
    assert (manifest["region_y1"] - manifest["region_y0"] == 224).all()
    section = yaml.safe_load((ROOT / "config.yaml").read_text())["benchmarks"]["scorenet"]
    config = ScoreNetConfig.from_config(section)
    rows = run("h0_mini_tiny", tmp_path / "rois" / "manifest.csv", tmp_path / "out.parquet", config)
    scorenet = rows[rows["variant"] == "scorenet"].set_index("metric")["value"]
    # K = 2 of N ∈ {9, 12, 16} regions, one decisive region: chance 2/N averaged over the test ROIs
    assert 2 / 16 <= scorenet["topk_hit_chance"] <= 2 / 9
    assert all(0 <= v <= 1 for v in scorenet)
    summary = BENCHMARK.summarize(rows).assign(model="h0_mini_tiny")
    costs = cost_table(summary)
    assert list(costs["roi_px"]) == [672, 1344]
    assert (costs["ratio"] > 1).all()  # K = 2 regions of 9 and 36 cost less than all of them
    assert costs["ratio"].iloc[1] > costs["ratio"].iloc[0]  # fixed K: the saving grows with the ROI
    headline = BENCHMARK.headline(summary, ["h0_mini_tiny"])
    assert not math.isnan(headline.loc["h0_mini_tiny", "scorenet_weighted_f1"])
    assert isinstance(BENCHMARK.section(summary, ["h0_mini_tiny"], []), str)
    assert isinstance(pd.read_parquet(tmp_path / "out.parquet"), pd.DataFrame)
