import numpy as np
import openslide
import pytest

from histodistill.errors import MppError, SlideError
from histodistill.slides import (
    best_level,
    open_slide,
    parse_mpp,
    read_rgb,
    read_rgb_image,
    read_scaled,
    resolve_mpp,
)


def test_mpp_from_openslide_properties():
    mpp = resolve_mpp({"openslide.mpp-x": "0.2520", "openslide.mpp-y": "0.2510", "aperio.MPP": "0.5"})
    assert (mpp.x, mpp.y, mpp.source) == (0.252, 0.251, "openslide.mpp")


@pytest.mark.parametrize(
    ("props", "expected", "source"),
    [
        ({"aperio.MPP": "0.2527"}, (0.2527, 0.2527), "aperio.MPP"),
        ({"ventana.ScanRes": "0.465"}, (0.465, 0.465), "ventana.ScanRes"),
        (
            {"philips.DICOM_PIXEL_SPACING": '"0.000243" "0.000250"'},
            (0.25, 0.243),
            "philips.DICOM_PIXEL_SPACING",
        ),
        (
            {"tiff.XResolution": "40000", "tiff.YResolution": "39000", "tiff.ResolutionUnit": "centimeter"},
            (0.25, 10000 / 39000),
            "tiff.XResolution/centimeter",
        ),
        (
            {"tiff.XResolution": "50800", "tiff.YResolution": "50800", "tiff.ResolutionUnit": "inch"},
            (0.5, 0.5),
            "tiff.XResolution/inch",
        ),
    ],
)
def test_mpp_fallbacks_in_order(props, expected, source):
    mpp = resolve_mpp(props)
    assert (mpp.x, mpp.y) == pytest.approx(expected)
    assert mpp.source == source


def test_vendor_key_wins_over_tiff_tags():
    props = {
        "aperio.MPP": "0.5",
        "tiff.XResolution": "40000",
        "tiff.YResolution": "40000",
        "tiff.ResolutionUnit": "centimeter",
    }
    assert resolve_mpp(props).source == "aperio.MPP"


def test_override_wins_and_is_recorded():
    mpp = resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, override=0.5)
    assert (mpp.x, mpp.source) == (0.5, "override")


def test_no_mpp_names_the_slide_and_the_override():
    with pytest.raises(MppError, match=r"slide 'x'.*'mpp' column in the sample sheet.*--slide-mpp"):
        resolve_mpp(
            {"tiff.XResolution": "1", "tiff.YResolution": "1", "tiff.ResolutionUnit": "none"},
            slide_name="slide 'x'",
        )
    with pytest.raises(MppError, match="no microns-per-pixel"):
        resolve_mpp({}, override=float("nan"))


@pytest.mark.parametrize("value", ["0.01", "25", "1e-6"])
def test_implausible_mpp_is_an_error(value):
    with pytest.raises(MppError, match="implausible"):
        resolve_mpp({"openslide.mpp-x": value, "openslide.mpp-y": value})
    with pytest.raises(MppError, match="implausible"):
        resolve_mpp({}, override=float(value))


def test_missing_slide(tmp_path):
    with pytest.raises(SlideError, match="slide not found: .*missing.svs"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="not a file"):
        open_slide(tmp_path)


def test_random_bytes_named_svs(tmp_path):
    path = tmp_path / "fake.svs"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SlideError, match=r"fake\.svs"):
        open_slide(path)


def test_truncated_tiff(tmp_path, demo_slide):
    path = tmp_path / "truncated.tiff"
    data = demo_slide.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match=r"truncated\.tiff"):
        with open_slide(path) as slide:  # the header may parse; reading the missing tiles must fail
            read_rgb(slide, 0, 0, 0, *slide.dimensions)


def test_demo_slide_levels_and_mpp(demo_slide):
    with open_slide(demo_slide) as slide:
        assert slide.level_count == 4
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8))
        assert resolve_mpp(dict(slide.properties)).mean == pytest.approx(0.25)
        assert best_level(slide, 0.25, 0.5) == 1  # exactly at the target
        assert best_level(slide, 0.25, 0.6) == 1  # coarsest level still at or finer than the target
        assert best_level(slide, 0.25, 0.25) == 0
        assert best_level(slide, 0.25, 100) == 3


