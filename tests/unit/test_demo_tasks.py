"""Latent demo tasks (demo/tasks.py): crops under random stainings labelled from the generator's latents; the demo
HEST task and probe manifest made from them."""

import numpy as np
import pandas as pd
import pytest

from histodistill.bench import BenchmarkError
from histodistill.bench.datasets import pack_hest_task
from histodistill.bench.hest import load_task, read_patch_images
from histodistill.bench.probe import load_manifest
from histodistill.demo.tasks import (
    LATENTS_FILE,
    latent_class,
    latent_crops,
    make_demo_hest,
    make_latent_hest_task,
    make_latent_probe,
)
from histodistill.tilestore import TileStore


def test_latent_crops_are_deterministic_restained_tissue_with_their_latents():
    a = latent_crops(n_slides=2, per_slide=6, seed=3, width_px=1024, height_px=768)
    b = latent_crops(n_slides=2, per_slide=6, seed=3, width_px=1024, height_px=768)
    assert a.tiles.shape == (12, 224, 224, 3) and a.tiles.dtype == np.uint8
    assert a.latents.shape == (12, 5) and a.slide.tolist() == [0] * 6 + [1] * 6
    np.testing.assert_array_equal(a.tiles, b.tiles)
    np.testing.assert_array_equal(a.latents, b.latents)
    tissue, fat, nuclei = a.latents[:, 0], a.latents[:, 1], a.latents[:, 2]
    assert (tissue >= 0.5 - 0.15).all() and (tissue <= 1).all()  # crops keep ≥ 50 % tissue (± scale jitter)
    assert ((fat >= 0) & (fat <= tissue)).all() and ((nuclei > 0) & (nuclei < 1)).all()
    # every crop is re-stained and scanned: mean colours spread further than the latents alone explain
    assert a.tiles.reshape(12, -1, 3).mean(1).std(0).min() > 1.0
    other = latent_crops(n_slides=2, per_slide=6, seed=4, width_px=1024, height_px=768)
    assert not np.array_equal(other.latents, a.latents)


def test_latent_class_cuts_at_the_terciles_of_the_fit_rows_only():
    nuclei = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.0])
    fit = np.array([True] * 6 + [False] * 2)
    # cuts of the first six: 0.2667 and 0.4333; the held-out 0.9 and 0.0 do not move them
    assert latent_class(nuclei, fit).tolist() == [0, 0, 1, 1, 2, 2, 2, 0]


def test_demo_hest_with_given_content_follows_it_not_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    tiles_a = rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    tiles_b = 255 - tiles_a  # other pixels, same content
    content = rng.normal(size=(20, 3))
    task_a = load_task(make_demo_hest(tmp_path / "a", tiles_a, seed=2, spots_per_sample=8, content=content))
    task_b = load_task(make_demo_hest(tmp_path / "b", tiles_b, seed=2, spots_per_sample=8, content=content))
    task_c = load_task(make_demo_hest(tmp_path / "c", tiles_a, seed=2, spots_per_sample=8))
    for sample_id, sample in task_a.samples.items():
        np.testing.assert_array_equal(task_b.samples[sample_id].expression, sample.expression)
    assert not np.array_equal(task_c.samples["DEMO0"].expression, task_a.samples["DEMO0"].expression)
    with pytest.raises(BenchmarkError, match="3 content rows for 20 tiles"):
        make_demo_hest(tmp_path / "d", tiles_a, content=content[:3])


SMALL = {"n_slides": 3, "crops_per_slide": 4, "width_px": 1024, "height_px": 768}


@pytest.fixture(scope="module")
def latent_task(tmp_path_factory):
    """A small latent HEST task, packed as `hest_store` packs it, and its crops drawn directly."""
    root = tmp_path_factory.mktemp("latent")
    task = make_latent_hest_task(root / "demo", task="demo", seed=3, **SMALL)
    pack_hest_task(task, root / "demo.zarr", chunk_tiles=5)
    crops = latent_crops(3, 4, 3, 1024, 768, name="demo-task-demo")
    return task, root / "demo.zarr", crops


