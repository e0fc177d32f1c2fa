"""SLPD's per-slide prototypes, the Hungarian set similarity of two slides and their top-K similar slides.

Source: Yu, Lin & Xu, "SLPD: Slide-level Prototypical Distillation for WSIs" (MICCAI 2023), Sec. 2.2-2.3, and
its reference code (github.com/Carboxy/SLPD, `Hierarchical-Pretraining/main_SLPD.py`, `train_one_epoch`):
before each epoch the teacher's L2-normalised region codes of every slide are clustered by k-means into M
prototypes (slides with fewer than `min_regions` regions are left out: `--min_num_region`, 32 for
TCGA-NSCLC, 16 for TCGA-BRCA); two slides are compared by the best one-to-one matching of their prototype
sets; each slide's K most similar slides (`--neighbor_num`, 1 in the paper's runs) provide the inter-slide
targets.

Deliberate deviations from the reference code, each named:
- k-means is scikit-learn's `KMeans` (the reference runs faiss k-means), seeded, on L2-normalised codes;
  the prototypes are L2-normalised afterwards (the reference's `run_kmeans(normalize=True)`).
- The matching is scipy's `linear_sum_assignment` (Hungarian), which is what the paper describes; the
  reference enumerates all M! permutations (exact too, but M! grows fast). The similarity is the *mean*
  cosine of matched prototypes (the reference sums: same ranking).
- The inter-slide target of prototype i is the prototype matched to i by that optimal assignment (the
  paper); the reference code takes the argmax cosine per prototype, which may map two prototypes to one.
- The reference builds an all-pairs [N, N, M!] similarity tensor: quadratic memory. `top_k_slides` works
  block by block (memory O(block · N + N · C)) and may prefilter C candidate slides per slide by the
  cosine of their mean prototype (approximate top-K; `candidates=None` is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from histodistill.errors import HistodistillError


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Prototypes:
    """Per-slide k-means prototypes.

    centroids: [S, M, D] float32, L2-normalised (zeros for a slide that is not `valid`);
    assignment: [N] int64, the prototype of each region within its slide (-1 for a slide not valid);
    valid: [S] bool, slides with at least `min_regions` regions (only those take part in L_intra/L_inter).
    """

    centroids: np.ndarray
    assignment: np.ndarray
    valid: np.ndarray


def slide_prototypes(
    features: np.ndarray,
    slide_index: np.ndarray,
    n_slides: int,
    n_prototypes: int,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 100,
    min_regions: int | None = None,
) -> Prototypes:
    """k-means of each slide's region codes into `n_prototypes` prototypes (SLPD Sec. 2.2).

    features: [N, D] region codes (L2-normalised here); slide_index: [N] ints in [0, n_slides). Every slide is
    clustered with `KMeans(n_clusters=M, random_state=seed, n_init, max_iter)`, so the result is a function of
    the inputs and the seed. `min_regions` (default M) is the fewest regions a slide needs to be clustered.
    Raises HistodistillError for mismatched lengths, a slide index out of range or M < 1.
    """
    features = np.asarray(features, dtype=np.float32)  # L2-normalised per slide by cluster_slide
    slide_index = np.asarray(slide_index, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(slide_index):
        raise HistodistillError(f"features {features.shape} and slide_index {slide_index.shape} do not match")
    if n_prototypes < 1:
        raise HistodistillError(f"n_prototypes must be at least 1, not {n_prototypes}")
    if len(slide_index) and (slide_index.min() < 0 or slide_index.max() >= n_slides):
        raise HistodistillError(f"slide_index outside [0, {n_slides})")
    min_regions = max(n_prototypes, min_regions or n_prototypes)
    centroids = np.zeros((n_slides, n_prototypes, features.shape[1]), dtype=np.float32)
    assignment = np.full(len(features), -1, dtype=np.int64)
    valid = np.zeros(n_slides, dtype=bool)
    order = np.argsort(slide_index, kind="stable")
    bounds = np.searchsorted(slide_index[order], np.arange(n_slides + 1))
    for s in range(n_slides):
        rows = order[bounds[s] : bounds[s + 1]]
        if len(rows) < min_regions:
            continue
        centroids[s], assignment[rows] = cluster_slide(features[rows], n_prototypes, seed, n_init, max_iter)
        valid[s] = True
    return Prototypes(centroids, assignment, valid)


def cluster_slide(
    features: np.ndarray, n_prototypes: int, seed: int = 0, n_init: int = 3, max_iter: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """k-means of one slide's region codes [r, D] (L2-normalised here) into M = `n_prototypes`:
    (prototypes [M, D] float32, L2-normalised; assignment [r] int64). `slide_prototypes` runs it per slide;
    streaming callers (slide.pretrain) run it on one slide's codes at a time. Deterministic given `seed`.
    Raises ValueError (scikit-learn) for r < M."""
    km = KMeans(n_clusters=n_prototypes, random_state=seed, n_init=n_init, max_iter=max_iter)
    labels = km.fit_predict(_normalize(features))
    return _normalize(km.cluster_centers_), labels.astype(np.int64)


def matched_similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """The set similarity of two prototype sets a, b [M, D] (L2-normalised): the mean cosine of the
    optimal one-to-one matching, max over permutations π of (1/M) Σ_i cos(a_i, b_π(i)) (SLPD Eq. 5), by
    the Hungarian algorithm (scipy `linear_sum_assignment`). Returns (similarity, π as [M] indices into b)."""
    sim = np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T
    rows, cols = linear_sum_assignment(sim, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return float(sim[rows, cols].mean()), perm


@dataclass(frozen=True)
class Neighbors:
    """Each slide's K most similar slides: slides [S, K] (−1 where fewer exist or the slide is not valid),
    similarity [S, K] (matched mean cosine, NaN where absent) and perm [S, K, M] (prototype i of the slide
    matches prototype perm[s, k, i] of neighbour slides[s, k])."""

    slides: np.ndarray
    similarity: np.ndarray
    perm: np.ndarray


def top_k_slides(
    prototypes: Prototypes, k: int, candidates: int | None = None, block: int = 256
) -> Neighbors:
    """The `k` slides whose prototype sets match each slide's best (SLPD Sec. 2.3), never itself.

    With `candidates` = C, each slide's C most similar slides by the cosine of their mean prototypes are
    matched (an approximate top-K; C ≥ k); with None, all valid slides are (exact, O(S²) matchings). The
    mean-prototype cosines are computed `block` slides at a time, so memory is O(block · S + S · C), never an
    [S, S] matrix; time is O(S² D / block) for the prefilter and O(S · C · M³) for the matchings.
    Raises HistodistillError for k < 1 or C < k.
    """
    if k < 1:
        raise HistodistillError(f"k must be at least 1, not {k}")
    if candidates is not None and candidates < k:
        raise HistodistillError(f"candidates ({candidates}) must be at least k ({k})")
    cents, valid = prototypes.centroids, prototypes.valid
    n_slides, m = cents.shape[:2]
    valid_ids = np.flatnonzero(valid)
    out_slides = np.full((n_slides, k), -1, dtype=np.int64)
    out_sim = np.full((n_slides, k), np.nan, dtype=np.float64)
    out_perm = np.zeros((n_slides, k, m), dtype=np.int64)
    if len(valid_ids) < 2:
        return Neighbors(out_slides, out_sim, out_perm)
    means = _normalize(cents[valid_ids].mean(axis=1))
    n_cand = len(valid_ids) - 1 if candidates is None else min(candidates, len(valid_ids) - 1)
    for start in range(0, len(valid_ids), block):
        ids = np.arange(start, min(start + block, len(valid_ids)))
        if n_cand == len(valid_ids) - 1:
            cand = np.stack([np.delete(np.arange(len(valid_ids)), i) for i in ids])
        else:
            cos = means[ids] @ means.T  # [block, S_valid]
            cos[np.arange(len(ids)), ids] = -np.inf  # never itself
            cand = np.argpartition(-cos, n_cand - 1, axis=1)[:, :n_cand]
        for row, i in enumerate(ids):
            a = cents[valid_ids[i]]
            sims = np.einsum("md,cnd->cmn", a, cents[valid_ids[cand[row]]])  # [C, M, M]
            scores = np.empty(len(cand[row]))
            perms = np.empty((len(cand[row]), m), dtype=np.int64)
            for c in range(len(cand[row])):
                r, col = linear_sum_assignment(sims[c], maximize=True)
                perms[c, r] = col
                scores[c] = sims[c][r, col].mean()
            best = np.argsort(-scores, kind="stable")[:k]
            s = valid_ids[i]
            out_slides[s, : len(best)] = valid_ids[cand[row][best]]
            out_sim[s, : len(best)] = scores[best]
            out_perm[s, : len(best)] = perms[best]
    return Neighbors(out_slides, out_sim, out_perm)


def prototype_targets(
    prototypes: Prototypes, neighbors: Neighbors, slide_index: np.ndarray, assignment: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prototype targets of a batch of regions (SLPD Eqs. 4 and 6).

    slide_index, assignment: [B] the regions' slides and their prototype in that slide (Prototypes.assignment).
    Returns (intra [B, D], the region's own prototype c; inter [B, K, D], the prototypes matched to c in the K
    neighbour slides; keep [B] bool, regions of a valid slide with all K neighbours). Rows not kept are zero.
    """
    slide_index = np.asarray(slide_index, dtype=np.int64)
    assignment = np.asarray(assignment, dtype=np.int64)
    cents = prototypes.centroids
    k = neighbors.slides.shape[1]
    keep = prototypes.valid[slide_index] & (assignment >= 0) & (neighbors.slides[slide_index] >= 0).all(1)
    a = np.where(keep, assignment, 0)
    intra = np.where(keep[:, None], cents[slide_index, a], 0.0).astype(np.float32)
    nb = np.where(keep[:, None], neighbors.slides[slide_index], 0)  # [B, K]
    matched = neighbors.perm[slide_index[:, None], np.arange(k)[None, :], a[:, None]]  # [B, K]
    inter = np.where(keep[:, None, None], cents[nb, matched], 0.0).astype(np.float32)
    return intra, inter, keep