def test_read_scaled_matches_level_and_is_bounded(demo_slide):
    with open_slide(demo_slide) as slide:
        thumb = read_scaled(slide, 0.25, 2.0)  # exactly level 3
        assert thumb.shape == (1536 // 8, 2048 // 8, 3)
        direct = read_rgb(slide, 0, 0, 3, *slide.level_dimensions[3])
        np.testing.assert_array_equal(thumb, direct)
        coarse = read_scaled(slide, 0.25, 8.0)
        assert coarse.shape == (48, 64, 3)


def test_slide_without_mpp_has_none(slide_without_mpp):
    with open_slide(slide_without_mpp) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        with pytest.raises(MppError):
            resolve_mpp(dict(slide.properties))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("  ", None), (float("nan"), None), (np.float64("nan"), None)]
    + [(0.25, 0.25), ("0.5", 0.5), (" 0.46 ", 0.46), (np.float64(0.3), 0.3), (1, 1.0)],
)
def test_parse_mpp_blank_or_nan_is_none(value, expected):
    assert parse_mpp(value) == expected
    if expected is not None:
        assert type(parse_mpp(value)) is float


@pytest.mark.parametrize("value", ["fast", "0", "-0.25", 0.0, -1, float("inf"), "inf", [0.25]])
def test_parse_mpp_rejects_what_is_not_a_positive_number(value):
    with pytest.raises(ValueError, match="not a number"):
        parse_mpp(value)


def test_bad_override_is_an_mpp_error_naming_the_slide():
    with pytest.raises(MppError, match="slide 'x': override .*'fast'"):
        resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, "fast", slide_name="slide 'x'")


def test_read_rgb_equals_read_region_and_whitens_outside(demo_slide):
    with open_slide(demo_slide) as slide:
        w0, h0 = slide.dimensions
        # a region straddling the slide's bottom-right corner: OpenSlide returns transparent pixels there
        for x0, y0, level, w, h in [
            (300, 200, 0, 77, 51),
            (w0 - 40, h0 - 60, 0, 100, 100),
            (0, 0, 2, 130, 90),
        ]:
            rgba = np.asarray(slide.read_region((x0, y0), level, (w, h)))
            expected = rgba[..., :3].copy()
            expected[rgba[..., 3] == 0] = 255
            got = read_rgb(slide, x0, y0, level, w, h)
            assert got.shape == (h, w, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
            np.testing.assert_array_equal(got, expected)
            image = read_rgb_image(slide, x0, y0, level, w, h)  # opaque: PIL unpacks OpenSlide's buffer
            assert image.mode == "RGB" and image.size == (w, h)
            np.testing.assert_array_equal(np.asarray(image), expected)
        outside = read_rgb(slide, w0 - 40, h0 - 60, 0, 100, 100)
        assert (outside[60:, :] == 255).all() and (outside[:, 40:] == 255).all()


def test_premultiplied_conversion_matches_openslide_python():
    """Partly transparent pixels are un-premultiplied exactly as openslide-python's own C conversion does."""
    from openslide import _convert

    from histodistill.slides import _premultiplied_to_rgb

    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, (64, 48)).astype(np.uint32)
    alpha[:8], alpha[8:12] = 255, 0
    colour = (rng.integers(0, 256, (64, 48, 3)) * alpha[..., None] // 255).astype(np.uint32)  # premultiplied
    argb = (alpha << 24) | (colour[..., 0] << 16) | (colour[..., 1] << 8) | colour[..., 2]
    reference = argb.copy()
    _convert.argb2rgba(reference)  # in place, to RGBA bytes
    rgba = reference.view(np.uint8).reshape(64, 48, 4)
    expected = rgba[..., :3].copy()
    expected[rgba[..., 3] == 0] = 255
    np.testing.assert_array_equal(_premultiplied_to_rgb(argb), expected)
