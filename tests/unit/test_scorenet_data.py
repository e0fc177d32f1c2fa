"""The ScoreNet demo ROIs (histodistill.bench.scorenet.data): equal light absorbed, the manifest's boxes."""

import dataclasses

import numpy as np
import pytest
import tifffile

from histodistill.bench.scorenet.data import (
    ScoreNetDemoConfig,
    _absorbed,
    _cluster,
    make_demo_rois,
    matched_large_od,
)


def test_both_classes_absorb_the_same_light_but_differ_in_nuclear_area():
    """The calibrated OD makes fresh vesicular clusters (draws the calibration did not see) absorb what the
    hyperchromatic ones do, within 5%, while their nuclei cover nearly twice the area: the class is in the
    nuclei's size and density, not in how dark the region is."""
    config = ScoreNetDemoConfig()
    od = matched_large_od(config, seed=0)
    assert 0 < od < config.small_od
    light, area = {}, {}
    for vesicular in (False, True):
        maps = [_cluster(np.random.default_rng([7, d]), config, vesicular, od) for d in range(12)]
        light[vesicular] = np.mean([_absorbed(m) for m in maps])
        area[vesicular] = np.mean([(m > 0.1).sum() for m in maps])
    assert light[True] == pytest.approx(light[False], rel=0.05)
    assert area[True] > 1.5 * area[False]  # 1.85 × at the defaults (the blur widens the small ones)


def test_demo_manifest_boxes_are_whole_regions_of_each_roi(tmp_path):
    config = dataclasses.replace(
        ScoreNetDemoConfig(), n_rois=4, grids=((2, 2), (2, 3)), field_px=(896, 672), test_fraction=0.5
    )
    frame = make_demo_rois(tmp_path / "rois", seed=1, config=config)
    assert list(frame["label"]) == ["hyperchromatic", "vesicular"] * 2
    assert sorted(frame["split"]) == ["test", "test", "train", "train"]
    for row in frame.itertuples():
        image = tifffile.imread(tmp_path / "rois" / row.path)
        assert image.shape[0] in (448,) and image.shape[1] in (448, 672) and image.dtype == np.uint8
        assert row.region_y1 - row.region_y0 == row.region_x1 - row.region_x0 == 224
        assert row.region_y0 % 224 == 0 and row.region_x0 % 224 == 0
        assert row.region_y1 <= image.shape[0] and row.region_x1 <= image.shape[1]
    assert (tmp_path / "rois" / "manifest.csv").is_file()
