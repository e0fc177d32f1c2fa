import hashlib
import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from histodistill.demo.slides import (
    BAND_ROWS,
    DemoSlideConfig,
    iter_rgb_bands,
    make_demo_cohort,
    make_demo_slide,
    pyramid_shapes,
    render_tissue,
    seed_for,
    write_pyramid_tiff,
)
from histodistill.slides import open_slide, read_rgb


def test_same_seed_same_bytes(tmp_path):
    spec = DemoSlideConfig(1024, 768)
    a = make_demo_slide(tmp_path / "a.tiff", 3, spec)
    b = make_demo_slide(tmp_path / "b.tiff", 3, spec)
    c = make_demo_slide(tmp_path / "c.tiff", 4, spec)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]


def test_seed_for_is_stable_and_distinct():
    assert seed_for("demo_00", 0) == seed_for("demo_00", 0)
    assert len({seed_for(f"demo_{i:02d}", 0) for i in range(50)}) == 50
    assert seed_for("demo_00", 0) != seed_for("demo_00", 1)


def test_h_and_e_like_content():
    rgb = render_tissue(DemoSlideConfig(2048, 1536), seed=5).reshape(-1, 3).astype(int)
    r, g, b = rgb.T
    background = (np.abs(r - 242) < 12) & (np.abs(g - 242) < 12) & (np.abs(b - 242) < 12)
    nuclei = (r < 120) & (b > r) & (g < r)  # dark blue-purple haematoxylin
    stroma = (r > 180) & (g < r - 40) & (b > g)  # pink eosin
    assert 0.1 < background.mean() < 0.7
    assert nuclei.mean() > 0.01
    assert stroma.mean() > 0.1


def test_cohort_sheet(tmp_path):
    sheet = make_demo_cohort(tmp_path, n_slides=2, spec=DemoSlideConfig(768, 768))
    lines = sheet.read_text().splitlines()
    assert lines[0] == "slide_id\tpath\tcohort" and len(lines) == 3
    with open_slide(lines[1].split("\t")[1]) as slide:
        assert slide.dimensions == (768, 768)
        assert read_rgb(slide, 0, 0, 0, 16, 16).dtype == np.uint8


def _whole_level_writer(pixels, path, mpp, levels, tile):
    """The pre-streaming writer (histodistill ≤ issue 19): whole levels in memory, the reference bytes."""
    with tifffile.TiffWriter(path) as tif:
        level = pixels
        for i in range(levels):
            if i and min(level.shape[:2]) < 64:
                break
            res = 1e4 / (mpp * 2**i)
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": 6},
                subfiletype=1 if i else 0,
                metadata=None,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
            level = np.asarray(Image.fromarray(level).reduce(2))


def test_streaming_writer_writes_the_whole_level_writers_bytes(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (601, 523, 3), dtype=np.uint8)  # odd: padded edges
    _whole_level_writer(pixels, tmp_path / "ref.tiff", 0.25, levels=4, tile=128)
    write_pyramid_tiff(pixels, tmp_path / "new.tiff", 0.25, levels=4, tile=128)
    assert (tmp_path / "new.tiff").read_bytes() == (tmp_path / "ref.tiff").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.tiff", "ref.tiff"]  # no scratch files left


def test_slide_levels_are_consistent_and_level0_is_the_render(tmp_path):
    spec = DemoSlideConfig(1000, 700, levels=5, tile=256)
    path = make_demo_slide(tmp_path / "s.tiff", 3, spec)
    expected = render_tissue(spec, 3)
    shapes = pyramid_shapes(700, 1000, 5)
    assert shapes == [(700, 1000), (350, 500), (175, 250), (88, 125)]  # no level under 64 px
    with open_slide(path) as slide:
        assert slide.level_count == len(shapes)
        assert [d[::-1] for d in slide.level_dimensions] == shapes
        for level, (h, w) in enumerate(shapes):
            assert slide.level_downsamples[level] == pytest.approx(
                ((1000 / w) + (700 / h)) / 2
            )  # OpenSlide's own definition (mean of the two ratios)
            assert abs(slide.level_downsamples[level] - 2**level) < 0.02 * 2**level
            np.testing.assert_array_equal(read_rgb(slide, 0, 0, level, w, h), expected)
            expected = np.asarray(Image.fromarray(expected).reduce(2))


def test_bands_do_not_depend_on_what_was_rendered_before():
    spec = DemoSlideConfig(768, 600)
    whole = render_tissue(spec, 11)
    bands = list(iter_rgb_bands(spec, 11))
    assert all(len(b) == BAND_ROWS for b in bands[:-1])
    np.testing.assert_array_equal(np.concatenate(bands), whole)
    # a band rendered on its own (a fresh model, nothing cached) equals the same band in sequence
    from histodistill.demo.slides import _band_maps, _TissueModel, compose_rgb

    model = _TissueModel(spec, 11)
    alone = compose_rgb(_band_maps(model, spec, 2 * BAND_ROWS, 3 * BAND_ROWS))
    np.testing.assert_array_equal(alone, whole[2 * BAND_ROWS : 3 * BAND_ROWS])


def test_generation_memory_is_flat_in_slide_height(tmp_path):
    """Peak traced allocations (numpy's) of a slide 8× taller stay those of one band, not of a level."""

    def peak(height: int) -> int:
        tracemalloc.start()
        try:
            make_demo_slide(tmp_path / f"h{height}.tiff", 5, DemoSlideConfig(1024, height))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    short, tall = peak(512), peak(4096)
    one_map = 1024 * 4096 * 4  # one float32 map of the whole tall slide; the whole-level renderer held ~20
    assert tall < 1.15 * short + 2**20, (short, tall)  # measured: 10.9 MB and 9.1 MB
    assert tall < one_map, (tall, one_map)
