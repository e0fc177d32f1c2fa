"""The ScoreNet benchmark's protocol (histodistill.bench.scorenet.protocol, .data) on tiny ROIs."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from histodistill.bench import BenchmarkError
from histodistill.bench.scorenet.data import read_manifest
from histodistill.bench.scorenet.model import PaperLocalViT, ScoreNet, ScoreNetModelConfig
from histodistill.bench.scorenet.protocol import (
    ScoreNetConfig,
    build_model,
    count_gflops,
    embed_all_regions,
    load_rois,
    run,
    topk_hits,
    train,
    train_region_embeddings,
)
from histodistill.models import load_model
from histodistill.provenance import read_parquet

TINY = {
    "region_px": 32,
    "low_patch_px": 8,
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
    "n_global_blocks": 1,
    "mixer_depth": 1,
    "top_k": 2,
    "num_samples": 20,
    "sigma": 0.05,
}


def _write_rois(tmp_path, n=8):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = (64, 96) if i % 3 else (96, 64)
        pixels = rng.integers(0, 255, (h + 5, w, 3), dtype=np.uint8)  # 5 extra rows: cropped
        label = "b" if i % 2 else "a"
        if label == "b":
            pixels[:32, :32] = 0  # the decisive region (0, 0)
        Image.fromarray(pixels).save(tmp_path / f"roi{i}.png")
        rows.append(
            {
                "path": f"roi{i}.png",
                "label": label,
                "split": "test" if i >= 6 else "train",
                "region_y0": 0,
                "region_x0": 0,
                "region_y1": 32,
                "region_x1": 32,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def test_topk_hits_and_chance():
    box = (32, 64, 64, 96)  # region (1, 2) of a 2 × 3 grid of 32 px
    rate, chance = topk_hits([np.array([5]), np.array([0])], [(2, 3), (2, 3)], [box, box], 32)
    assert rate == 0.5 and chance == pytest.approx(1 / 6)
    # a box straddling two regions, K = 2 of N = 6: 1 − C(4, 2)/C(6, 2) = 0.6
    assert topk_hits([np.array([0, 1])], [(2, 3)], [(0, 16, 32, 48)], 32) == (1.0, pytest.approx(0.6))


def test_gflops_scorenet_vs_all_regions():
    config = ScoreNetModelConfig(**TINY)
    model = ScoreNet(config, PaperLocalViT(config), 2).eval()
    small, large = (count_gflops(model, side, torch.device("cpu")) for side in (128, 256))
    assert (small["n_regions"], large["n_regions"]) == (16, 64)
    per_region = small["gflops_all_regions"] / 16
    assert large["gflops_all_regions"] == pytest.approx(64 * per_region)
    # ScoreNet: K = 2 regions + a scorer over 4× fewer pixels per region side → far cheaper than all 64
    assert 2 * per_region < large["gflops_scorenet"] < large["gflops_all_regions"] / 4


def test_run_writes_every_variant_and_metric(tmp_path):
    manifest = _write_rois(tmp_path)
    config = ScoreNetConfig.from_config(
        {
            "model": TINY,
            "epochs": 1,
            "batch_size": 4,
            "seeds": [0],
            "cost_sides": [128],
            "ablation_mixes": ["cutmix"],
            "threads": 1,
        }
    )
    rows = run("h0_mini_tiny", manifest, tmp_path / "out.parquet", config)
    frame, meta = read_parquet(tmp_path / "out.parquet", "scorenet scores", BenchmarkError)
    assert len(frame) == len(rows) and meta["benchmark"] == "scorenet" and meta["classes"] == ["a", "b"]
    assert set(rows["variant"]) == {"scorenet", "scorer_only", "scorenet_cutmix", "cost", "selection"}
    # the selection of the two test ROIs (manifest rows 6, 7): K = 2 of 6 regions, the decisive one is region 0
    selection = rows[rows["variant"] == "selection"]
    assert sorted(selection["roi"].unique()) == [6, 7]
    for _, part in selection.groupby("roi"):
        values = dict(zip(part["metric"], part["value"], strict=True))
        assert values["grid_h"] * values["grid_w"] == 6
        assert sum(values[f"selected:{r}"] for r in range(6)) == 2
        assert [values[f"decisive:{r}"] for r in range(6)] == [1, 0, 0, 0, 0, 0]
        assert sum(values[f"relevance:{r}"] for r in range(6)) < 1
    from histodistill.bench.scorenet.report import BENCHMARK

    summary = BENCHMARK.summarize(rows).assign(model="h0_mini_tiny")
    (figure,) = BENCHMARK.figures(summary, tmp_path, {"h0_mini_tiny": "#1f77b4"})
    assert figure.png.startswith(b"\x89PNG") and figure.name == "scorenet_selection.png"
    scorenet = rows[rows["variant"] == "scorenet"].set_index("metric")["value"]
    assert set(scorenet.index) == {
        "weighted_f1",
        "accuracy",
        "f1:a",
        "f1:b",
        "topk_hit_rate",
        "topk_hit_chance",
        "masked_accuracy",
        "masked_share",
    }
    assert scorenet["masked_share"] == 1.0  # 75% of K = 2 rounds half up to both regions
    assert scorenet["topk_hit_chance"] == pytest.approx(1 - math.comb(5, 2) / math.comb(6, 2))
    assert all(0 <= v <= 1 for v in scorenet)
    cost = rows[rows["variant"] == "cost"].set_index("metric")["value"]
    assert cost["n_regions"] == 16 and cost["k"] == 2


def test_manifest_errors_name_the_problem(tmp_path):
    pd.DataFrame({"path": ["x.png"], "label": ["a"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(BenchmarkError, match=r"lacks column\(s\) \['split'\]"):
        read_manifest(tmp_path / "m.csv")
    pd.DataFrame({"path": ["x.png"], "label": ["a"], "split": ["train"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    with pytest.raises(BenchmarkError, match="1 image\\(s\\) missing"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(BenchmarkError, match="unknown setting"):
        ScoreNetConfig.from_config({"epoch": 3})


def test_report_summary_headline_and_cost_ratio():
    from histodistill.bench.scorenet.report import BENCHMARK, cost_table

    rows = pd.DataFrame(
        [
            ("m", "scorenet", 0, -1, "weighted_f1", 0.6),
            ("m", "scorenet", 1, -1, "weighted_f1", 0.8),
            ("m", "scorer_only", 0, -1, "weighted_f1", 0.5),
            ("m", "scorer_only", 1, -1, "weighted_f1", 0.5),
            ("m", "cost", -1, 1536, "gflops_scorenet", 2.0),
            ("m", "cost", -1, 1536, "gflops_all_regions", 10.0),
            ("m", "cost", -1, 4096, "gflops_scorenet", 4.0),
            ("m", "cost", -1, 4096, "gflops_all_regions", 80.0),
        ],
        columns=["model", "variant", "seed", "roi_px", "metric", "value"],
    )
    summary = BENCHMARK.summarize(rows).assign(model="m")
    f1 = summary[(summary["variant"] == "scorenet") & (summary["metric"] == "weighted_f1")].iloc[0]
    assert (f1["mean"], f1["n"]) == (pytest.approx(0.7), 2) and f1["std"] == pytest.approx(math.sqrt(0.02))
    assert list(cost_table(summary)["ratio"]) == [5.0, 20.0]
    head = BENCHMARK.headline(summary, ["m", "other"])
    assert head.loc["m", "scorenet_weighted_f1"] == pytest.approx(0.7)
    assert head.loc["m", "scorenet_flops_ratio"] == 20.0  # at the largest ROI side
    assert math.isnan(head.loc["other", "scorenet_weighted_f1"])
    assert BENCHMARK.unranked("scorenet_flops_ratio") and not BENCHMARK.unranked("scorenet_weighted_f1")


def test_training_standardizes_the_embeddings_with_the_train_split_only(tmp_path):
    """`train` fits `ScoreNet.standardize` on the train ROIs' region embeddings (6 ROIs × 6 regions), from the
    cache or, without one, from the encoder itself: the same statistics; the test ROIs do not enter."""
    rois = load_rois(_write_rois(tmp_path), 32)
    config = ScoreNetConfig.from_config({"model": TINY, "epochs": 1, "batch_size": 4, "threads": 1})
    loaded = load_model("h0_mini_tiny", random_init=True)
    device = torch.device("cpu")
    torch.manual_seed(0)
    cache = embed_all_regions(build_model(loaded, config, 2), rois, device)
    expected = torch.cat([cache.embeddings[i] for i in rois.where("train")])
    assert expected.shape[0] == 36
    net = build_model(loaded, config, 2)
    uncached = train_region_embeddings(net, rois, rois.where("train"), device)
    assert torch.allclose(uncached, expected, atol=1e-5)  # same regions, same order
    net = train(net, rois, config, "none", 0, device, cache)
    assert torch.allclose(net.standardize.mean, expected.mean(0), atol=1e-5)
    assert torch.allclose(net.standardize.std, expected.std(0), atol=1e-5)
    everything = torch.cat(cache.embeddings)
    assert not torch.allclose(net.standardize.mean, everything.mean(0), atol=1e-5)
