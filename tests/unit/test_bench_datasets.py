"""Benchmark datasets as tile stores: HEST patches round-trip; the demo slide task's tile labels follow tissue content."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histodistill.bench import BenchmarkError
from histodistill.bench.datasets import embeddings_by_sample, pack_hest_task
from histodistill.bench.hest import load_task, read_patch_images
from histodistill.bench.probe import load_manifest
from histodistill.demo.slide_task import density_labels, nuclear_density
from histodistill.demo.tasks import make_demo_hest
from histodistill.tilestore import TileStore, pack_tiles
from histodistill.tiling import TilingConfig, tile_slide


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


def test_hest_task_packs_into_a_tile_store_in_patch_order(tmp_path):
    task_dir = make_demo_hest(tmp_path / "task", _tiles(50), seed=1, spots_per_sample=12)
    n = pack_hest_task(task_dir, tmp_path / "hest.zarr", chunk_tiles=5)
    store = TileStore(tmp_path / "hest.zarr")
    task = load_task(task_dir)
    assert n == len(store) == sum(len(s) for s in task.samples.values()) == 24
    assert [s["slide_id"] for s in store.attrs["slides"]] == list(task.samples)
    rows = embeddings_by_sample(
        np.arange(n)[:, None], store.index["slide_index"].to_numpy(), list(task.samples)
    )
    for sample_id, sample in task.samples.items():
        pixels = read_patch_images(sample.patches_path)
        np.testing.assert_array_equal(
            store.read(int(rows[sample_id][0, 0]), int(rows[sample_id][-1, 0]) + 1), pixels
        )


def test_nuclear_density_counts_dark_bluish_pixels():
    tiles = np.full((2, 10, 10, 3), 240, np.uint8)
    tiles[1, :5] = (60, 40, 120)  # half the tile: haematoxylin-dark, blue > green
    np.testing.assert_allclose(nuclear_density(tiles), [0.0, 0.5])


def test_density_labels_label_by_density_and_split_by_slide(tmp_path, demo_slide):
    tables = []
    for i in range(3):
        table = tmp_path / f"s{i}.parquet"
        tile_slide(demo_slide, f"s{i}", table, TilingConfig(min_tissue=0.3))
        tables.append(table)
    pack_tiles(tables, tmp_path / "store.zarr")
    frame = density_labels(tmp_path / "store.zarr")
    frame.to_csv(tmp_path / "probe.csv", index=False)
    store = TileStore(tmp_path / "store.zarr")
    assert len(frame) == len(store)
    split_of_slide = frame.groupby(store.index["slide_index"].to_numpy())["split"].unique()
    assert [list(v) for v in split_of_slide] == [["train"], ["val"], ["test"]]
    density = nuclear_density(store.read(0, len(store)))
    means = pd.Series(density).groupby(frame["label"]).mean()
    assert means["sparse"] < means["medium"] < means["dense"]
    manifest = load_manifest(tmp_path / "probe.csv", n_tiles=len(store))
    assert len(manifest) == len(store)


def test_density_labels_need_three_slides(tmp_path, demo_slide):
    table = tmp_path / "s.parquet"
    tile_slide(demo_slide, "s", table, TilingConfig(min_tissue=0.3))
    pack_tiles([table], tmp_path / "store.zarr")
    with pytest.raises(BenchmarkError, match="fewer than 3 slides"):
        density_labels(tmp_path / "store.zarr")


def test_image_dataset_packs_resized_center_crops_in_manifest_order(tmp_path):
    from PIL import Image

    from histodistill.bench.datasets import pack_image_dataset

    (tmp_path / "img").mkdir()
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the centre third is white: the centre crop is all white
    Image.fromarray(wide).save(tmp_path / "img" / "wide.png")
    Image.fromarray(np.full((50, 50, 3), 7, np.uint8)).save(tmp_path / "img" / "small.jpg", quality=100)
    rows = ["img/wide.png,a,train", "img/small.jpg,b,train", "img/wide.png,a,test", "img/small.jpg,b,test"]
    (tmp_path / "m.csv").write_text("\n".join(["path,label,split", *rows]) + "\n")
    n = pack_image_dataset(tmp_path / "m.csv", tmp_path / "s.zarr", tmp_path / "rows.csv", tile_px=32)
    store = TileStore(tmp_path / "s.zarr")
    assert n == len(store) == 4 and store.tiles.shape == (4, 32, 32, 3)
    assert store[0][:, 2:-2].min() == 255 and store[0][:, :1].max() < 255  # the white centre, cropped
    assert abs(int(store[1].mean()) - 7) <= 2
    manifest = load_manifest(tmp_path / "rows.csv", n_tiles=4)
    assert manifest.label.tolist() == ["a", "b", "a", "b"] and manifest.split.tolist()[2:] == ["test", "test"]


def test_image_dataset_names_a_missing_image(tmp_path):
    from histodistill.bench.datasets import pack_image_dataset

    (tmp_path / "m.csv").write_text("path,label,split\nnope.png,a,train\n")
    with pytest.raises(BenchmarkError, match=r"line 2: .*nope.png"):
        pack_image_dataset(tmp_path / "m.csv", tmp_path / "s.zarr", tmp_path / "rows.csv")
    assert not (tmp_path / "s.zarr").exists()
