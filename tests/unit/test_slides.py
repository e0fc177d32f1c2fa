import numpy as np
import openslide
import pytest

from histodistill.errors import MppError, SlideError
from histodistill.slides import best_level, open_slide, parse_mpp, read_rgb, read_scaled, resolve_mpp


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
