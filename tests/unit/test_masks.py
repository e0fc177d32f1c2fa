"""The demo's mask slides (`histodistill.demo.masks`) and the mask store reader (`histodistill.masks`)."""

import numpy as np
import pytest
import tifffile

from histodistill.demo.masks import (
    NUCLEUS_THRESHOLD,
    iter_label_bands,
    make_demo_mask_slide,
    mode_reduce2,
)
from histodistill.demo.slides import DemoSlideConfig, make_demo_slide, render_tissue_maps
from histodistill.errors import SlideError
from histodistill.masks import MaskSlide, mask_path, read_mask_tile
from histodistill.slides import open_slide
from histodistill.tiling import tile_pixels

SPEC = DemoSlideConfig(1024, 768)


@pytest.fixture(scope="module")
def slide_and_mask(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    slide = make_demo_slide(root / "s.tiff", 3, SPEC)
    mask = make_demo_mask_slide(mask_path(root / "masks", "demo", "s"), 3, SPEC)
    return slide, mask


def test_mode_reduce2_by_hand():
    labels = np.array(
        [
            [0, 0, 1, 2, 2],
            [0, 1, 1, 2, 0],
            [2, 2, 0, 1, 1],
        ],
        np.uint8,
    )
    # blocks: {0,0,0,1}→0; {1,2,1,2}→tie 1/2→2; {2,0,2,0} (odd column repeated)→tie→2;
    # {2,2,2,2} (odd row repeated)→2; {0,1,0,1}→tie→1; {1,1,1,1}→1
    assert mode_reduce2(labels).tolist() == [[0, 2, 2], [2, 1, 1]]
    assert mode_reduce2(np.zeros((4, 4), np.uint8)).tolist() == [[0, 0], [0, 0]]


def test_labels_are_the_generators_maps():
    maps = render_tissue_maps(SPEC, 3)
    labels = np.concatenate(list(iter_label_bands(SPEC, 3)))
    body = maps.tissue & ~maps.fat
    assert labels.shape == (SPEC.height_px, SPEC.width_px) and labels.dtype == np.uint8
    assert np.array_equal(labels == 0, ~body)
    assert np.array_equal(labels == 2, body & (maps.nuclei > NUCLEUS_THRESHOLD))
    assert 0.02 < (labels == 2).mean() < 0.5 and (labels == 1).mean() > 0.2 and (labels == 0).mean() > 0.05
    blank = np.concatenate(list(iter_label_bands(DemoSlideConfig(512, 256, blank=True), 3)))
    assert not blank.any()


def test_mask_slide_grid_levels_and_mpp(slide_and_mask):
    slide, mask = slide_and_mask
    labels = np.concatenate(list(iter_label_bands(SPEC, 3)))
    with open_slide(slide) as rgb, MaskSlide(mask) as m:
        assert m.level_dimensions == rgb.level_dimensions
        assert np.array_equal(m.read(0, 0, 1024, 0)[:768], labels)  # rows past the slide read as 0
        assert not m.read(0, 0, 1024, 0)[768:].any()
        assert np.array_equal(m.read(0, 0, 512, 1)[:384], mode_reduce2(labels))
        assert np.array_equal(m.read(0, 0, 256, 2)[:192], mode_reduce2(mode_reduce2(labels)))
    with tifffile.TiffFile(mask) as tif, tifffile.TiffFile(slide) as ref:
        for page, ref_page in zip(tif.pages, ref.pages, strict=True):
            assert page.tags["XResolution"].value == ref_page.tags["XResolution"].value
            assert page.tags["ResolutionUnit"].value == ref_page.tags["ResolutionUnit"].value
            assert page.is_tiled and page.dtype == np.uint8 and page.samplesperpixel == 1
    assert make_demo_mask_slide(mask.parent / "again.tiff", 3, SPEC).read_bytes() == mask.read_bytes()


@pytest.mark.parametrize(("level", "x0", "y0"), [(0, 300, 200), (1, 200, 100), (1, 520, 340)])
def test_mask_tile_aligns_with_rgb_tile(slide_and_mask, level, x0, y0):
    """The label of a tile's pixel is what the RGB tile shows there: nuclei dark haematoxylin, glass bright."""
    slide, mask = slide_and_mask
    with open_slide(slide) as s:
        rgb = tile_pixels(s, x0, y0, level, 224, 224).astype(np.float32)
    labels = read_mask_tile(mask, x0, y0, 224, level)
    grey, blue_minus_green = rgb.mean(-1), rgb[..., 2] - rgb[..., 1]
    nucleus, tissue = labels == 2, labels == 1
    assert nucleus.sum() > 100 and tissue.sum() > 100
    assert np.median(grey[nucleus]) < 120 and np.median(blue_minus_green[nucleus]) > 40
    assert np.median(grey[nucleus]) < np.median(grey[tissue]) - 40
    if (labels == 0).sum() > 50:
        assert np.median(grey[labels == 0]) > 225
    # the alignment is exact, not approximate: the mask shifted by any of ±1–3 px covers brighter pixels
    inner = (slice(8, -8), slice(8, -8))
    darkness = {
        (dy, dx): grey[inner][np.roll(labels, (dy, dx), axis=(0, 1))[inner] == 2].mean()
        for dy in range(-3, 4)
        for dx in range(-3, 4)
    }
    assert min(darkness, key=darkness.get) == (0, 0)


def test_tile_row_with_resize_uses_nearest(slide_and_mask):
    _, mask = slide_and_mask
    with MaskSlide(mask) as m:
        tile = m.tile({"x0": 200, "y0": 100, "level": 0, "read_px": 448}, 224)
        # PIL's nearest 2× downscale samples the source pixel at 2i + 1 (pixel centres)
        assert np.array_equal(tile, m.read(200, 100, 448, 0)[1::2, 1::2])
        assert np.array_equal(
            m.tile({"x0": 200, "y0": 100, "level": 1, "read_px": 224}, 224), m.read(200, 100, 224, 1)
        )


def test_errors_name_the_file(slide_and_mask, tmp_path):
    slide, mask = slide_and_mask
    with pytest.raises(SlideError, match="no level 9"):
        read_mask_tile(mask, 0, 0, 16, level=9)
    with pytest.raises(SlideError, match="one-channel uint8"):
        MaskSlide(slide)
    (tmp_path / "x.tiff").write_text("not a tiff")
    with pytest.raises(SlideError, match="x.tiff"):
        MaskSlide(tmp_path / "x.tiff")
