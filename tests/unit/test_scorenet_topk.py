"""The perturbed sorted top-K (histodistill.bench.scorenet.topk) against exact values of its smoothed objective."""

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy.stats import norm

from histodistill.bench.scorenet.topk import (
    hard_sorted_topk,
    perturbed_sorted_topk,
    straight_through_topk,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_hard_topk_is_sorted_by_index():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.7]])
    y = hard_sorted_topk(scores, 3)
    # selected: indices 1, 3, 4 (scores .9, .8, .7) — rows in index order, not score order
    assert y.argmax(-1).tolist() == [[1, 3, 4]]
    assert torch.equal(y.sum(-1), torch.ones(1, 3))


def test_small_sigma_equals_hard_topk():
    scores = torch.randn(4, 12, generator=_gen(1))
    soft = perturbed_sorted_topk(scores, 4, num_samples=50, sigma=1e-6, generator=_gen(2))
    assert torch.equal(soft, hard_sorted_topk(scores, 4))


def test_polytope_constraints():
    scores = torch.randn(3, 10, generator=_gen(3))
    y = perturbed_sorted_topk(scores, 4, num_samples=200, sigma=0.7, generator=_gen(4))
    assert y.shape == (3, 4, 10)
    assert torch.allclose(y.sum(-1), torch.ones(3, 4))  # each row is a distribution over regions
    assert (y.sum(-2) <= 1 + 1e-6).all() and (y >= 0).all()  # each region is chosen at most once
    assert torch.allclose(y.sum((-1, -2)), torch.full((3,), 4.0))
    # sorted: the expected selected index increases down the rows
    positions = (y * torch.arange(10.0)).sum(-1)
    assert (positions.diff(dim=-1) > 0).all()


def _exact_top2_of_3(x: np.ndarray, sigma: float) -> np.ndarray:
    """E[Y(x + σZ)] for K = 2 of N = 3, exactly: the dropped index m is the argmin, with probability
    ∫ φ(z) Π_{j≠m} Φ((x_j − x_m)/σ − z) dz (Gauss–Hermite quadrature); the rows are the two others in order."""
    nodes, weights = hermegauss(80)
    weights = weights / np.sqrt(2 * np.pi)
    out = np.zeros((2, 3))
    for m in range(3):
        others = [j for j in range(3) if j != m]
        p = np.sum(weights * np.prod([norm.cdf((x[j] - x[m]) / sigma - nodes) for j in others], axis=0))
        for row, j in enumerate(others):
            out[row, j] += p
    return out


def test_forward_and_jacobian_match_the_exact_smoothed_objective():
    x0, sigma, n = np.array([0.3, -0.1, 0.2]), 0.4, 200_000
    x = torch.tensor(x0[None], dtype=torch.float64, requires_grad=True)
    y = perturbed_sorted_topk(x, 2, num_samples=n, sigma=sigma, generator=_gen(5))
    exact = _exact_top2_of_3(x0, sigma)
    # forward: a mean of n Bernoulli draws; 5 standard errors (≤ 0.5/√n each)
    assert np.abs(y[0].detach().numpy() - exact).max() < 5 * 0.5 / np.sqrt(n)
    # Jacobian rows by vector–Jacobian products vs central finite differences of the exact objective
    h = 1e-5
    fd = np.stack(
        [
            (_exact_top2_of_3(x0 + h * e, sigma) - _exact_top2_of_3(x0 - h * e, sigma)) / (2 * h)
            for e in np.eye(3)
        ],
        axis=-1,
    )  # [K, N, N_in]
    assert np.abs(fd).max() > 0.3  # a case where the gradient is large, not a flat region
    tol = 5 / (sigma * np.sqrt(n))  # 5 standard errors: |Y Z/σ| has variance ≤ 1/σ² per draw
    for k in range(2):
        for m in range(3):
            (grad,) = torch.autograd.grad(y[0, k, m], x, retain_graph=True)
            assert np.abs(grad[0].numpy() - fd[k, m]).max() < tol, (k, m, grad, fd[k, m])


def test_straight_through_forward_is_hard_and_gradient_is_perturbed():
    scores = torch.tensor([[0.5, 0.1, 0.4, 0.45]], requires_grad=True)
    y = straight_through_topk(scores, 2, num_samples=2000, sigma=0.2, generator=_gen(6))
    assert torch.equal(y.detach(), hard_sorted_topk(scores.detach(), 2))
    (y * torch.arange(8.0).view(1, 2, 4)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_gradient_is_zero_where_no_draw_changes_the_selection():
    """The control variate: σ far below the score gaps → every draw is the hard top-K → gradient exactly 0
    (the uncentred estimator would return Y·mean(Z)/σ, noise of size 1/(σ√S))."""
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7]], requires_grad=True)
    y = perturbed_sorted_topk(scores, 2, num_samples=100, sigma=1e-4, generator=_gen(7))
    (y * torch.randn(1, 2, 4, generator=_gen(8))).sum().backward()
    assert torch.equal(scores.grad, torch.zeros_like(scores))


@pytest.mark.parametrize("k", [0, 5])
def test_bad_k_is_an_error(k):
    with pytest.raises(ValueError, match="1 <= k <= N"):
        perturbed_sorted_topk(torch.zeros(1, 4), k)
