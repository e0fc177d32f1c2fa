"""EVA's slide-level tasks: pinned settings, ABMIL on a task one tile class decides, layouts and manifests."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from torch import nn

from histodistill.bench import BenchmarkError
from histodistill.bench.probe import ABMIL, EVA_ABMIL, AbmilConfig, abmil_config, score_bags, subsample_bag
from histodistill.bench.slide import (
    CAMELYON16_VAL,
    camelyon16_slides,
    load_slide_manifest,
    panda_small_slides,
    slide_bags,
)
from histodistill.demo.slide_task import make_demo_slide_task


def test_eva_slide_settings_are_pinned():
    # kaiko-ai/eva 0.4.5+1 (commit 73b61a79), configs/vision/pathology/offline/classification/
    # camelyon16_small.yaml and panda_small.yaml: the file and line of each are in bench/slide.py's docstring
    common = {
        "max_epochs": 100,  # MAX_EPOCHS
        "batch_size": 32,  # BATCH_SIZE
        "lr": 1e-3,  # LR_VALUE
        "weight_decay": 0.01,  # torch AdamW's default (the configs set none)
        "projected_dim": 128,  # projected_input_size
        "hidden_attention": 128,  # ABMIL's hidden_size_attention default
        "hidden_mlp": (128, 64),  # ABMIL's hidden_sizes_mlp default
        "patience": 20,  # PATIENCE
        "monitor": "balanced_accuracy",  # BinaryBalancedAccuracy / MulticlassAccuracy (macro)
        "low_lr_factor": 1 / 3,  # HeadModule's default ConstantLR
        "low_lr_epochs": 5,
        "tile_seed": 42,  # ForegroundGridSampler's seed
        "seeding": "once",  # seed_everything(42) once, N_RUNS runs after another
        "seed": 42,
    }
    assert set(EVA_ABMIL) == {"camelyon16_small", "panda_small"}
    for task, max_tiles in (("camelyon16_small", 1000), ("panda_small", 200)):  # N_PATCHES
        cfg = EVA_ABMIL[task]
        assert {k: getattr(cfg, k) for k in common} == common, task
        assert cfg.max_tiles == max_tiles and len(cfg.seeds) == 20  # N_RUNS 20
    assert abmil_config(eva="panda_small", overrides={"seeds": [0, 1]}) == replace(
        EVA_ABMIL["panda_small"], seeds=(0, 1)
    )
    with pytest.raises(BenchmarkError, match="unknown EVA task 'bach'"):
        abmil_config(eva="bach")
    with pytest.raises(BenchmarkError, match="unknown setting 'dropout'"):
        abmil_config(overrides={"dropout": 0.1})


def test_abmil_has_evas_layers_and_no_dropout():
    model = ABMIL(384, 1)  # EVA: ABMIL(input_size 384, output_size 1, projected_input_size 128)
    linears = [
        (m.in_features, m.out_features, m.bias is not None)
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    # projector; attention a, b, c; MLP 128 → 128 → 64 → 1
    assert linears == [(384, 128, True), (128, 128, True), (128, 128, True), (128, 1, True)] + [
        (128, 128, True),
        (128, 64, True),
        (64, 1, True),
    ]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert sum(isinstance(m, nn.ReLU) for m in model.classifier) == 2


def _one_class_decides(seed: int, informative: bool, n=(64, 32, 64), dim: int = 32):
    """Slides of 8-16 tiles from 4 tile classes; a slide is positive iff it holds a class-0 tile (1-2 of them).
    Informative features: the tile's class centroid + noise; random features: noise alone."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(4, dim)) * 2.0
    bags, labels, splits = [], [], []
    for split, count in zip(("train", "val", "test"), n, strict=True):
        for b in range(count):
            size = int(rng.integers(8, 17))
            classes = rng.integers(1, 4, size)
            if b % 2:
                classes[rng.choice(size, int(rng.integers(1, 3)), replace=False)] = 0
            noise = rng.normal(size=(size, dim))
            bags.append(centroids[classes] + noise if informative else noise)
            labels.append("tumor" if b % 2 else "normal")
            splits.append(split)
    return bags, labels, splits


