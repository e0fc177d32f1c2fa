import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histodistill.errors import MppError, NoTissueError, SlideError
from histodistill.slides import open_slide, read_rgb
from histodistill.tiling import (
    TileGrid,
    TilingConfig,
    iter_tile_pixels,
    read_tile,
    read_tile_table,
    tile_slide,
)

PARAMS = TilingConfig(mpp=0.5, tile_px=224, min_tissue=0.5)


def test_tile_table_schema_and_metadata(tmp_path, demo_slide):
    out, qc = tmp_path / "t.parquet", tmp_path / "qc.png"
    table = tile_slide(demo_slide, "small", out, PARAMS, qc=qc)
    assert len(table) > 5
    arrow = pq.read_table(out)
    assert arrow.schema.names == ["slide_id", "tile_id", "x0", "y0", "level", "read_px", "mpp", "tissue_frac"]
    meta = json.loads(arrow.schema.metadata[b"histodistill"])
    assert meta["mpp_source"] == "openslide.mpp"
    assert meta["slide_mpp_x"] == pytest.approx(0.25)
    assert meta["params"]["tile_px"] == 224 and meta["params"]["min_tissue"] == 0.5
    assert meta["histodistill_version"] and meta["config_hash"] and "openslide-python" in meta["versions"]
    frame, meta2 = read_tile_table(out)
    assert meta2 == meta and len(frame) == len(table)
    # 224 px at 0.5 µm/px = 448 level-0 px of a 0.25 µm/px slide; read from level 1 (0.5 µm/px) at 224 px.
    assert (frame["x0"] % 448 == 0).all() and (frame["y0"] % 448 == 0).all()
    assert (frame["level"] == 1).all() and (frame["read_px"] == 224).all()
    assert (frame["tissue_frac"] >= 0.5).all()
    assert frame["tile_id"].is_unique
    qc_image = Image.open(qc)
    assert qc_image.format == "PNG" and max(qc_image.size) == 1024


def test_tile_grid_is_the_table_header(tmp_path, demo_slide):
    out = tmp_path / "t.parquet"
    table = tile_slide(demo_slide, "small", out, TilingConfig(mpp=0.6, tile_px=112))
    grid = read_tile_table(out).grid
    assert grid == TileGrid(
        slide_id="small",
        slide_path=str(demo_slide.resolve()),
        mpp=0.6,
        tile_px=112,
        level=1,
        read_px=134,
        slide_mpp_x=pytest.approx(0.25),
        slide_mpp_y=pytest.approx(0.25),
        mpp_source="openslide.mpp",
        footprint_px0=pytest.approx(112 * 0.6 / 0.25),
    )
    assert grid.tile_um == pytest.approx(67.2)
    assert (table["level"] == grid.level).all() and (table["read_px"] == grid.read_px).all()
    assert TileGrid.of(grid) is grid and TileGrid.from_metadata(grid.to_metadata()) == grid


def test_tile_table_without_a_grid_is_a_clear_error(tmp_path, demo_slide):
    from histodistill.provenance import provenance, write_parquet

    out = tmp_path / "old.parquet"
    write_parquet(pd.DataFrame({"x0": [0]}), out, provenance({}, slide_id="old"))
    with pytest.raises(SlideError, match=r"slide 'old' lacks the grid key\(s\) \['slide_path', 'mpp'"):
        TileGrid.from_metadata(read_tile_table(out).metadata)
    pq.write_table(pq.read_table(out).replace_schema_metadata({}), out)
    with pytest.raises(SlideError, match="not a histodistill tile table"):
        read_tile_table(out)


