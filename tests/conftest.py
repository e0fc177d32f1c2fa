"""Shared fixtures: small synthetic slides, the demo slide's tile store and its teacher cache, built once per
test session (builders in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from tests.helpers import make_teacher_cache, make_tile_store

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


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory, demo_slide) -> Path:
    """The demo slide's every grid tile (slide id "a") in a tile store of 8-tile chunks."""
    return make_tile_store(tmp_path_factory.mktemp("demo_store"), {"a": demo_slide})


@pytest.fixture(scope="session")
def demo_cache(demo_store) -> Path:
    """The tiny H-Optimus-0 twin's cache of `demo_store`: 2 views per tile, in 2 shards
    (`demo_store.parent/shard-{0,1}.zarr`) gathered into `cache.zarr`."""
    return make_teacher_cache(demo_store, demo_store.parent, num_shards=2, batch_size=4, chunk_batches=1)
