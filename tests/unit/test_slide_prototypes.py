"""SLPD math: per-slide k-means prototypes, the Hungarian set similarity, top-K slides, L_intra and L_inter."""

import itertools
import math

import numpy as np
import pytest
import torch

from histodistill.distill.centering import SoftmaxCenter
from histodistill.errors import HistodistillError
from histodistill.slide.losses import prototype_loss
from histodistill.slide.prototypes import (
    Neighbors,
    Prototypes,
    matched_similarity,
    prototype_targets,
    slide_prototypes,
    top_k_slides,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _regions(rng, n_slides=6, per_slide=30, dim=8):
    x = rng.normal(size=(n_slides * per_slide, dim)).astype(np.float32)
    return x, np.repeat(np.arange(n_slides), per_slide)


def test_kmeans_prototypes_are_deterministic_given_the_seed():
    x, s = _regions(np.random.default_rng(0))
    a = slide_prototypes(x, s, 6, 4, seed=3)
    b = slide_prototypes(x, s, 6, 4, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    assert a.valid.all() and (a.assignment >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=-1), 1.0, rtol=1e-5)


def test_kmeans_finds_planted_clusters_and_skips_small_slides():
    rng = np.random.default_rng(1)
    centers = _unit(rng.normal(size=(3, 16)))
    x = np.concatenate([centers[i] + 0.01 * rng.normal(size=(10, 16)) for i in range(3)])
    slide = np.zeros(30, dtype=int)
    x = np.concatenate([x, rng.normal(size=(5, 16))])
    slide = np.concatenate([slide, np.ones(5, dtype=int)])  # slide 1: 5 regions < min_regions
    p = slide_prototypes(x, slide, 2, 3, seed=0, min_regions=8)
    assert p.valid.tolist() == [True, False]
    assert (p.assignment[30:] == -1).all() and (p.centroids[1] == 0).all()
    # each planted centre is recovered (cosine ≈ 1) and its 10 regions share one prototype
    best = (p.centroids[0] @ centers.T).max(axis=0)
    assert (best > 0.999).all()
    for i in range(3):
        assert len(set(p.assignment[i * 10 : (i + 1) * 10])) == 1


def test_hungarian_equals_brute_force_over_permutations():
    rng = np.random.default_rng(2)
    for m in (1, 2, 3, 4, 5):
        for _ in range(5):
            a, b = _unit(rng.normal(size=(m, 6))), _unit(rng.normal(size=(m, 6)))
            sim, perm = matched_similarity(a, b)
            brute = max(np.mean([a[i] @ b[p[i]] for i in range(m)]) for p in itertools.permutations(range(m)))
            assert sim == pytest.approx(brute, abs=1e-9)
            assert sorted(perm.tolist()) == list(range(m))
            assert np.mean([a[i] @ b[perm[i]] for i in range(m)]) == pytest.approx(brute, abs=1e-9)


def _brute_top_k(cents, k):
    n = len(cents)
    sims = np.full((n, n), -np.inf)
    for i in range(n):
        for j in range(n):
            if i != j:
                sims[i, j] = matched_similarity(cents[i], cents[j])[0]
    return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]


def test_top_k_slides_exact_matches_brute_force_and_blocks_do_not_matter():
    rng = np.random.default_rng(3)
    cents = _unit(rng.normal(size=(9, 3, 5))).astype(np.float32)
    protos = Prototypes(cents, np.zeros(0, dtype=np.int64), np.ones(9, dtype=bool))
    ref_ids, ref_sims = _brute_top_k(cents, 2)
    for block in (1, 4, 256):
        nb = top_k_slides(protos, 2, block=block)
        np.testing.assert_allclose(nb.similarity, ref_sims, atol=1e-6)
        np.testing.assert_array_equal(nb.slides, ref_ids)
        assert (nb.slides != np.arange(9)[:, None]).all()
        for s in range(9):
            for j in range(2):
                expect = matched_similarity(cents[s], cents[nb.slides[s, j]])[1]
                np.testing.assert_array_equal(nb.perm[s, j], expect)