def test_abmil_finds_the_deciding_tile_class_with_informative_features_and_not_with_random_ones():
    cfg = replace(EVA_ABMIL["camelyon16_small"], seeds=(0, 1), patience=5)  # EVA's head and optimiser, 2 runs
    good = score_bags(*_one_class_decides(0, True), "toy", cfg)
    noise = score_bags(*_one_class_decides(0, False), "toy", cfg)
    bacc = {
        name: rows[rows.metric == "balanced_accuracy"]["value"]
        for name, rows in (("good", good), ("noise", noise))
    }
    assert len(bacc["good"]) == 2 and bacc["good"].min() >= 0.95, good
    # 64 test slides: the null standard error of balanced accuracy is 0.0625; 0.15 is 2.4 of them
    assert abs(bacc["noise"].mean() - 0.5) <= 0.15, noise
    assert (
        set(good["method"]) == {"abmil"}
        and (good[good.metric == "chance_balanced_accuracy"]["value"] == 0.5).all()
    )


def test_seeding_once_continues_one_stream_and_per_run_repeats_a_seed():
    bags, labels, splits = _one_class_decides(1, True, n=(16, 8, 8), dim=8)
    cfg = AbmilConfig(
        max_epochs=3, patience=None, seeds=(7, 7), projected_dim=8, hidden_attention=8, hidden_mlp=(8,)
    )
    auroc = lambda rows: rows[rows.metric == "auroc"]["value"].to_numpy()  # noqa: E731
    once = auroc(score_bags(bags, labels, splits, "t", cfg))
    per_run = auroc(score_bags(bags, labels, splits, "t", replace(cfg, seeding="per_run")))
    assert per_run[0] == per_run[1]  # the same seed twice: the same run
    assert once[0] != once[1]  # one stream: the second run continues where the first stopped


def test_subsample_bag_keeps_a_fixed_uniform_subset():
    bag = np.arange(50, dtype=np.float32).reshape(25, 2)
    assert subsample_bag(bag, None) is bag and subsample_bag(bag, 25) is bag
    cut = subsample_bag(bag, 10, seed=42)
    assert cut.shape == (10, 2) and np.array_equal(cut, subsample_bag(bag, 10, seed=42))
    keep = np.sort(np.random.default_rng(42).permutation(25)[:10])
    np.testing.assert_array_equal(cut, bag[keep])


def test_bags_are_cut_to_max_tiles_before_training(monkeypatch):
    import histodistill.bench.probe as probe

    seen = []
    real = probe.train_abmil

    def spy(bags_train, *args, **kwargs):
        seen.append([len(b) for b in bags_train])
        return real(bags_train, *args, **kwargs)

    monkeypatch.setattr(probe, "train_abmil", spy)
    bags, labels, splits = _one_class_decides(2, True, n=(8, 4, 4), dim=4)
    bags[0] = np.ones((40, 4))
    score_bags(bags, labels, splits, "t", AbmilConfig(max_tiles=9, max_epochs=1, seeds=(0,)))
    assert seen[0][0] == 9 and max(seen[0]) == 9  # the 40-tile bag and the 8-16-tile ones: at most 9


