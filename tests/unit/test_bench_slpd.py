"""The slide-level benchmark (k-fold CV of k-NN / ABMIL / transformer on region embeddings) and the SLPD demo."""

import numpy as np
import pandas as pd
import pytest
import torch

from histodistill.bench import BenchmarkError
from histodistill.bench.slpd import SlideEvalConfig, TransformerMIL, evaluate_bags, summarize
from histodistill.slide.demo import LABELS, synthesize_slides


def _bags(rng, n=24, shift=3.0):
    labels = np.arange(n) % 2
    bags = [rng.normal(size=(rng.integers(3, 7), 4)) + shift * y * np.eye(4)[0] for y in labels]
    return bags, np.where(labels == 1, "b", "a")


def test_cv_separates_separable_slides_and_is_at_chance_on_noise():
    rng = np.random.default_rng(0)
    bags, labels = _bags(rng)
    cfg = SlideEvalConfig(
        folds=3, methods=("knn", "abmil", "transformer"), epochs=12, lr=5e-3, batch_size=8, knn_k=3
    )
    rows = evaluate_bags(bags, labels, "t", "v", cfg)
    assert set(rows["fold"]) == {0, 1, 2} and set(rows["metric"]) == {"accuracy", "auc"}
    s = summarize(rows).set_index(["method", "metric"])["mean"]
    assert s[("knn", "accuracy")] > 0.9 and s[("abmil", "auc")] > 0.9 and s[("transformer", "auc")] > 0.9
    noise, _ = _bags(rng, shift=0.0)
    rows = evaluate_bags(noise, labels, "t", "v", SlideEvalConfig(folds=3, methods=("knn",), knn_k=3))
    assert summarize(rows).set_index(["method", "metric"])["mean"][("knn", "accuracy")] < 0.8
    with pytest.raises(BenchmarkError, match="lower slpd.eval.folds"):
        evaluate_bags(bags[:4], labels[:4], "t", "v", SlideEvalConfig(folds=3))


def test_transformer_aggregator_ignores_padding():
    torch.manual_seed(0)
    model = TransformerMIL(4, 1, width=16, layers=1, heads=2).eval()
    x = torch.randn(1, 5, 4)
    mask = torch.tensor([[True, True, True, False, False]])
    y = x.clone()
    y[0, 3:] = 50.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), model(y, mask))


def test_demo_slides_differ_by_arrangement_only():
    rng = np.random.default_rng(0)
    tiles = np.concatenate([rng.normal(size=(20, 8)) + 5, rng.normal(size=(20, 8)) - 5])
    arrays, frame = synthesize_slides(tiles, n_slides=8, regions_per_slide=4, grid=4, missing=0.0, seed=1)
    again, _ = synthesize_slides(tiles, n_slides=8, regions_per_slide=4, grid=4, missing=0.0, seed=1)
    np.testing.assert_array_equal(arrays["tokens"], again["tokens"])
    assert frame["label"].tolist() == [LABELS[i % 2] for i in range(8)]
    is_a = arrays["tokens"][..., 0] > 0  # [R, G, G]: the pattern of every token
    for s in range(8):
        regions = is_a[arrays["slide_index"] == s]
        assert regions.mean() == 0.5  # every slide: half its tiles of each pattern
        per_region = regions.mean(axis=(1, 2))
        if s % 2 == 0:
            assert sorted(per_region.tolist()) == [0.0, 0.0, 1.0, 1.0]  # segregated
        else:
            assert per_region.tolist() == [0.5] * 4  # intermixed
    assert pd.Series(arrays["slide_index"]).value_counts().eq(4).all()


def test_run_scores_every_variant_and_the_patch_baseline(tmp_path):
    from histodistill.bench.slpd import run
    from histodistill.slide.pretrain import pretrain_variants
    from histodistill.slide.regions import write_region_arrays

    rng = np.random.default_rng(0)
    tiles = np.concatenate([rng.normal(size=(10, 6)) + 3, rng.normal(size=(10, 6)) - 3])
    arrays, frame = synthesize_slides(tiles, n_slides=8, regions_per_slide=2, grid=3, missing=0.2, seed=0)
    write_region_arrays(tmp_path / "regions.zarr", arrays, frame["slide_id"].tolist(), {})
    frame.to_csv(tmp_path / "labels.csv", index=False)
    settings = dict(embed_dim=8, depth=1, num_heads=2, global_crop=2, local_crop=1, n_local_crops=1,
                    head_prototypes=16, head_hidden=16, head_bottleneck=4, epochs=2, warm_epochs=1,
                    batch_size=8, n_prototypes=2, min_regions=2, kmeans_n_init=1)  # fmt: skip
    encoders = {v: tmp_path / f"{v}.pt" for v in ("dino", "slpd")}
    logs = pretrain_variants(tmp_path / "regions.zarr", encoders, tmp_path / "work", settings, threads=1)
    assert "intra" not in logs["dino"]["epochs"][-1] and "inter" in logs["slpd"]["epochs"][-1]
    cfg = {"folds": 2, "methods": ["knn"], "patch_methods": ["knn"], "knn_k": 1}
    rows = run(tmp_path / "regions.zarr", encoders, tmp_path / "labels.csv", tmp_path / "s.parquet",
               model="m", task="demo", config=cfg)  # fmt: skip
    assert set(rows["variant"]) == {"patch", "dino", "slpd"}
    assert len(rows) == 3 * 2 * 2  # variants × folds × (accuracy, auc)
    assert pd.read_parquet(tmp_path / "s.parquet").equals(rows)
