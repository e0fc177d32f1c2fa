"""The region store: regions of G × G tiles cut from each slide's tile grid, tokens from the embed output."""

import numpy as np
import pandas as pd
import pytest
import zarr

from histodistill.errors import HistodistillError
from histodistill.provenance import provenance
from histodistill.slide.regions import RegionStore, build_region_store, cut_regions
from histodistill.tiling import TileGrid, tile_table_metadata, write_tile_table


def test_cut_regions_blocks_missing_tiles_and_min_tissue():
    rows, cols, g = 5, 6, 2  # 3 × 3 regions, the last row/column half outside the grid
    present = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (4, 5), (2, 3), (3, 3), (3, 2)]
    tile_id = np.array([r * cols + c for r, c in present])
    origins, idx, frac = cut_regions(tile_id, rows, cols, g, min_tissue=0.5)
    # region (0,0): 4/4; (0,2): 1/4 dropped; (2,2): tiles (2,3), (3,3), (3,2) = 3/4; (4,4): 1/4 dropped
    assert origins.tolist() == [[0, 0], [2, 2]]
    np.testing.assert_allclose(frac, [1.0, 0.75])
    assert idx[0].tolist() == [[0, 1], [2, 3]]
    assert idx[1].tolist() == [[-1, 6], [8, 7]]
    origins, _, frac = cut_regions(tile_id, rows, cols, g, min_tissue=0.0)
    assert origins.tolist() == [[0, 0], [0, 2], [2, 2], [4, 4]]  # never an empty region
    with pytest.raises(HistodistillError, match="outside"):
        cut_regions(np.array([30]), rows, cols, g)


def _table(tmp_path, slide_id, rows, cols, present, foot=448.0):
    grid = TileGrid(slide_id, f"/x/{slide_id}.tif", 0.5, 224, 0, 448, 0.25, 0.25, "header", foot)
    ids = [r * cols + c for r, c in present]
    frame = pd.DataFrame(
        {
            "slide_id": slide_id,
            "tile_id": np.array(ids, np.int64),
            "x0": np.array([round(c * foot) for _, c in present], np.int64),
            "y0": np.array([round(r * foot) for r, _ in present], np.int64),
            "level": np.zeros(len(ids), np.int32),
            "read_px": np.full(len(ids), 448, np.int32),
            "mpp": 0.5,
            "tissue_frac": np.ones(len(ids), np.float32),
        }
    )
    path = tmp_path / f"{slide_id}.parquet"
    write_tile_table(frame, tile_table_metadata(grid, {}, grid=[rows, cols]), path)
    return path, ids


def _embedding_store(path, slide_ids, tile_ids, dim, rng):
    n = sum(len(t) for t in tile_ids)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    root.create_array("embeddings", data=x)
    root.create_array(
        "slide_index", data=np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(tile_ids)])
    )
    root.create_array("tile_id", data=np.concatenate([np.asarray(t, np.int64) for t in tile_ids]))
    for name, dtype in (("x0", np.int64), ("y0", np.int64), ("level", np.int32), ("tissue_frac", np.float32)):
        root.create_array(name, data=np.zeros(n, dtype))
    root.attrs.update(
        {"slides": [{"slide_id": s} for s in slide_ids], "provenance": provenance({}), "complete": True}
    )
    return x


def test_region_store_holds_the_embed_rows_mask_and_origin(tmp_path):
    rng = np.random.default_rng(0)
    a, a_ids = _table(tmp_path, "a", 4, 4, [(r, c) for r in range(4) for c in range(4) if (r, c) != (1, 1)])
    b, b_ids = _table(tmp_path, "b", 2, 6, [(0, 4), (1, 4), (1, 5), (0, 0)])
    x = _embedding_store(tmp_path / "emb.zarr", ["a", "b"], [a_ids, b_ids], 3, rng)
    n = build_region_store(tmp_path / "emb.zarr", [b, a], tmp_path / "regions.zarr", grid=2, min_tissue=0.5)
    store = RegionStore(tmp_path / "regions.zarr")
    data = store.load()
    assert n == len(store) == 5  # slide a: 4 regions; slide b: the (0, 4) block only (3/4)
    assert store.slides == ["a", "b"]
    assert data["slide_index"].tolist() == [0, 0, 0, 0, 1]
    assert list(zip(data["row0"].tolist(), data["col0"].tolist(), strict=True)) == [
        (0, 0),
        (0, 2),
        (2, 0),
        (2, 2),
        (0, 4),
    ]
    assert data["x0"].tolist() == [0, 896, 0, 896, 1792]
    assert data["tokens"].shape == (5, 2, 2, 3)
    # region 0 of a: tiles (0,0), (0,1), (1,0) present, (1,1) missing (zeros, mask False)
    row = {tid: i for i, tid in enumerate(a_ids)}
    assert data["mask"][0].tolist() == [[True, True], [True, False]]
    np.testing.assert_array_equal(data["tokens"][0, 0, 1], x[row[1]])
    np.testing.assert_array_equal(data["tokens"][0, 1, 0], x[row[4]])
    assert (data["tokens"][0, 1, 1] == 0).all()
    # slide b's rows follow slide a's in the embedding store
    off = len(a_ids)
    np.testing.assert_array_equal(data["tokens"][4, 1, 1], x[off + b_ids.index(1 * 6 + 5)])
    np.testing.assert_allclose(data["tissue_frac"], [0.75, 1, 1, 1, 0.75])
    assert store.attrs["provenance"]["params"]["grid"] == 2
    with pytest.raises(HistodistillError, match="no tile table given for slide"):
        build_region_store(tmp_path / "emb.zarr", [a], tmp_path / "r2.zarr", grid=2)
    assert not (tmp_path / "r2.zarr").exists()
