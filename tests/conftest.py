"""Shared fixtures: small synthetic slides written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from histodistill.demo.slides import DemoSlideConfig, make_demo_slide

REPO = Path(__file__).resolve().parents[1]
SMALL = DemoSlideConfig(width_px=2048, height_px=1536, mpp=0.25, levels=4)


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def demo_slide(slides_dir) -> Path:
    """A small H&E-like pyramidal TIFF at 0.25 µm/px with its MPP in the TIFF resolution tags."""
    return make_demo_slide(slides_dir / "small.tiff", seed=7, spec=SMALL)


@pytest.fixture(scope="session")
def slide_without_mpp(slides_dir) -> Path:
    return make_demo_slide(
        slides_dir / "no_mpp.tiff", seed=8, spec=DemoSlideConfig(1024, 1024, mpp=None, levels=3)
    )


@pytest.fixture(scope="session")
def blank_slide(slides_dir) -> Path:
    return make_demo_slide(
        slides_dir / "blank.tiff", seed=9, spec=DemoSlideConfig(1024, 1024, mpp=0.25, levels=3, blank=True)
    )
