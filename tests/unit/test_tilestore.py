import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from histodistill.demo.slides import make_demo_slide
from histodistill.errors import HistodistillError, SlideError
from histodistill.shards import ShardRowReader
from histodistill.slides import open_slide
from histodistill.tilestore import (
    SlideTileDataset,
    TileStore,
    TileStoreDataset,
    create_tiles_array,
    pack_tiles,
)
from histodistill.tiling import TilingConfig, read_tile, read_tile_table, tile_slide
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def two_tables(tmp_path_factory, demo_slide):
    d = tmp_path_factory.mktemp("tables")
    second = make_demo_slide(d / "second.tiff", seed=11, spec=SMALL)
    params = TilingConfig(min_tissue=0.3)
    tile_slide(demo_slide, "first", d / "first.parquet", params)
    tile_slide(second, "second", d / "second.parquet", params)
    return [d / "first.parquet", d / "second.parquet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, two_tables):
    out = tmp_path_factory.mktemp("store") / "cohort.zarr"
    pack_tiles(two_tables, out, chunk_tiles=8)
    return out


def test_store_layout_and_index(store, two_tables):
    tables = [read_tile_table(p)[0] for p in two_tables]
    total = sum(len(t) for t in tables)
    ts = TileStore(store)
    assert len(ts) == total
    assert ts.tiles.dtype == np.uint8 and ts.tiles.shape == (total, 224, 224, 3)
    assert ts.tiles.shards == (8, 224, 224, 3) and ts.tiles.chunks == (1, 224, 224, 3)
    assert zarr.open_group(store, mode="r").metadata.zarr_format == 3
    index = ts.index
    assert index["slide_id"].tolist() == ["first"] * len(tables[0]) + ["second"] * len(tables[1])
    np.testing.assert_array_equal(index["x0"], np.concatenate([t["x0"] for t in tables]))
    assert ts.attrs["mpp"] == 0.5 and ts.attrs["tile_px"] == 224
    assert [s["slide_id"] for s in ts.attrs["slides"]] == ["first", "second"]
    assert ts.attrs["slides"][0]["mpp_source"] == "openslide.mpp"
    assert ts.attrs["provenance"]["params"]["chunk_tiles"] == 8


def test_store_pixels_equal_the_slide(store, two_tables):
    ts = TileStore(store)
    table, meta = read_tile_table(two_tables[0])
    with open_slide(meta["slide_path"]) as slide:
        for i in [0, 5, len(table) - 1]:
            np.testing.assert_array_equal(ts[i], read_tile(slide, table.iloc[i], 224))
    np.testing.assert_array_equal(ts.read(3, 7), np.stack([ts[i] for i in range(3, 7)]))


def test_direct_tile_reads_equal_zarr_reads(store, tmp_path):
    """The direct shard reader (one index entry, one read, one zstd decompression) returns zarr's pixels
    bit for bit: every tile of a packed store; then, in a store of the same layout, a last partial shard,
    an all-background tile (zarr writes no chunk: the fill value), a shard file never written, a range
    across shards; a compressor it does not parse is read through zarr; a corrupt chunk is an error."""
    ts = TileStore(store)
    assert ts._rows.fast and ts._rows.compressed
    for i in range(len(ts)):
        np.testing.assert_array_equal(ts[i], ts.tiles[i])
    real = ts.tiles[:9]
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    array = create_tiles_array(root, (13,), 224, chunk_tiles=4)  # shards of 4: rows 12 in a partial one
    array[:8] = real[:8]
    array[1] = 0  # all fill value: no chunk stored, its index entry is empty
    array[12] = real[8]  # shard 2 (rows 8–11) is never written
    expected = array[:]
    assert not expected[1].any() and not expected[8:12].any() and expected[12].any()
    assert not (tmp_path / "s.zarr" / "tiles" / "c" / "2" / "0" / "0" / "0").exists()
    reader = ShardRowReader(array)
    assert reader.fast and reader.compressed
    for i in range(13):
        tile = reader[i]
        assert tile.dtype == np.uint8 and tile.shape == (224, 224, 3)
        np.testing.assert_array_equal(tile, expected[i])
    np.testing.assert_array_equal(reader.read(2, 13), expected[2:])
    other = root.create_array(
        "gzip",
        data=expected,
        chunks=(1, 224, 224, 3),
        shards=(4, 224, 224, 3),
        compressors=zarr.codecs.GzipCodec(),
    )
    fallback = ShardRowReader(other)
    assert not fallback.fast
    np.testing.assert_array_equal(fallback[12], expected[12])
    shard = tmp_path / "s.zarr" / "tiles" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[:64] = bytes(64)  # the first stored chunk's zstd frame header
    shard.write_bytes(bytes(data))
    with pytest.raises(HistodistillError, match="does not decompress"):
        for i in range(4):
            reader[i]


def test_dataloader_workers_read_the_same_tiles(store, two_tables):
    reference = TileStore(store).read(0, len(TileStore(store)))
    for dataset in (TileStoreDataset(store), SlideTileDataset(two_tables)):
        loader = DataLoader(
            dataset, batch_size=4, num_workers=2, shuffle=False, multiprocessing_context="spawn"
        )
        tiles, idx = zip(*[(t, i) for t, i in loader], strict=True)
        assert torch.equal(torch.cat(idx), torch.arange(len(reference)))
        np.testing.assert_array_equal(torch.cat(tiles).numpy(), reference)


def test_dataset_does_not_pickle_open_handles(store, two_tables):
    import pickle

    ds = SlideTileDataset(two_tables)
    ds[0]
    assert ds._handles.get() and pickle.loads(pickle.dumps(ds))._handles._value is None
    ts = TileStoreDataset(store)
    ts[0]
    assert pickle.loads(pickle.dumps(ts))._store._value is None


def test_pack_failure_leaves_no_store(tmp_path, two_tables, monkeypatch):
    import histodistill.tilestore as tilestore

    def broken(slide, table, meta, workers=1):
        yield 0, np.zeros((224, 224, 3), np.uint8)
        raise OSError("slide read failed")

    monkeypatch.setattr(tilestore, "iter_tile_pixels", broken)
    with pytest.raises(OSError, match="slide read failed"):
        pack_tiles(two_tables, tmp_path / "s.zarr")
    assert list(tmp_path.iterdir()) == []


def test_pack_handles_empty_tables_and_rejects_mixed_geometry(tmp_path, two_tables, blank_slide, demo_slide):
    empty = tmp_path / "blank.parquet"
    tile_slide(blank_slide, "blank", empty, TilingConfig())
    n = pack_tiles([two_tables[0], empty], tmp_path / "s.zarr")
    assert n == len(read_tile_table(two_tables[0])[0]) == len(TileStore(tmp_path / "s.zarr"))
    other = tmp_path / "other.parquet"
    tile_slide(demo_slide, "third", other, TilingConfig(tile_px=112))
    with pytest.raises(SlideError, match="disagree"):
        pack_tiles([two_tables[0], other], tmp_path / "bad.zarr")
    with pytest.raises(SlideError, match="twice"):
        pack_tiles([two_tables[0], two_tables[0]], tmp_path / "dup.zarr")
    with pytest.raises(SlideError, match="not a tile store"):
        TileStore(tmp_path)


def test_corrupt_tile_data_is_a_clear_error_and_leaves_no_store(tmp_path):
    slide = make_demo_slide(tmp_path / "corrupt.tiff", seed=3, spec=SMALL)
    data = bytearray(slide.read_bytes())
    start = len(data) // 4  # inside level 0's tile data (levels are written from 0 up)
    data[start : start + 400_000] = np.random.default_rng(0).bytes(400_000)
    slide.write_bytes(bytes(data))
    table = tmp_path / "t.parquet"
    tile_slide(
        slide, "corrupt", table, TilingConfig(mpp=0.25, min_tissue=0.0)
    )  # the mask reads level 3: fine
    with pytest.raises(SlideError, match=r"corrupt slide .*corrupt\.tiff: cannot read"):
        pack_tiles([table], tmp_path / "s.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.tiff", "t.parquet"]
