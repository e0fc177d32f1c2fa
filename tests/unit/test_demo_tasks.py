"""Latent demo tasks (demo/tasks.py): crops under random stainings labelled from the generator's latents."""

import numpy as np
import pytest

from histodistill.bench import BenchmarkError
from histodistill.bench.hest import load_task
from histodistill.demo.tasks import latent_class, latent_crops, make_demo_hest


def test_latent_crops_are_deterministic_restained_tissue_with_their_latents():
    a = latent_crops(n_slides=2, per_slide=6, seed=3, width_px=1024, height_px=768)
    b = latent_crops(n_slides=2, per_slide=6, seed=3, width_px=1024, height_px=768)
    assert a.tiles.shape == (12, 224, 224, 3) and a.tiles.dtype == np.uint8
    assert a.latents.shape == (12, 5) and a.slide.tolist() == [0] * 6 + [1] * 6
    np.testing.assert_array_equal(a.tiles, b.tiles)
    np.testing.assert_array_equal(a.latents, b.latents)
    tissue, fat, nuclei = a.latents[:, 0], a.latents[:, 1], a.latents[:, 2]
    assert (tissue >= 0.5 - 0.15).all() and (tissue <= 1).all()  # crops keep ≥ 50 % tissue (± scale jitter)
    assert ((fat >= 0) & (fat <= tissue)).all() and ((nuclei > 0) & (nuclei < 1)).all()
    # every crop is re-stained and scanned: mean colours spread further than the latents alone explain
    assert a.tiles.reshape(12, -1, 3).mean(1).std(0).min() > 1.0
    other = latent_crops(n_slides=2, per_slide=6, seed=4, width_px=1024, height_px=768)
    assert not np.array_equal(other.latents, a.latents)


def test_latent_class_cuts_at_the_terciles_of_the_fit_rows_only():
    nuclei = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.0])
    fit = np.array([True] * 6 + [False] * 2)
    # cuts of the first six: 0.2667 and 0.4333; the held-out 0.9 and 0.0 do not move them
    assert latent_class(nuclei, fit).tolist() == [0, 0, 1, 1, 2, 2, 2, 0]


def test_demo_hest_with_given_content_follows_it_not_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    tiles_a = rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    tiles_b = 255 - tiles_a  # other pixels, same content
    content = rng.normal(size=(20, 3))
    task_a = load_task(make_demo_hest(tmp_path / "a", tiles_a, seed=2, spots_per_sample=8, content=content))
    task_b = load_task(make_demo_hest(tmp_path / "b", tiles_b, seed=2, spots_per_sample=8, content=content))
    task_c = load_task(make_demo_hest(tmp_path / "c", tiles_a, seed=2, spots_per_sample=8))
    for sample_id, sample in task_a.samples.items():
        np.testing.assert_array_equal(task_b.samples[sample_id].expression, sample.expression)
    assert not np.array_equal(task_c.samples["DEMO0"].expression, task_a.samples["DEMO0"].expression)
    with pytest.raises(BenchmarkError, match="3 content rows for 20 tiles"):
        make_demo_hest(tmp_path / "d", tiles_a, content=content[:3])