def test_min_tissue_filters_tiles(tmp_path, demo_slide):
    loose = tile_slide(demo_slide, "s", tmp_path / "a.parquet", TilingConfig(min_tissue=0.0))
    strict = tile_slide(demo_slide, "s", tmp_path / "b.parquet", TilingConfig(min_tissue=0.9))
    assert len(loose) == (1536 // 448) * (2048 // 448)  # every grid cell
    assert 0 < len(strict) < len(loose)
    assert set(strict["tile_id"]) <= set(loose["tile_id"])


def test_tiles_are_mostly_tissue(tmp_path, demo_slide):
    """Kept tiles are stained; dropped grid cells are mostly glass."""
    table = tile_slide(demo_slide, "s", tmp_path / "a.parquet", TilingConfig(min_tissue=0.0))
    with open_slide(demo_slide) as slide:
        sat = []
        for _, row in table.iterrows():
            tile = read_tile(slide, row, 224).astype(float)
            sat.append(((tile.max(2) - tile.min(2)) / np.maximum(tile.max(2), 1)).mean())
    sat = np.array(sat)
    kept = table["tissue_frac"].to_numpy() >= 0.5
    assert sat[kept].min() > 0.2
    assert sat[~kept].mean() < sat[kept].mean() / 2


def test_tile_iteration_equals_one_read_per_tile(tmp_path, demo_slide):
    table = tile_slide(demo_slide, "s", tmp_path / "t.parquet", TilingConfig(min_tissue=0.2))
    _, meta = read_tile_table(tmp_path / "t.parquet")
    with open_slide(demo_slide) as slide:
        got = list(iter_tile_pixels(slide, table, meta))
        assert [i for i, _ in got] == list(range(len(table)))
        for i, pixels in got:
            np.testing.assert_array_equal(pixels, read_tile(slide, table.iloc[i], 224))


@pytest.mark.parametrize("mpp", [0.5, 0.6])  # level exactly at the target; a level resized to it
def test_threaded_reading_is_byte_identical_to_sequential(tmp_path, demo_slide, mpp):
    params = TilingConfig(mpp=mpp, tile_px=224 if mpp == 0.5 else 112, min_tissue=0.0)
    table = tile_slide(demo_slide, "s", tmp_path / "t.parquet", params)
    _, meta = read_tile_table(tmp_path / "t.parquet")
    assert len(table) % 8 != 0  # a last reader task shorter than READ_CHUNK_TILES
    with open_slide(demo_slide) as slide:
        sequential = list(iter_tile_pixels(slide, table, meta))
    for workers in (2, 3):
        with open_slide(demo_slide) as slide:  # a fresh handle: no tile already in OpenSlide's cache
            threaded = list(iter_tile_pixels(slide, table, meta, workers=workers))
        assert [i for i, _ in threaded] == list(range(len(table)))
        for (_, a), (_, b) in zip(sequential, threaded, strict=True):
            assert a.dtype == b.dtype == np.uint8 and a.flags.c_contiguous and b.flags.c_contiguous
            np.testing.assert_array_equal(a, b)


def test_threaded_reading_stops_early_and_rejects_zero_workers(tmp_path, demo_slide):
    table = tile_slide(demo_slide, "s", tmp_path / "t.parquet", TilingConfig(min_tissue=0.0))
    _, meta = read_tile_table(tmp_path / "t.parquet")
    with open_slide(demo_slide) as slide:
        tiles = iter_tile_pixels(slide, table, meta, workers=2)
        first = [next(tiles) for _ in range(3)]
        tiles.close()  # the consumer stops: in-flight reads finish, queued ones are cancelled
        assert [i for i, _ in first] == [0, 1, 2]
        np.testing.assert_array_equal(first[2][1], read_tile(slide, table.iloc[2], 224))
        with pytest.raises(ValueError, match="workers must be ≥ 1"):
            next(iter_tile_pixels(slide, table, meta, workers=0))


def test_resize_when_no_level_is_at_the_target(tmp_path, demo_slide):
    params = TilingConfig(mpp=0.6, tile_px=112, min_tissue=0.5)
    table = tile_slide(demo_slide, "s", tmp_path / "t.parquet", params)
    _, meta = read_tile_table(tmp_path / "t.parquet")
    assert (table["level"] == 1).all()  # 0.5 µm/px is the coarsest level finer than 0.6
    assert (table["read_px"] == round(112 * 0.6 / 0.5)).all()
    with open_slide(demo_slide) as slide:
        tiles = [t for _, t in iter_tile_pixels(slide, table, meta)]
        assert all(t.shape == (112, 112, 3) for t in tiles)
        row = table.iloc[0]
        region = read_rgb(slide, row["x0"], row["y0"], 1, 134, 134)
        expected = np.asarray(Image.fromarray(region).resize((112, 112), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(tiles[0], expected)


def test_target_finer_than_scan_is_an_error(tmp_path, demo_slide):
    with pytest.raises(SlideError, match="finer than the scan"):
        tile_slide(demo_slide, "s", tmp_path / "t.parquet", TilingConfig(mpp=0.1))
    assert not (tmp_path / "t.parquet").exists()


def test_slide_without_mpp_errors_without_output(tmp_path, slide_without_mpp):
    out = tmp_path / "t.parquet"
    with pytest.raises(MppError, match=r"no_mpp\.tiff.*sample sheet"):
        tile_slide(slide_without_mpp, "nompp", out, PARAMS, qc=tmp_path / "qc.png")
    assert list(tmp_path.iterdir()) == []


def test_slide_without_mpp_works_with_override(tmp_path, slide_without_mpp):
    table = tile_slide(
        slide_without_mpp, "nompp", tmp_path / "t.parquet", TilingConfig(min_tissue=0.0), slide_mpp=0.25
    )
    _, meta = read_tile_table(tmp_path / "t.parquet")
    assert meta["mpp_source"] == "override" and len(table) == 4


def test_blank_slide_warns_and_writes_an_empty_table(tmp_path, blank_slide, caplog):
    out = tmp_path / "t.parquet"
    with caplog.at_level(logging.WARNING):
        table = tile_slide(blank_slide, "blank", out, PARAMS, qc=tmp_path / "qc.png")
    assert table.empty and "no tissue found in the thumbnail" in caplog.text  # the cause: glass only
    assert "greyscale" not in caplog.text
    frame, meta = read_tile_table(out)
    assert frame.empty and meta["tissue_found"] is False and meta["n_tiles"] == 0
    assert (tmp_path / "qc.png").exists()


def test_blank_slide_error_mode_leaves_nothing(tmp_path, blank_slide):
    with pytest.raises(NoTissueError, match="blank"):
        tile_slide(
            blank_slide,
            "blank",
            tmp_path / "t.parquet",
            TilingConfig(on_no_tissue="error"),
            qc=tmp_path / "q.png",
        )
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tmp_path, demo_slide, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        tile_slide(demo_slide, "s", tmp_path / "t.parquet", PARAMS)
    assert list(tmp_path.iterdir()) == []


def test_cli_with_spaces_and_quotes_in_paths(tmp_path, demo_slide):
    odd = tmp_path / "my \"odd\" 'dir' with spaces"
    odd.mkdir()
    slide = odd / "slide one's.tiff"
    slide.write_bytes(demo_slide.read_bytes())
    out = odd / "tiles $x.parquet"
    qc = odd / "qc (1).png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "histodistill.cli",
            "tile",
            str(slide),
            "--out",
            str(out),
            "--qc",
            str(qc),
            "--min-tissue",
            "0.5",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    frame, meta = read_tile_table(out)
    # the id derived from an unsafe file name is corrected (histodistill.ids.id_from_path)
    assert meta["slide_id"] == "slide_one_s" and len(frame) > 0 and qc.exists()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path):
    fake = tmp_path / "fake.svs"
    fake.write_bytes(b"\x00" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "histodistill.cli", "tile", str(fake), "--out", str(tmp_path / "t.parquet")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    # Off a terminal the error is one unwrapped line naming the whole path, whatever its length.
    (line,) = [ln for ln in result.stderr.splitlines() if "ERROR" in ln]
    assert str(fake) in line
    assert not (tmp_path / "t.parquet").exists()