def test_latent_hest_task_spots_are_the_crops_with_whole_slides_per_sample(latent_task):
    task_dir, _, crops = latent_task
    task = load_task(task_dir)
    latents = pd.read_parquet(task_dir / LATENTS_FILE)
    # slides 0, 2 → DEMO0 and slide 1 → DEMO1, every crop once, in crop order within its sample
    assert latents.groupby("sample_id")["slide"].unique().map(list).to_dict() == {
        "DEMO0": [0, 2],
        "DEMO1": [1],
    }
    assert [len(task.samples[s].barcodes) for s in ("DEMO0", "DEMO1")] == [8, 4]
    for sample_id, rows in latents.groupby("sample_id"):
        pixels = read_patch_images(task.samples[sample_id].patches_path)
        crop = np.flatnonzero(crops.slide % 2 == int(sample_id[-1]))
        np.testing.assert_array_equal(pixels[rows["row"].to_numpy()], crops.tiles[crop])
        np.testing.assert_allclose(rows["nuclei"].to_numpy(), crops.latents[crop, 2])
    assert [f.test for f in task.folds] == [("DEMO0",), ("DEMO1",)]  # a fold tests whole slides


def test_latent_probe_labels_the_packed_crops_by_latent_tercile_in_folds_over_slides(latent_task, tmp_path):
    task_dir, store, crops = latent_task
    frame = make_latent_probe(task_dir, store, tmp_path / "probe.csv")
    index = TileStore(store).index
    assert index["slide_id"].iloc[0] == "DEMO1"  # load_task's sample order, not the latent table's
    latents = pd.read_parquet(task_dir / LATENTS_FILE).set_index(["sample_id", "row"])
    latents = latents.loc[pd.MultiIndex.from_arrays([index["slide_id"], index["tile_id"]])]
    slide = latents["slide"].to_numpy()
    assert len(frame) == 3 * 12 and frame["fold"].tolist() == [0] * 12 + [1] * 12 + [2] * 12
    tested = []
    for fold, rows in frame.groupby("fold"):
        assert rows["tile_index"].tolist() == list(range(12))
        # slides 0, 1, 2: train, val, test in fold 0; test, train, val in fold 1; val, test, train in fold 2
        expected_split = np.array(["train", "val", "test"])[(slide - fold) % 3]
        assert rows["split"].tolist() == expected_split.tolist()
        train = expected_split == "train"
        cuts = np.quantile(latents["nuclei"][train], [1 / 3, 2 / 3])  # cut on this fold's training slide only
        expected = np.array(["sparse", "medium", "dense"])[
            np.searchsorted(cuts, latents["nuclei"], side="right")
        ]
        assert rows["label"].tolist() == expected.tolist()
        tested += sorted(set(slide[expected_split == "test"]))
    assert tested == [2, 0, 1]  # every slide tested once
    np.testing.assert_array_equal(TileStore(store).read(0, 12), _packed_pixels(task_dir, index))
    manifest = load_manifest(tmp_path / "probe.csv", n_tiles=12)
    assert len(manifest) == 36 and [f for f, _ in manifest.folds()] == [0, 1, 2]
    assert [len(part) for _, part in manifest.folds()] == [12, 12, 12]


def _packed_pixels(task_dir, index):
    """The patch-file pixels of each store row, by (sample, row): what the manifest's tile_index points at."""
    task = load_task(task_dir)
    images = {s: read_patch_images(task.samples[s].patches_path) for s in task.samples}
    return np.stack([images[s][r] for s, r in zip(index["slide_id"], index["tile_id"], strict=True)])


def test_latent_probe_refuses_a_task_without_latents_or_three_slides(latent_task, tmp_path):
    task_dir, store, _ = latent_task
    other = make_demo_hest(tmp_path / "plain", np.zeros((12, 8, 8, 3), np.uint8), spots_per_sample=6)
    with pytest.raises(BenchmarkError, match="latents.parquet is missing; .* make_latent_hest_task"):
        make_latent_probe(other, store, tmp_path / "a.csv")
    two = make_latent_hest_task(tmp_path / "two", task="demo", seed=3, **{**SMALL, "n_slides": 2})
    pack_hest_task(two, tmp_path / "two.zarr")
    with pytest.raises(BenchmarkError, match="fewer than 3 slides"):
        make_latent_probe(two, tmp_path / "two.zarr", tmp_path / "b.csv")
    assert not (tmp_path / "b.csv").exists()


def test_demo_hest_by_sample_refuses_an_empty_sample(tmp_path):
    tiles = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(BenchmarkError, match=r"sample\(s\) \[1\] get no tile"):
        make_demo_hest(tmp_path / "t", tiles, sample_of=np.zeros(4, int))