def test_top_k_prefilter_finds_near_duplicates_and_skips_invalid_slides():
    rng = np.random.default_rng(4)
    base = _unit(rng.normal(size=(20, 4, 16)))
    # slide 20 + i is slide i with its prototypes shuffled and slightly moved: its best match
    twins = _unit(base[:, ::-1] + 0.01 * rng.normal(size=base.shape))
    cents = np.concatenate([base, twins]).astype(np.float32)
    valid = np.ones(40, dtype=bool)
    valid[5] = False
    nb = top_k_slides(Prototypes(cents, np.zeros(0, dtype=np.int64), valid), 1, candidates=3, block=7)
    for i in range(20):
        if i == 5:
            assert nb.slides[5, 0] == -1 and nb.slides[25, 0] != 5
            continue
        assert nb.slides[i, 0] == 20 + i and nb.slides[20 + i, 0] == i
        np.testing.assert_array_equal(nb.perm[i, 0], [3, 2, 1, 0])  # the reversal is undone
    with pytest.raises(HistodistillError, match="candidates"):
        top_k_slides(Prototypes(cents, np.zeros(0, dtype=np.int64), valid), 4, candidates=2)


def test_prototype_targets_pick_own_and_matched_prototypes():
    cents = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)  # [S=3, M=2, D=2]
    protos = Prototypes(cents, np.zeros(0, dtype=np.int64), np.array([True, True, False]))
    nb = Neighbors(
        slides=np.array([[1], [0], [-1]]),
        similarity=np.zeros((3, 1)),
        perm=np.array([[[1, 0]], [[0, 1]], [[0, 1]]]),
    )
    intra, inter, keep = prototype_targets(protos, nb, np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]))
    assert keep.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(intra[:3], [cents[0, 0], cents[0, 1], cents[1, 1]])
    # slide 0's prototype 0 matches slide 1's prototype 1 (perm [1, 0]), and so on
    np.testing.assert_array_equal(inter[:3, 0], [cents[1, 1], cents[1, 0], cents[0, 1]])
    assert (intra[3] == 0).all() and (inter[3] == 0).all()


def test_l_intra_and_l_inter_equal_hand_computed_values():
    center = SoftmaxCenter(2)  # centre 0
    ln3 = math.log(3.0)
    # L_intra: target softmax([0, ln 3]) = [1/4, 3/4]; crops s1 = [0, 0], s2 = [ln 3, 0]; τ_t = τ_s = 1
    target = torch.tensor([[[0.0, ln3]]])
    crops = [torch.tensor([[0.0, 0.0]]), torch.tensor([[ln3, 0.0]])]
    h1 = math.log(2.0)
    h2 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    got = prototype_loss(crops, target, center, teacher_temp=1.0, student_temp=1.0)
    assert got.item() == pytest.approx((h1 + h2) / 2, rel=1e-6)
    # L_inter with K = 2 neighbours: targets [1/4, 3/4] and [3/4, 1/4] average to [1/2, 1/2]
    targets = torch.tensor([[[0.0, ln3], [ln3, 0.0]]])
    got = prototype_loss([torch.tensor([[0.0, ln3]])], targets, center, teacher_temp=1.0, student_temp=1.0)
    assert got.item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)
    # temperatures: τ_t = 0.5 sharpens [0, ln 3] to softmax([0, 2 ln 3]) = [1/10, 9/10]; τ_s = 0.5 likewise
    got = prototype_loss([torch.tensor([[0.0, ln3]])], target, center, teacher_temp=0.5, student_temp=0.5)
    assert got.item() == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), rel=1e-6)
    # the centre is subtracted: centre [0, ln 3] makes the target uniform
    center.center.copy_(torch.tensor([[0.0, ln3]]))
    got = prototype_loss([torch.tensor([[0.0, 0.0]])], target, center, teacher_temp=1.0, student_temp=1.0)
    assert got.item() == pytest.approx(math.log(2.0), rel=1e-6)
