"""ScoreMix and CutMix (histodistill.bench.scorenet.scoremix) on hand-made relevance maps."""

import numpy as np
import pytest
import torch

from histodistill.bench.scorenet.scoremix import cutmix, no_mix, scoremix

P = 4  # region px


def _flat_images(values):
    """One constant image per value, 4 × 6 regions of P px (+ 2 px that the grid crops)."""
    return torch.stack([torch.full((3, 4 * P + 2, 6 * P), float(v)) for v in values])


def test_paste_lands_on_the_unique_lowest_score_from_the_highest():
    images = _flat_images([0, 1])
    images[1, :, 2 * P : 3 * P, 5 * P : 6 * P] = 7.0  # source's relevant region (2, 5) has its own colour
    relevance = torch.ones(2, 4, 6)
    relevance[1, 2, 5] = 5.0  # source: unique high
    relevance[0, 3, 1] = 0.0  # target: unique low
    mixed = scoremix(
        images,
        torch.tensor([0, 1]),
        relevance,
        2,
        np.random.default_rng(0),
        P,
        lam=1 / 24,
        sampling="greedy",
        permutation=torch.tensor([1, 0]),
    )
    out = mixed.images[0]
    assert (out[:, 3 * P : 4 * P, 1 * P : 2 * P] == 7.0).all()  # pasted exactly there
    changed = (out != images[0]).any(0)
    assert changed.sum() == P * P
    assert torch.allclose(mixed.targets[0], torch.tensor([23 / 24, 1 / 24]))


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.5, 0.9])
def test_pasted_area_equals_the_label_weight(lam):
    rng = np.random.default_rng(1)
    images = _flat_images([0, 1, 2])
    relevance = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(2))
    mixed = scoremix(images, torch.tensor([0, 1, 2]), relevance, 3, rng, P, lam=lam)
    for i in range(3):
        grid = mixed.images[i, :, : 4 * P, : 6 * P]
        pasted = (grid != images[i, :, : 4 * P, : 6 * P]).any(0).float().mean()
        if int(mixed.permutation[i]) == i:
            continue  # pasted from itself: nothing visible to count
        assert pasted == pytest.approx(float(mixed.source_weight[i]))
        assert mixed.targets[i, int(mixed.permutation[i])] == pytest.approx(float(pasted))
        assert mixed.targets[i].sum() == pytest.approx(1.0)
    assert (mixed.images[:, :, 4 * P :] == images[:, :, 4 * P :]).all()  # rows outside the grid untouched


def test_categorical_sampling_prefers_low_relevance_targets():
    images = _flat_images([0, 1])
    relevance = torch.ones(2, 4, 6)
    relevance[0, 0, 0] = 0.0
    hits = 0
    rng = np.random.default_rng(3)
    for _ in range(50):
        mixed = scoremix(
            images, torch.tensor([0, 1]), relevance, 2, rng, P, lam=1 / 24, permutation=torch.tensor([1, 0])
        )
        hits += bool((mixed.images[0, :, :P, :P] == 1.0).all())
    assert hits == 50  # every other position has weight max − S = 0


def test_cutmix_label_weight_is_the_pasted_fraction():
    images = _flat_images([0, 1, 2, 3])
    mixed = cutmix(images, torch.arange(4), 4, np.random.default_rng(4), lam=0.6)
    for i in range(4):
        j = int(mixed.permutation[i])
        if j != i:
            frac = (mixed.images[i] != images[i]).any(0).float().mean()
            assert mixed.targets[i, j] == pytest.approx(float(frac))


def test_region_source_names_where_every_mixed_region_came_from():
    """ScoreMix moves whole regions: region n of mixed image b is input region region_source[b, n] (of the
    batch's B·N regions, row-major per image), so a frozen encoder's cached region embeddings can be moved
    the same way; no mixing is the identity."""
    rng = np.random.default_rng(3)
    images = torch.rand(3, 3, 4 * P, 6 * P, generator=torch.Generator().manual_seed(4))
    relevance = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(5))

    def regions(x):
        return x.reshape(3, 3, 4, P, 6, P).permute(0, 2, 4, 1, 3, 5).reshape(3 * 24, 3, P, P)

    for lam in (0.1, 0.4, 0.8):
        mixed = scoremix(images, torch.tensor([0, 1, 2]), relevance, 3, rng, P, lam=lam)
        assert mixed.region_source.shape == (3, 24)
        assert torch.equal(regions(mixed.images), regions(images)[mixed.region_source.flatten()])
        moved = (mixed.region_source != torch.arange(72).reshape(3, 24)).sum(1)
        for i in range(3):  # the moved share is the label weight, unless the paste came from the image itself
            if int(mixed.permutation[i]) != i:
                assert moved[i] / 24 == pytest.approx(float(mixed.source_weight[i]))
    assert torch.equal(
        no_mix(images, torch.tensor([0, 1, 2]), 3, 24).region_source, torch.arange(72).reshape(3, 24)
    )
    assert cutmix(images, torch.tensor([0, 1, 2]), 3, rng, lam=0.5).region_source is None
