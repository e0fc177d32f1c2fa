"""Faults 4 and 8: no header number is trusted alone, and OME-TIFF metadata is read.

Generators write small slides with chosen headers: an Aperio SVS (its ImageDescription carries `MPP` and
`AppMag`, which OpenSlide maps to openslide.mpp-x/y and openslide.objective-power), generic TIFFs with TIFF
resolution tags, a pyramid whose level sizes disagree with their downsample, and OME-TIFFs whose µm/px is
only in the OME-XML (PhysicalSizeX/Y in nm, mm, µm). With `min_tissue: 0` every grid position is a tile,
so the expected count is exact: floor(width / footprint) × floor(height / footprint), footprint = 224 px ·
0.5 µm/px / slide µm/px.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from histodistill.cli import main
from histodistill.errors import MppError, SlideError
from histodistill.slides import checked_mpp, open_slide, read_rgb
from histodistill.tifffile_slide import TiffFileSlide
from histodistill.tiling import TilingConfig, plan_tiles, read_tile_table

W, H = 1536, 1024  # level 0 px; at 0.5 µm/px a 224-px tile is 224 level-0 px → 6 × 4 = 24 tiles
ALL_TILES = TilingConfig(min_tissue=0.0)


def _pixels(w: int = W, h: int = H) -> np.ndarray:
    """H&E-like pink and purple bands on white glass (content does not matter with min_tissue 0)."""
    rgb = np.full((h, w, 3), 240, np.uint8)
    rgb[h // 8 : -h // 8, w // 8 : -w // 8] = (200, 110, 170)
    rgb[h // 3 : h // 2, w // 4 : -w // 4] = (120, 60, 150)
    return rgb


def write_aperio(path, mpp: float, app_mag: float | None, w: int = W, h: int = H):
    """An Aperio SVS (tiled, zlib) with `MPP` and `AppMag` in its ImageDescription, and a 4× level."""
    mag = f"|AppMag = {app_mag:g}" if app_mag is not None else ""
    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) RAW/RGB"
    rgb = _pixels(w, h)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((rgb, np.ascontiguousarray(rgb[::4, ::4]))):
            desc = f"{head}{' -> ' + str(w // 4) + 'x' + str(h // 4) if i else ''}{mag}|MPP = {mpp:g}"
            tif.write(
                level, tile=(256, 256), photometric="rgb", compression="zlib", description=desc, metadata=None
            )
    return path


def write_generic(path, mpp_x: float, mpp_y: float, level1_shape: tuple[int, int] | None = None):
    """A tiled generic TIFF with its µm/px in the resolution tags (per cm), optionally a second level."""
    rgb = _pixels()
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            rgb,
            tile=(256, 256),
            photometric="rgb",
            resolution=(1e4 / mpp_x, 1e4 / mpp_y),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
        if level1_shape is not None:
            h1, w1 = level1_shape
            level = np.ascontiguousarray(rgb[:: H // h1, :: W // w1][:h1, :w1])
            tif.write(level, tile=(256, 256), photometric="rgb", subfiletype=1, metadata=None)
    return path


def write_ome(path, pixels: np.ndarray, size: float, unit: str | None, tiled: bool = True, axes: str = "YXS"):
    """An OME-TIFF (tifffile's OME writer) whose only µm/px is PhysicalSizeX/Y in `unit`, with a 2× SubIFD."""
    meta = {"axes": axes, "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit is not None:
        meta |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    kw = {"tile": (256, 256)} if tiled else {}
    photometric = "rgb" if pixels.ndim == 3 else "minisblack"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(pixels, photometric=photometric, metadata=meta, subifds=1, **kw)
        tif.write(np.ascontiguousarray(pixels[::2, ::2]), photometric=photometric, subfiletype=1, **kw)
    return path


# --- fault 4: an MPP 10× off --------------------------------------------------------------------------------


def test_header_ten_times_off_is_an_error_naming_slide_and_both_values(tmp_path):
    """A 0.5 µm/px scan at 20× whose header says 0.05: refused, naming the slide, 0.05 and 20× (≈ 0.5)."""
    path = write_aperio(tmp_path / "scan20x.svs", mpp=0.05, app_mag=20)
    with pytest.raises(MppError) as info:
        plan_tiles(path, "scan20x", ALL_TILES)
    message = str(info.value)
    assert "slide 'scan20x'" in message and "scan20x.svs" in message
    assert "microns-per-pixel 0.05 (from openslide.mpp)" in message
    assert "objective power 20× (from openslide.objective-power), which implies ≈ 0.5 µm/px" in message
    assert "--slide-mpp" in message
    out = tmp_path / "t.parquet"
    assert main(["tile", str(path), "--out", str(out), "--min-tissue", "0"]) == 2 and not out.exists()


def test_override_wins_over_the_wrong_header_and_gives_the_right_tiles(tmp_path):
    path = write_aperio(tmp_path / "scan20x.svs", mpp=0.05, app_mag=20)
    out = tmp_path / "t.parquet"
    args = ["tile", str(path), "--out", str(out), "--min-tissue", "0", "--slide-mpp", "0.5"]
    assert main(args) == 0
    table = read_tile_table(out)
    assert len(table.frame) == (W // 224) * (H // 224) == 24  # not 0 tiles of 2,240 level-0 px
    assert table.grid.mpp_source == "override" and table.grid.slide_mpp_x == 0.5
    assert table.grid.footprint_px0 == pytest.approx(224.0)


@pytest.mark.parametrize(
    ("mpp", "mag", "source"),
    [(0.5, 20, "openslide.mpp"), (0.2425, 20, "openslide.mpp"), (0.263, 40, "openslide.mpp")],
)
def test_consistent_headers_pass(tmp_path, mpp, mag, source):
    """Aperio 20× (0.5), 3DHistech-like 20× (0.24: a factor 2 from 10/20, inside the stated factor 3), 40×."""
    path = write_aperio(tmp_path / "s.svs", mpp=mpp, app_mag=mag)
    plan = plan_tiles(path, "s", ALL_TILES)
    assert plan.grid.mpp_source == source and plan.grid.slide_mpp_x == pytest.approx(mpp)
    footprint = 224 * 0.5 / mpp
    assert len(plan.table) == (W // footprint // 1) * (H // footprint // 1)


def test_mpp_against_objective_inside_the_range_is_still_an_error(tmp_path):
    """2.5 µm/px is a plausible number, but not for a 40× scan (≈ 0.25)."""
    path = write_aperio(tmp_path / "s40.svs", mpp=2.5, app_mag=40)
    with pytest.raises(MppError, match=r"slide 's40'.*microns-per-pixel 2\.5 .*objective power 40×.*≈ 0\.25"):
        plan_tiles(path, "s40", ALL_TILES)


def test_header_outside_the_physical_range_without_objective(tmp_path):
    path = write_aperio(tmp_path / "nomag.svs", mpp=0.05, app_mag=None)
    with pytest.raises(
        MppError, match=r"slide 'nomag'.*implausible microns-per-pixel 0\.05 x 0\.05.*0\.1–4 µm/px"
    ):
        plan_tiles(path, "nomag", ALL_TILES)
    assert len(plan_tiles(path, "nomag", ALL_TILES, slide_mpp=0.5).table) == 24


def test_x_and_y_resolution_disagree(tmp_path):
    path = write_generic(tmp_path / "aniso.tiff", 0.5, 1.0)
    with pytest.raises(
        MppError, match=r"slide 'aniso'.*x and y microns-per-pixel disagree: x 0\.5 vs y 1 µm/px"
    ):
        plan_tiles(path, "aniso", ALL_TILES)
    path = write_generic(tmp_path / "near.tiff", 0.5, 0.51)  # 2%: within the stated 5% tolerance
    assert plan_tiles(path, "near", ALL_TILES).grid.slide_mpp_y == pytest.approx(0.51)


def test_level_downsample_against_its_dimensions(tmp_path):
    """Level 1 is 768 × 256 px: 2× in x, 4× in y; OpenSlide reports one downsample (3): refused."""
    path = write_generic(tmp_path / "pyr.tiff", 0.5, 0.5, level1_shape=(256, 768))
    with open_slide(path) as slide:
        assert slide.level_downsamples[1] == pytest.approx(3.0)
    with pytest.raises(
        SlideError, match=r"slide 'pyr'.*level 1 has downsample 3, but its width 768 px implies 2"
    ):
        plan_tiles(path, "pyr", ALL_TILES)
    good = write_generic(tmp_path / "good.tiff", 0.5, 0.5, level1_shape=(512, 768))
    assert len(plan_tiles(good, "good", ALL_TILES).table) == 24


# --- fault 8: OME-TIFF -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "unit"), [(500.0, "nm"), (0.0005, "mm"), (0.5, "µm"), (0.5, None), (5e-7, "m")]
)
@pytest.mark.parametrize("tiled", [True, False])
def test_ome_tiff_mpp_from_the_ome_xml_with_its_unit(tmp_path, size, unit, tiled):
    path = write_ome(tmp_path / "case.ome.tiff", _pixels(), size, unit, tiled)
    with open_slide(path) as slide:
        assert isinstance(slide, TiffFileSlide) and slide.level_count == 2
        mpp = checked_mpp(slide, None, "case")
        assert (mpp.x, mpp.y, mpp.source) == (
            pytest.approx(0.5),
            pytest.approx(0.5),
            "OME-XML PhysicalSizeX/Y",
        )
        np.testing.assert_array_equal(read_rgb(slide, 0, 0, 0, W, H), _pixels())
        np.testing.assert_array_equal(read_rgb(slide, 0, 0, 1, W // 2, H // 2), _pixels()[::2, ::2])
    out = tmp_path / "t.parquet"
    assert main(["tile", str(path), "--out", str(out), "--min-tissue", "0"]) == 0
    frame = pd.read_parquet(out)
    assert len(frame) == 24 and set(frame["slide_id"]) == {"case"}  # the id without ".ome"
    assert read_tile_table(out).grid.mpp_source == "OME-XML PhysicalSizeX/Y"


def test_ome_tiff_unknown_unit_is_named(tmp_path):
    path = write_ome(tmp_path / "u.ome.tif", _pixels(), 0.5, "parsec")
    with open_slide(path) as slide, pytest.raises(MppError, match=r"slide 'u'.*PhysicalSizeXUnit 'parsec'"):
        checked_mpp(slide, None, "slide 'u'")


def test_ome_tiff_sixteen_bit_grey_reads_as_scaled_rgb(tmp_path):
    grey = (np.arange(H * W, dtype=np.uint64).reshape(H, W) * 37 % 65536).astype(np.uint16)
    path = write_ome(tmp_path / "g.ome.tiff", grey, 0.5, "µm", axes="YX")
    with open_slide(path) as slide:
        rgb = read_rgb(slide, 100, 200, 0, 64, 32)
    expected = np.rint(grey[200:232, 100:164] / 257).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_stripped_plain_tiff_falls_back_to_tifffile(tmp_path):
    """OpenSlide refuses a stripped TIFF; tifffile reads it (MPP from its resolution tags)."""
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, _pixels(), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert isinstance(slide, TiffFileSlide)
        assert checked_mpp(slide).source == "tiff.XResolution/centimeter"
    assert len(plan_tiles(path, "strips", ALL_TILES).table) == 24