def test_slide_manifests_give_bags_by_tile_index_or_by_slide(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(6, 2)
    path = tmp_path / "bags.csv"
    path.write_text("slide_id,tile_index,label,split\nA,0,x,train\nA,3,x,train\nB,3,y,train\nB,5,y,test\n")
    with pytest.raises(BenchmarkError, match="slide 'B' has rows with different splits"):
        load_slide_manifest(path)
    path.write_text("slide_id,tile_index,label,split\nA,0,x,train\nA,3,x,train\nB,3,y,test\nB,5,y,test\n")
    bags, labels, splits, names = slide_bags(load_slide_manifest(path), emb)
    assert names == ["A", "B"] and labels == ["x", "y"] and splits == ["train", "test"]
    np.testing.assert_array_equal(bags[1], emb[[3, 5]])  # tile 3 is in two bags
    slides = tmp_path / "slides.csv"
    slides.write_text("slide_id,label,split\nS2,y,test\nS1,x,train\n")
    bags, labels, _, names = slide_bags(
        load_slide_manifest(slides), emb, ["S1", "S1", "S2", "S1", "S2", "S2"]
    )
    assert names == ["S2", "S1"] and labels == ["y", "x"]
    np.testing.assert_array_equal(bags[0], emb[[2, 4, 5]])
    slides.write_text("slide_id,label,split\nS3,y,test\nS1,x,train\n")
    with pytest.raises(BenchmarkError, match="slide 'S3' has no tiles"):
        slide_bags(load_slide_manifest(slides), emb, ["S1"] * 6, "task t")


def test_camelyon16_layout_gives_evas_splits_and_labels(tmp_path):
    for part, names in {
        "training/normal": ["normal_001", "normal_010"],
        "training/tumor": ["tumor_002", "tumor_001"],
        "testing/images": ["test_001", "test_002"],
    }.items():
        (tmp_path / part).mkdir(parents=True)
        for name in names:
            (tmp_path / part / f"{name}.tif").touch()
    (tmp_path / "testing/reference.csv").write_text("test_001,Tumor,Macro,Primary\ntest_002,Normal\n")
    table = camelyon16_slides(tmp_path).set_index("slide_id")
    assert table.to_dict("index") == {
        "normal_001": {"label": "normal", "split": "train"},
        "normal_010": {"label": "normal", "split": "val"},
        "tumor_001": {"label": "tumor", "split": "val"},
        "tumor_002": {"label": "tumor", "split": "train"},
        "test_001": {"label": "tumor", "split": "test"},
        "test_002": {"label": "normal", "split": "test"},
    }
    assert len(CAMELYON16_VAL) == 54 and sum(s.startswith("tumor") for s in CAMELYON16_VAL) == 22


def test_panda_small_layout_is_a_stratified_20_percent_of_the_kept_images(tmp_path):
    ids = [f"img{i:03d}" for i in range(70)]
    grade = [0] * 40 + [1] * 20 + [2] * 10
    noise = [1] * 68 + [0, 0]  # the last two (grade 2) are not kept (noise_ratio_10 == 0)
    csv = tmp_path / "train_with_noisy_labels.csv"
    pd.DataFrame({"image_id": ids, "isup_grade": grade, "noise_ratio_10": noise, "x": 0}).to_csv(
        csv, index=False
    )
    table = panda_small_slides(csv)
    counts = table.groupby(["label", "split"]).size().to_dict()
    # per grade: floor(10 %) train, floor(5 %) val and test, at least 1 each (EVA's stratified_split)
    assert counts == {
        ("0", "train"): 4, ("0", "val"): 2, ("0", "test"): 2,
        ("1", "train"): 2, ("1", "val"): 1, ("1", "test"): 1,
        ("2", "train"): 1, ("2", "val"): 1, ("2", "test"): 1,
    }  # fmt: skip
    assert table["slide_id"].is_unique and not {"img068", "img069"} & set(table["slide_id"])
    grade0 = np.arange(40)
    np.random.default_rng(42).shuffle(grade0)  # grade 0 is shuffled first, by the stream seeded with 42
    assert table[table.label == "0"]["slide_id"].tolist() == [ids[i] for i in grade0[:8]]
    with pytest.raises(BenchmarkError, match="image 'nope' is not in"):
        panda_small_slides(csv, ["nope"])


def test_demo_slide_task_bags_hold_a_dense_tile_iff_positive(tmp_path):
    # the demo probe's manifest: tile labels by nuclear density, split by slide
    probe = pd.DataFrame(
        {
            "tile_index": np.arange(12),
            "label": ["dense", "sparse", "medium", "sparse"] * 3,
            "split": ["train"] * 4 + ["val"] * 4 + ["test"] * 4,
        }
    )
    probe.to_csv(tmp_path / "probe.csv", index=False)
    counts = {"train": 6, "val": 4, "test": 4}
    frame = make_demo_slide_task(tmp_path / "probe.csv", tmp_path / "bags.csv", bags_per_split=counts)
    split_of_tile = probe["split"].to_numpy()
    assert (split_of_tile[frame["tile_index"]] == frame["split"]).all()  # a bag's tiles come from its split
    dense = (probe["label"] == "dense").to_numpy()
    per_bag = (
        frame.assign(d=dense[frame["tile_index"]])
        .groupby("slide_id")
        .agg(d=("d", "any"), label=("label", "first"))
    )
    assert (per_bag["d"] == (per_bag["label"] == "positive")).all()
    assert (per_bag["label"] == "positive").sum() == 7  # half of each split
    assert frame.groupby("split")["slide_id"].nunique().to_dict() == {"test": 4, "train": 6, "val": 4}
    assert frame.groupby("slide_id").size().between(4, 8).all()
    assert load_slide_manifest(tmp_path / "bags.csv").shape == frame.shape
    probe.loc[probe.split == "test", "label"] = "sparse"
    probe.to_csv(tmp_path / "probe.csv", index=False)
    with pytest.raises(BenchmarkError, match="split test .* has 0 dense"):
        make_demo_slide_task(tmp_path / "probe.csv", tmp_path / "bags2.csv")
    assert not (tmp_path / "bags2.csv").exists()


def test_run_scores_each_slide_task_from_the_embedding_store_and_writes_provenance(tmp_path):
    import zarr

    from histodistill.bench.slide import run
    from histodistill.provenance import read_parquet

    bags, labels, splits = _one_class_decides(3, True, n=(8, 4, 4), dim=6)
    emb = np.concatenate(bags).astype(np.float32)
    owner = np.repeat(np.arange(len(bags)), [len(b) for b in bags])  # tile → slide, in store order
    store = tmp_path / "emb.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=3)
    root.create_array("embeddings", data=emb)
    root.create_array("slide_index", data=owner)
    slides = [{"slide_id": f"S{i}"} for i in range(len(bags))]
    root.attrs.update({"complete": True, "provenance": {"config_hash": "abc", "slides": slides}})
    manifest = tmp_path / "slides.csv"
    # the slide table lists slides in its own order; each bag is all of the slide's tiles
    table = pd.DataFrame({"slide_id": [s["slide_id"] for s in slides], "label": labels, "split": splits})
    table.iloc[::-1].to_csv(manifest, index=False)
    tasks = {"toy": {"dataset": "d", "manifest": str(manifest), "abmil": {"seeds": [0, 1]}}}
    base = {"max_epochs": 3, "patience": None, "projected_dim": 8, "hidden_attention": 8, "hidden_mlp": [8]}
    got = run(tasks, [store], tmp_path / "slide.parquet", model="m", abmil=base)
    cfg = abmil_config(base, overrides={"seeds": [0, 1]})
    order = list(range(len(bags)))[::-1]
    expected = score_bags(
        [bags[i] for i in order], [labels[i] for i in order], [splits[i] for i in order], "toy", cfg
    )
    pd.testing.assert_frame_equal(got, expected)
    written, meta = read_parquet(tmp_path / "slide.parquet", "slide scores", BenchmarkError)
    pd.testing.assert_frame_equal(written, expected)
    assert meta["benchmark"] == "slide" and meta["model"] == "m" and meta["params"]["tasks"] == tasks
    with pytest.raises(BenchmarkError, match="1 slide task"):
        run(tasks, [], tmp_path / "x.parquet", model="m")
    assert not (tmp_path / "x.parquet").exists()
