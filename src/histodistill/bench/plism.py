"""PLISM robustness benchmark: the metrics of Owkin's public `plismbench`, computed blockwise.

PLISM images the same tissue under 13 stainings × 7 scanners (91 slides) with matched tiles: tile i of every
slide is the same tissue. For each unordered slide pair (A, B), with L2-normalised features a_i, b_i:

- cosine = mean_i cos(a_i, b_i);
- top-k accuracy: in the union of A's and B's tiles (2n rows), a_i scores a hit when b_i is among its k most
  similar rows other than a_i itself, likewise b_i for a_i; acc@k = (hit rate A→B + hit rate B→A) / 2.

Ties are decided deterministically: a hit is when fewer than k rows (other than the row itself and its
target) are *strictly* more similar than the target. `plismbench` breaks ties by `argpartition` order, so
results agree except on exact ties, which happen in practice only with `dtype="float16"`.

`compat` (default "exact") selects what is computed. "exact" is the above: the mathematically intended
metric, features L2-normalised in float32 (after rounding them to float16 with `dtype="float16"`). "plismbench"
reproduces the public benchmark's numbers (owkin/plism-benchmark, commit b4f32b7 of 2025-06-06:
`metrics/cosine_similarity.py`, `metrics/retrieval.py`, `utils/aggregate.py`, `utils/metrics.py`), which
differ in two ways:

1. **Near-duplicates.** plismbench rounds the raw features to float16 and divides the float16 dot products
   (float32 accumulation, one rounding) by the product of the float16 norms (`np.linalg.norm` of the float16
   rows: squares rounded to float16, summed in float32, rounded, square root rounded), each step rounded to
   float16. A tile's similarity to itself is then not exactly 1, and its top-k list is the `argpartition`
   positions 1…k of the whole 2n row, self included: a matched tile whose rounded cosine reaches the self
   similarity (in practice a matched cosine ≥ ~0.998) takes position 0, is dropped with it, and counts as a
   miss, where "exact" counts it as a hit. Ties fall where `argpartition` puts them: its default `--device
   gpu` runs CuPy, whose `argpartition` is a full stable sort (ties by column index: "plismbench"); its
   `--device cpu` runs NumPy's introselect ("plismbench_cpu", which calls `np.argpartition` on the rows
   whose outcome a tie decides). The per-pair cosine is the float16 mean of the float16 diagonal.
2. **Rounding.** Its summary rounds each median to 3 decimals, and the leaderboard is the mean of those
   rounded medians, rounded to 3 decimals (`leaderboard_metric(..., decimals=3)`; the report does this for
   score files made with a plismbench compat).

**Robustness index** (de Jong, Marcus & Teuwen 2025, "Current pathology foundation models are unrobust to
medical center differences", arXiv 2501.18055): among the k nearest neighbours (cosine) of each sample, SO
counts those with the same biology from another site and OS those with other biology from the same site;
RI_k = ΣSO / ΣOS over all samples (> 1: biology dominates the site). Here the samples are `robustness_tiles`
matched tiles of every slide pooled together (S·m points), the biology is the matched tile (m classes of S
samples, so up to S − 1 neighbours can be SO), and the site is the slide (scanner × staining), the scanner,
or the staining: metrics `ri_slide_k{k}`, `ri_scanner_k{k}`, `ri_staining_k{k}` in group "pooled" (one value
per model, no pairs). Neighbours exclude the sample itself; ties at the k-th distance are broken by
`argpartition`. The package `croma` (PyPI, 1.0.1) implements PathoROB's normalised variant SO / (SO + OS)
with a k chosen by k-NN accuracy and a per-sample Python loop, so de Jong's ratio is computed here.

Deliberate deviation: the float32 accumulation order of the dot products is BLAS's, not NumPy's sequential
float16 `matmul` (CPU) nor cuBLAS's (GPU), so about 2 in 1,000 similarities can land one float16 step away;
the effect on a pair's accuracy is far below the printed third decimal. A plismbench compat costs about 4×
"exact" (it forms the 2n × 2n similarity rows, as plismbench does).

Pairs are grouped as in `plismbench`: inter-scanner (same staining), inter-staining (same scanner), both
different, and all pairs. The leaderboard metric is the mean of four medians: cosine over all pairs and
top-10 accuracy for each of the three groups.

How it is computed (exact, and without any n × n matrix in memory). The rows that compete with b_i for a_i
are A's other rows and B's other rows. A's own similarities do not depend on the partner slide, and a
target can only be a hit for k ≤ kmax when fewer than kmax rows beat it, so each slide's kmax largest
similarities to its own other tiles are computed once per slide ([n, kmax] floats). A pair then needs only
the cross similarities A·Bᵀ, in row blocks: per block, each row counts its cross rows above its target and
each column (a row of B) accumulates the A rows above its target. That is n²·D multiply-adds per pair
instead of the 4n²·D of the full 2n × 2n matrix, and no sort. Slides are read lazily (one at a time from
an array, a Zarr array or an embedding store) and a small LRU cache keeps a bounded number of them.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.registry import Benchmark, Figure, by_model
from histodistill.bench.stats import (
    STATS,
    bootstrap_statistic,
    pair_weights,
    percentile_ci,
    slide_resamples,
    summarize,
)
from histodistill.holdout import TissueHoldoutConfig, held_out_positions
from histodistill.provenance import provenance, read_parquet, write_parquet

N_BOOT = 1000  # cluster-bootstrap replicates (slides) of the CIs: config key benchmarks.plism.n_boot
log = logging.getLogger(__name__)

DEFAULT_TOP_K = (1, 3, 5, 10)
SLIDE_COLUMNS = ("slide_id", "scanner", "staining")
COSINE = "cosine"
# Beside the matched-tile cosine: the cosine of *different* tiles of the same slide pair, and the margin. A
# model that embeds every tile alike (a collapsed student) has a matched cosine near 1 and so ranks high on
# cosine, but its unmatched cosine is near 1 too and its separation near 0. Not part of plismbench.
COSINE_UNMATCHED = "cosine_unmatched"
SEPARATION = "separation"
COLLAPSE_UNMATCHED = 0.95  # median unmatched cosine at or above this flags a model as collapsed
INTER_SCANNER = "inter_scanner"  # same staining, different scanner
INTER_STAINING = "inter_staining"  # same scanner, different staining
INTER_BOTH = "inter_scanner_staining"  # both different
REPLICATE = "replicate"  # same scanner and staining (not in PLISM): counted in "all" only
ALL = "all"
PAIR_GROUPS = (INTER_SCANNER, INTER_STAINING, INTER_BOTH, REPLICATE)
LEADERBOARD = ((ALL, COSINE), (INTER_SCANNER, "top_10"), (INTER_STAINING, "top_10"), (INTER_BOTH, "top_10"))
_DTYPES = {"float32": np.float32, "float16": np.float16}
COMPAT = ("exact", "plismbench", "plismbench_cpu")
POOLED = "pooled"  # group of the robustness-index rows: all slides pooled, not a slide pair
RI_SITES = ("slide", "scanner", "staining")
DEFAULT_RI_K = (10, 50)
LEADERBOARD_DECIMALS = 3  # plismbench rounds its medians, then the leaderboard mean, to 3 decimals


def metric_names(top_k: Sequence[int] = DEFAULT_TOP_K) -> list[str]:
    """The plismbench metrics of a slide pair: matched cosine and top-k accuracies."""
    return [COSINE, *(f"top_{k}" for k in top_k)]


def unmatched_cosine(xa: np.ndarray, xb: np.ndarray, seed: Sequence[int], dtype: Any = "float32") -> float:
    """Mean cosine of tile i of slide A with a *different* tile j(i) of slide B, from normalised [n, D].

    j(i) = (i + u_i) mod n with u_i uniform in 1 … n−1 drawn from `seed`: a random pairing that never pairs
    a tile with itself. Raises BenchmarkError for fewer than 2 tiles.
    """
    n = len(xa)
    if n < 2:
        raise BenchmarkError("the unmatched cosine needs at least 2 tiles per slide")
    j = (np.arange(n) + np.random.default_rng(list(seed)).integers(1, n, size=n)) % n
    return float(_round(np.einsum("ij,ij->i", xa, xb[j]), _dtype(dtype)).mean(dtype=np.float64))


def pair_group(scanner_a: str, staining_a: str, scanner_b: str, staining_b: str) -> str:
    """The robustness group of a slide pair, from what differs between the two slides."""
    if staining_a == staining_b:
        return INTER_SCANNER if scanner_a != scanner_b else REPLICATE
    return INTER_STAINING if scanner_a == scanner_b else INTER_BOTH


def slide_pairs(slides: pd.DataFrame) -> pd.DataFrame:
    """All unordered pairs a < b (positions in `slides`) with their slide ids and group."""
    slides = _check_slides(slides)
    ids, scanners, stainings = (slides[c].tolist() for c in SLIDE_COLUMNS)
    rows = [
        (a, b, ids[a], ids[b], pair_group(scanners[a], stainings[a], scanners[b], stainings[b]))
        for a, b in itertools.combinations(range(len(slides)), 2)
    ]
    return pd.DataFrame(rows, columns=["a", "b", "slide_a", "slide_b", "group"])


# ----------------------------------------------------------------------------------------------- kernels


def _dtype(dtype: Any) -> type:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise BenchmarkError(f"dtype {dtype!r} is not supported; use 'float32' or 'float16'")
    return _DTYPES[name]


def _round(x: np.ndarray, dtype: type) -> np.ndarray:
    """Similarities rounded to `dtype` (kept in float32 storage so comparisons stay fast)."""
    if dtype is np.float16:
        np.copyto(x, x.astype(np.float16))
    return x


def normalize_features(x: np.ndarray, dtype: Any = "float32") -> np.ndarray:
    """Rows L2-normalised in float32 (after rounding the inputs to float16 when `dtype` is float16).

    A zero row stays zero (norm clamped at 1e-12), so its similarities are 0 rather than NaN.
    """
    dt = _dtype(dtype)
    x = np.array(x, dtype=np.float32, copy=True)
    if dt is np.float16:
        x = x.astype(np.float16).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _blocks(n: int, block_size: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, n, block_size):
        yield r0, min(r0 + block_size, n)


def self_topk(x: np.ndarray, kmax: int, block_size: int = 1024, dtype: Any = "float32") -> np.ndarray:
    """The kmax largest similarities of each row of normalised `x` to the slide's other rows, [n, kmax].

    Padded with -inf when the slide has at most kmax rows. Blockwise: memory is block_size × n.
    """
    dt = _dtype(dtype)
    n = len(x)
    out = np.full((n, kmax), -np.inf, dtype=np.float32)
    keep = min(kmax, n)
    for r0, r1 in _blocks(n, block_size):
        sim = _round(x[r0:r1] @ x.T, dt)
        local = np.arange(r1 - r0)
        sim[local, r0 + local] = -np.inf
        if keep < n:
            sim.partition(n - keep, axis=1)
        out[r0:r1, :keep] = sim[:, n - keep :]
    return out


def pair_scores(
    xa: np.ndarray,
    xb: np.ndarray,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    block_size: int = 1024,
    dtype: Any = "float32",
    self_a: np.ndarray | None = None,
    self_b: np.ndarray | None = None,
) -> np.ndarray:
    """[cosine, acc@k for k in top_k] of one slide pair, from normalised features xa, xb [n, D].

    `self_a`/`self_b` are the slides' `self_topk` (computed here when not given; the scorer caches them).
    """
    dt = _dtype(dtype)
    kmax = max(top_k)
    if xa.shape != xb.shape:
        raise BenchmarkError(f"slide pair: features of shape {xa.shape} and {xb.shape} are not matched tiles")
    for given in (self_a, self_b):
        if given is not None and given.shape != (len(xa), kmax):
            raise BenchmarkError(f"self similarities of shape {given.shape}, expected {(len(xa), kmax)}")
    if self_a is None:
        self_a = self_topk(xa, kmax, block_size, dt)
    if self_b is None:
        self_b = self_topk(xb, kmax, block_size, dt)
    n = len(xa)
    target = _round(np.einsum("ij,ij->i", xa, xb), dt)  # sim(a_i, b_i)
    above_a = np.empty(n, dtype=np.int64)  # per a_i: rows of B other than b_i more similar than b_i
    above_b = np.zeros(n, dtype=np.int64)  # per b_i: rows of A other than a_i more similar than a_i
    for r0, r1 in _blocks(n, block_size):
        sim = _round(xa[r0:r1] @ xb.T, dt)
        local = np.arange(r1 - r0)
        sim[local, r0 + local] = -np.inf  # the target itself never competes
        above_a[r0:r1] = np.count_nonzero(sim > target[r0:r1, None], axis=1)
        above_b += np.count_nonzero(sim > target[None, :], axis=0)
    above_a += np.count_nonzero(self_a > target[:, None], axis=1)
    above_b += np.count_nonzero(self_b > target[:, None], axis=1)
    out = [float(target.mean(dtype=np.float64))]
    out += [(np.mean(above_a < k) + np.mean(above_b < k)) / 2.0 for k in top_k]
    return np.asarray(out, dtype=np.float64)


def _check_compat(compat: str) -> str:
    if compat not in COMPAT:
        raise BenchmarkError(f"compat {compat!r} is not one of {COMPAT}")
    return compat


def _mul16(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float16 × float16 rounded to float16 (the float32 product is exact, as NumPy's half multiply)."""
    return (x.astype(np.float32) * y.astype(np.float32)).astype(np.float16)


def _div16(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float16 / float16 rounded to float16 through float32, as NumPy's and CuPy's half division."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (x.astype(np.float32) / y.astype(np.float32)).astype(np.float16)


def _hit_positions(cos: np.ndarray, target: np.ndarray, kth: int, ties: str) -> np.ndarray:
    """Per row of a float16 similarity block [b, 2n], the position (0-based, descending) that a full sort
    gives column `target[row]`: stable ties (lower column first) or NumPy's `argpartition` order (only
    rows whose hits a tie decides are partitioned; kth positions 1…kth are then exact). Positions past
    kth are reported as kth + 1."""
    rows = np.arange(len(cos))
    t = cos[rows, target][:, None]
    greater = np.count_nonzero(cos > t, axis=1)
    tied = cos == t
    if ties == "index":
        before = np.count_nonzero(tied & (np.arange(cos.shape[1])[None, :] < target[:, None]), axis=1)
        return np.minimum(greater + before, kth + 1)
    lo, hi = greater, greater + np.count_nonzero(tied, axis=1) - 1  # the target's possible positions
    pos = np.minimum(lo, kth + 1)
    decided = (hi == lo) | (lo > kth)
    for k in range(0, kth + 1):  # positions 0 and 1…kth are the boundaries of every top-k window
        decided &= ~((lo <= k) & (hi > k))
    for r in np.flatnonzero(~decided):
        part = np.argpartition(-cos[r], range(1, kth + 1))[: kth + 1]
        where = np.flatnonzero(part == target[r])
        pos[r] = where[0] if len(where) else kth + 1
    return pos


def plismbench_pair_scores(
    xa: np.ndarray,
    xb: np.ndarray,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    block_size: int = 1024,
    compat: str = "plismbench",
) -> np.ndarray:
    """[cosine, acc@k for k in top_k] of one slide pair as plismbench computes them, from the *raw* features
    xa, xb [n, D] (not normalised; any float dtype, rounded to float16 here).

    The arithmetic and the tie rules are the module docstring's (`compat` "plismbench": ties by index as
    CuPy's sort; "plismbench_cpu": NumPy's `argpartition`). Memory: a block_size × 2n block.
    """
    if _check_compat(compat) == "exact":
        raise BenchmarkError(
            "plismbench_pair_scores computes a plismbench compat; use pair_scores for 'exact'"
        )
    if xa.shape != xb.shape:
        raise BenchmarkError(f"slide pair: features of shape {xa.shape} and {xb.shape} are not matched tiles")
    ties = "index" if compat == "plismbench" else "argpartition"
    a16 = np.asarray(xa, dtype=np.float32).astype(np.float16)
    b16 = np.asarray(xb, dtype=np.float32).astype(np.float16)
    n = len(a16)
    # CosineSimilarity: diag(a bᵀ) / (|a| |b|), each step in float16; the mean of float16 is float16
    dots = np.cumsum(a16.astype(np.float32) * b16.astype(np.float32), axis=1, dtype=np.float32)[:, -1]
    na, nb = np.linalg.norm(a16, axis=1), np.linalg.norm(b16, axis=1)
    cosine = float(_div16(dots.astype(np.float16), _mul16(na, nb)).mean())
    # TopkAccuracy: rows of the 2n × 2n cosine matrix of [a; b], positions 1…kmax of each row
    ab16 = np.concatenate([a16, b16])
    ab32 = ab16.astype(np.float32)
    norms = np.linalg.norm(ab16, axis=1)
    kmax = max(top_k)
    ks = np.asarray(top_k)
    hits = np.zeros((2, len(ks)), dtype=np.int64)
    for r0, r1 in _blocks(2 * n, block_size):
        cos = _div16((ab32[r0:r1] @ ab32.T).astype(np.float16), _mul16(norms[r0:r1, None], norms[None, :]))
        target = (np.arange(r0, r1) + n) % (2 * n)
        pos = _hit_positions(cos, target, kmax, ties)
        hit = (pos[:, None] >= 1) & (pos[:, None] <= ks[None, :])
        side = np.arange(r0, r1) >= n
        hits[0] += hit[~side].sum(axis=0)
        hits[1] += hit[side].sum(axis=0)
    accs = [(hits[0, j] / n + hits[1, j] / n) / 2 for j in range(len(ks))]
    return np.asarray([cosine, *accs], dtype=np.float64)


def robustness_index(
    x: np.ndarray,
    biology: Sequence,
    sites: Mapping[str, Sequence],
    ks: Sequence[int] = DEFAULT_RI_K,
    block_size: int = 1024,
) -> dict[str, float]:
    """de Jong et al.'s Robustness Index RI_k = ΣSO / ΣOS of L2-normalised samples x [N, D] (module docstring).

    `biology[i]` is sample i's biological class, `sites[name][i]` its site under each confounder `name`.
    Returns {f"ri_{name}_k{k}": value}; inf when no neighbour is OS (and SO > 0), NaN when neither.
    Blockwise: memory block_size × N. Raises BenchmarkError when k ≥ N or the lengths differ.
    """
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] >= n:
        raise BenchmarkError(f"robustness index: k values {ks} must be in 1 … {n - 1} (samples: {n})")
    bio = pd.factorize(np.asarray(biology, dtype=object))[0]
    site_codes = {name: pd.factorize(np.asarray(v, dtype=object))[0] for name, v in sites.items()}
    if len(bio) != n or any(len(c) != n for c in site_codes.values()):
        raise BenchmarkError(f"robustness index: {n} samples but labels of other lengths")
    kmax = ks[-1]
    so = {name: np.zeros(len(ks)) for name in site_codes}
    os_ = {name: np.zeros(len(ks)) for name in site_codes}
    for r0, r1 in _blocks(n, block_size):
        sim = x[r0:r1] @ x.T
        rows = np.arange(r1 - r0)
        sim[rows, r0 + rows] = -np.inf  # not its own neighbour
        top = np.argpartition(-sim, kmax - 1, axis=1)[:, :kmax]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)  # the kmax nearest, nearest first
        same_bio = bio[top] == bio[r0:r1, None]
        for name, code in site_codes.items():
            same_site = code[top] == code[r0:r1, None]
            so_cum = np.cumsum(same_bio & ~same_site, axis=1).sum(axis=0)
            os_cum = np.cumsum(~same_bio & same_site, axis=1).sum(axis=0)
            so[name] += [so_cum[k - 1] for k in ks]
            os_[name] += [os_cum[k - 1] for k in ks]
    out = {}
    for name in site_codes:
        for j, k in enumerate(ks):
            a, b = so[name][j], os_[name][j]
            out[f"ri_{name}_k{k}"] = float(a / b) if b > 0 else (float("inf") if a > 0 else float("nan"))
    return out


# ------------------------------------------------------------------------------------------------ inputs


class SlideMajorFeatures:
    """Per-slide view `[s] → [n, D]` of slide-major rows [S·n, D] (slide s = rows s·n … s·n+n−1).

    Reads one slide at a time (Zarr or memory-mapped arrays are never loaded whole); `order`, when given,
    permutes the rows of every slide (the PLISM tile subsets index tiles sorted by (x, y)).
    """

    def __init__(self, rows: Any, n_slides: int, order: np.ndarray | None = None, name: str = "features"):
        if len(rows.shape) != 2:
            raise BenchmarkError(f"{name}: expected pooled rows [N, D], got shape {tuple(rows.shape)}")
        total, dim = rows.shape
        if n_slides < 1 or total % n_slides:
            raise BenchmarkError(f"{name}: {total} rows do not split into {n_slides} slides of equal size")
        self.rows, self.n = rows, total // n_slides
        self.order = None if order is None else np.asarray(order)
        self.shape = (n_slides, self.n, dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: int) -> np.ndarray:
        s = int(s)
        if not 0 <= s < self.shape[0]:
            raise IndexError(s)
        x = np.asarray(self.rows[s * self.n : (s + 1) * self.n])
        return x if self.order is None else x[self.order]


def _open_embedding_store(path: str | Path) -> zarr.Group:
    """A finished embedding store, checked as `histodistill.embed.EmbeddingStore` does (without torch)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise BenchmarkError(f"not an embedding store: {path}")
    root = zarr.open_group(path, mode="r")
    if not root.attrs.get("complete"):
        raise BenchmarkError(f"{path} is incomplete; rerun the extraction to resume it")
    missing = [name for name in ("embeddings", "slide_index", "x0", "y0") if name not in root]
    if missing:
        raise BenchmarkError(f"embedding store {path} lacks array(s) {missing}")
    return root


def open_embedding_features(path: str | Path, sort_xy: bool = True) -> tuple[SlideMajorFeatures, list[str]]:
    """Matched-tile features of an embedding store (`histodistill.embed`), lazily per slide, + slide ids.

    The store's rows must be slide-major with the same tile count per slide. With `sort_xy`, every slide's
    rows are put in the (x0, y0) order of the first slide's tiles: the order PLISM tile subsets refer to,
    applied alike to all slides so that tile i stays the same tissue everywhere.
    """
    root = _open_embedding_store(path)
    emb = root["embeddings"]
    if emb.ndim != 2:
        raise BenchmarkError(f"{path}: PLISM scoring needs pooled [N, D] embeddings, not {emb.shape}")
    attrs = dict(root.attrs)
    slides = attrs.get("provenance", {}).get("slides") or []
    ids = [str(s["slide_id"]) for s in slides]
    slide_index = np.asarray(root["slide_index"][:])
    n_slides = len(ids) or int(slide_index.max(initial=-1)) + 1
    ids = ids or [str(i) for i in range(n_slides)]
    if n_slides == 0:
        raise BenchmarkError(f"embedding store {path} holds no slides")
    counts = np.bincount(slide_index, minlength=n_slides)
    if len(counts) != n_slides:
        raise BenchmarkError(
            f"{path}: rows refer to slide {len(counts) - 1} but the store lists {n_slides} slides"
        )
    if (counts != counts[0]).any():
        bad = int(np.flatnonzero(counts != counts[0])[0])
        raise BenchmarkError(
            f"{path}: slide {ids[bad]!r} has {counts[bad]} tiles but slide {ids[0]!r} has {counts[0]}; "
            "PLISM scoring needs the same matched tiles in every slide"
        )
    n = int(counts[0])
    expected = np.repeat(np.arange(n_slides), n)
    if (slide_index != expected).any():
        row = int(np.flatnonzero(slide_index != expected)[0])
        raise BenchmarkError(
            f"{path}: rows are not slide-major (row {row} belongs to slide {ids[slide_index[row]]!r}); "
            "embed the matched tile store in slide order"
        )
    order = None
    if sort_xy:
        order = np.lexsort((np.asarray(root["y0"][:n]), np.asarray(root["x0"][:n])))
    return SlideMajorFeatures(emb, n_slides, order, name=str(path)), ids


def _resolve_features(features: Any) -> tuple[Any, list[str] | None, dict]:
    """An array-like indexable by slide, the slide ids it carries (if any), and provenance about it."""
    if not isinstance(features, str | os.PathLike):
        return features, None, {"features": f"<{type(features).__name__}>"}
    path = Path(features)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r"), None, {"features": str(path)}
    if not (path / "zarr.json").is_file():
        raise BenchmarkError(f"features {path}: not a .npy file, Zarr array or embedding store")
    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Group):
        feats, ids = open_embedding_features(path)
        emb_prov = dict(node.attrs).get("provenance", {})
        meta = {"features": str(path), "embeddings_config_hash": emb_prov.get("config_hash")}
        return feats, ids, {**meta, "model_id": emb_prov.get("model_id")}
    if node.ndim != 3:
        raise BenchmarkError(f"features {path}: expected a [slide, tile, dim] array, got {node.shape}")
    return node, None, {"features": str(path)}


def _check_slides(slides: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in SLIDE_COLUMNS if c not in slides.columns]
    if missing:
        raise BenchmarkError(f"slide table lacks column(s) {missing}; it needs {list(SLIDE_COLUMNS)}")
    dup = slides["slide_id"][slides["slide_id"].duplicated()]
    if len(dup):
        raise BenchmarkError(f"slide table lists slide {dup.iloc[0]!r} more than once")
    return slides.reset_index(drop=True)


def _n_slides(feats: Any) -> int:
    shape = getattr(feats, "shape", None)
    return int(shape[0]) if shape is not None else len(feats)


def _slide_shapes(feats: Any, ids: Sequence[str]) -> tuple[int, int]:
    """(n tiles, D) shared by all slides; cheap (shapes only) for arrays and lists of arrays."""
    shape = getattr(feats, "shape", None)
    if shape is not None:
        if len(shape) != 3:
            raise BenchmarkError(f"features: expected [slide, tile, dim], got shape {tuple(shape)}")
        return int(shape[1]), int(shape[2])
    first = None
    for s, sid in enumerate(ids):
        sh = tuple(np.shape(feats[s]))
        if len(sh) != 2:
            raise BenchmarkError(f"slide {sid!r}: expected features [tile, dim], got shape {sh}")
        if first is None:
            first = sh
        elif sh[0] != first[0]:
            raise BenchmarkError(
                f"slide {sid!r} has {sh[0]} tiles but slide {ids[0]!r} has {first[0]}; "
                "PLISM scoring needs the same matched tiles in every slide"
            )
        elif sh[1] != first[1]:
            raise BenchmarkError(
                f"slide {sid!r} has {sh[1]}-dim features but slide {ids[0]!r} has {first[1]}"
            )
    assert first is not None
    return first


def _check_subset(subset: Any, n: int) -> np.ndarray | None:
    if subset is None:
        return None
    if isinstance(subset, str | os.PathLike):
        subset = np.load(subset)
    subset = np.asarray(subset)
    if subset.ndim != 1 or not np.issubdtype(subset.dtype, np.integer) or subset.size == 0:
        raise BenchmarkError(
            f"tile subset must be a non-empty 1-D integer array, got {subset.dtype} {subset.shape}"
        )
    bad = np.flatnonzero((subset < 0) | (subset >= n))
    if len(bad):
        raise BenchmarkError(
            f"tile subset entry {int(bad[0])} = {int(subset[bad[0]])} is out of range for {n} tiles per slide"
        )
    uniq, first = np.unique(subset, return_index=True)
    if len(uniq) != len(subset):
        dup = np.setdiff1d(np.arange(len(subset)), first)[0]
        raise BenchmarkError(f"tile subset repeats tile {int(subset[dup])} (entry {int(dup)})")
    return subset.astype(np.int64)


# ------------------------------------------------------------------------------------------------ scorer


class _SlideCache:
    """Thread-safe LRU of loaded slides; a slide being loaded by one thread is awaited, not loaded twice."""

    def __init__(self, load: Callable[[int], np.ndarray], capacity: int):
        self._load, self._capacity = load, max(2, capacity)
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._loading: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, s: int) -> np.ndarray:
        while True:
            with self._lock:
                if s in self._items:
                    self._items.move_to_end(s)
                    return self._items[s]
                event = self._loading.get(s)
                mine = event is None
                if mine:
                    event = self._loading[s] = threading.Event()
            if not mine:
                event.wait()
                continue
            try:
                value = self._load(s)
            except BaseException:
                with self._lock:
                    self._loading.pop(s).set()
                raise
            with self._lock:
                self._items[s] = value
                while len(self._items) > self._capacity:
                    self._items.popitem(last=False)
                self._loading.pop(s).set()
            return value


def _pair_schedule(n_slides: int, group: int) -> list[tuple[int, int]]:
    """All pairs a < b, in tiles of `group` × `group` slides so that a small cache serves many pairs."""
    starts = range(0, n_slides, group)
    out = []
    for i, j in itertools.combinations_with_replacement(starts, 2):
        out += [
            (a, b)
            for a in range(i, min(i + group, n_slides))
            for b in range(j, min(j + group, n_slides))
            if a < b
        ]
    return out


def _map(workers: int, fn: Callable, items: Sequence) -> Iterator:
    if workers <= 1:
        return map(fn, items)

    def gen():
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plism")
        try:
            yield from pool.map(fn, items)
        finally:  # on error (or an abandoned generator) drop the queued tasks instead of running them
            pool.shutdown(wait=True, cancel_futures=True)

    return gen()


def score_pairs(
    features: Any,
    slides: pd.DataFrame,
    *,
    tiles_subset: Any = None,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    dtype: Any = "float32",
    block_size: int = 1024,
    workers: int = 1,
    cache_slides: int = 4,
    unmatched: bool = False,
    compat: str = "exact",
    robustness_tiles: int = 0,
    robustness_k: Sequence[int] = DEFAULT_RI_K,
) -> pd.DataFrame:
    """Score every slide pair: a tidy frame slide_a, slide_b, group, metric, value (pairs in slide order).

    Metrics per pair: plismbench's (`metric_names(top_k)`); with `unmatched`, also `cosine_unmatched`
    (`unmatched_cosine`, seeded by the pair's slide positions) and `separation` (matched − unmatched cosine).

    `features[s]` → [n, D] for slide s of `slides` (same order): a numpy / memory-mapped / Zarr array
    [S, n, D], a list of arrays, or a `SlideMajorFeatures`. `tiles_subset` selects rows of every slide.
    Memory: `cache_slides` + `workers` normalised slides, S·n·kmax floats, and one block_size × n block per
    worker. `workers` threads score pairs concurrently (BLAS releases the GIL); results equal the serial
    path's. `dtype="float16"` rounds features and similarities to float16 like `plismbench`. `compat`
    "plismbench" / "plismbench_cpu" reproduce the public benchmark's float16 arithmetic and tie order instead
    (`plismbench_pair_scores`; always float16, `dtype` is then not used; see the module docstring).
    `robustness_tiles` m > 0 adds the robustness index (`robustness_index`, k in `robustness_k`) of m evenly
    spaced scored tiles of every slide pooled, as rows of group "pooled" with empty slide ids.
    """
    slides = _check_slides(slides)
    ids = slides["slide_id"].astype(str).tolist()
    n_slides = _n_slides(features)
    if n_slides != len(slides):
        raise BenchmarkError(f"features hold {n_slides} slides but the slide table lists {len(slides)}")
    if n_slides < 2:
        raise BenchmarkError(f"PLISM scoring needs at least 2 slides, got {n_slides} ({ids})")
    top_k = [int(k) for k in top_k]
    if not top_k or min(top_k) < 1 or len(set(top_k)) != len(top_k):
        raise BenchmarkError(f"top_k must be distinct positive integers, got {top_k}")
    if int(block_size) < 1 or int(workers) < 1 or int(cache_slides) < 1:
        raise BenchmarkError(
            f"block_size, workers, cache_slides must be ≥ 1: {block_size}, {workers}, {cache_slides}"
        )
    dt = _dtype(dtype)
    exact = _check_compat(compat) == "exact"
    n, dim = _slide_shapes(features, ids)
    subset = _check_subset(tiles_subset, n)
    kmax = max(top_k)

    def load(s: int) -> np.ndarray:
        x = np.asarray(features[s])
        if x.shape != (n, dim):
            raise BenchmarkError(f"slide {ids[s]!r}: features have shape {x.shape}, expected {(n, dim)}")
        if subset is not None:
            x = x[subset]
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            tile = int(subset[rows[0]]) if subset is not None else int(rows[0])
            raise BenchmarkError(
                f"slide {ids[s]!r}: {len(rows)} tile(s) have NaN/inf features (first: tile {tile})"
            )
        return normalize_features(x, dt) if exact else np.asarray(x, dtype=np.float32)

    cache = _SlideCache(load, int(cache_slides) + int(workers))
    tops: list[np.ndarray | None] = [None] * n_slides

    def prepare(s: int) -> None:
        tops[s] = self_topk(cache.get(s), kmax, block_size, dt)

    def score(pair: tuple[int, int]) -> np.ndarray:
        a, b = pair
        xa, xb = cache.get(a), cache.get(b)
        if exact:
            matched = pair_scores(xa, xb, top_k, block_size, dt, tops[a], tops[b])
        else:
            matched = plismbench_pair_scores(xa, xb, top_k, block_size, compat)
            xa, xb = normalize_features(xa, np.float16), normalize_features(xb, np.float16)
        if not unmatched:
            return matched
        other = unmatched_cosine(xa, xb, (a, b), dt if exact else np.float16)
        return np.concatenate([matched, [other, matched[0] - other]])

    start = time.perf_counter()
    if exact:  # plismbench's arithmetic has no per-slide part to share
        for _ in _map(workers, prepare, range(n_slides)):
            pass
    schedule = _pair_schedule(n_slides, max(1, int(cache_slides) // 2))
    names = [*metric_names(top_k), *((COSINE_UNMATCHED, SEPARATION) if unmatched else ())]
    values = np.empty((len(schedule), len(names)))
    last = time.perf_counter()
    for i, v in enumerate(_map(workers, score, schedule)):
        values[i] = v
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            rate = (i + 1) / (last - start)
            log.info("PLISM: %d/%d pairs (%.2f pairs/s)", i + 1, len(schedule), rate)
    log.info("PLISM: %d pairs in %.1f s", len(schedule), time.perf_counter() - start)

    pairs = slide_pairs(slides)
    position = {pair: i for i, pair in enumerate(schedule)}
    values = values[[position[(a, b)] for a, b in zip(pairs["a"], pairs["b"], strict=True)]]
    m = len(names)
    frame = pd.DataFrame(
        {
            "slide_a": np.repeat(pairs["slide_a"].to_numpy(object), m),
            "slide_b": np.repeat(pairs["slide_b"].to_numpy(object), m),
            "group": np.repeat(pairs["group"].to_numpy(object), m),
            "metric": np.tile(np.array(names, dtype=object), len(pairs)),
            "value": values.ravel(),
        }
    )
    if int(robustness_tiles) <= 0:
        return frame
    n_scored = len(subset) if subset is not None else n
    m_tiles = min(int(robustness_tiles), n_scored)
    rows = np.unique(np.linspace(0, n_scored - 1, m_tiles).round().astype(np.int64))
    pooled = np.concatenate(
        [(x if exact else normalize_features(x, np.float16))[rows] for x in map(cache.get, range(n_slides))]
    )
    rep = len(rows)
    ri = robustness_index(
        pooled,
        np.tile(np.arange(rep), n_slides),
        {
            "slide": np.repeat(np.asarray(ids, dtype=object), rep),
            "scanner": np.repeat(slides["scanner"].astype(str).to_numpy(object), rep),
            "staining": np.repeat(slides["staining"].astype(str).to_numpy(object), rep),
        },
        robustness_k,
        block_size,
    )
    log.info("PLISM robustness index (%d tiles × %d slides): %s", rep, n_slides, ri)
    extra = pd.DataFrame(
        {"slide_a": "", "slide_b": "", "group": POOLED, "metric": list(ri), "value": list(ri.values())}
    )
    return pd.concat([frame, extra], ignore_index=True)


def _digest(array: np.ndarray | None) -> str | None:
    return None if array is None else hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _read_slide_table(slides: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(slides, pd.DataFrame):
        return slides
    path = Path(slides)
    if not path.is_file():
        raise BenchmarkError(f"slide table {path} does not exist")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def score_plism(
    features: Any,
    slides: pd.DataFrame | str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    tiles_subset: Any = None,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    dtype: Any = "float32",
    block_size: int = 1024,
    workers: int = 1,
    cache_slides: int = 4,
    unmatched: bool = False,
    compat: str = "exact",
    robustness_tiles: int = 0,
    robustness_k: Sequence[int] = DEFAULT_RI_K,
    held_out_tissues: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Score all pairs (see `score_pairs`; `robustness_tiles` adds the pooled robustness index; `unmatched` adds the unmatched cosine and the separation; `compat`
    exact or plismbench's arithmetic) and write the tidy frame to Parquet `out` atomically.

    `features`: an array-like, or a path to an embedding store, a [S, n, D] Zarr array or a .npy file.
    `tiles_subset`: int array or .npy path (e.g. the 8,139-tile leaderboard subset). Provenance (settings,
    subset digest, features' config hash) goes to the schema metadata under b"histodistill".
    `held_out_tissues`: the tissue ids whose tiles `tiles_subset` is (`histodistill.holdout`), recorded in
    the provenance so the report can say which tissues were scored.
    """
    feats, store_ids, source = _resolve_features(features)
    slides = _check_slides(_read_slide_table(slides))
    if store_ids is not None:
        table_ids = slides["slide_id"].astype(str).tolist()
        for s, (want, got) in enumerate(zip(store_ids, table_ids, strict=False)):
            if want != got:
                raise BenchmarkError(
                    f"slide table row {s} is {got!r} but the embedding store's slide {s} is {want!r}; "
                    "list the slides in the store's order"
                )
    subset = np.load(tiles_subset) if isinstance(tiles_subset, str | os.PathLike) else tiles_subset
    subset = None if subset is None else np.asarray(subset)
    scores = score_pairs(
        feats,
        slides,
        tiles_subset=subset,
        top_k=top_k,
        dtype=dtype,
        block_size=block_size,
        workers=workers,
        cache_slides=cache_slides,
        unmatched=unmatched,
        compat=compat,
        robustness_tiles=robustness_tiles,
        robustness_k=robustness_k,
    )
    n, dim = _slide_shapes(feats, slides["slide_id"].astype(str).tolist())
    params = {
        "top_k": [int(k) for k in top_k],
        "unmatched": bool(unmatched),
        "compat": compat,
        "robustness_tiles": int(robustness_tiles),
        "robustness_k": [int(k) for k in robustness_k],
        "dtype": np.dtype(_dtype(dtype) if compat == "exact" else np.float16).name,
        "tiles_subset_digest": _digest(subset),
        "held_out_tissues": None if held_out_tissues is None else [str(t) for t in held_out_tissues],
        "n_tiles": int(len(subset) if subset is not None else n),
        "slides": slides["slide_id"].astype(str).tolist(),
        "embeddings_config_hash": source.get("embeddings_config_hash"),
    }
    meta = provenance(
        params,
        benchmark="plism",
        model=model or source.get("model_id"),
        source=source,
        dim=dim,
        tiles_per_slide=n,
        block_size=int(block_size),
        workers=int(workers),
        slide_table=slides[list(SLIDE_COLUMNS)].astype(str).to_dict(orient="list"),
    )
    write_parquet(scores, out, meta)
    return scores


def slides_of_matched_tiles(tiles_table: str | os.PathLike) -> pd.DataFrame:
    """The slide table (slide_id, scanner, staining) of a matched-tiles table (`matched_tiles.py`), in the
    order of its tile store's slides. Raises BenchmarkError when the file does not exist."""
    path = Path(tiles_table)
    if not path.is_file():
        raise BenchmarkError(f"matched-tiles table {path} does not exist")
    tiles = pd.read_parquet(path, columns=list(SLIDE_COLUMNS))
    return tiles.drop_duplicates("slide_id").reset_index(drop=True)


def run(
    embeddings: str | os.PathLike,
    tiles_table: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str,
    tiles_subset: Any = None,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    dtype: Any = "float32",
    block_size: int = 1024,
    workers: int = 1,
    unmatched: bool = False,
    compat: str = "exact",
    robustness_tiles: int = 0,
    robustness_k: Sequence[int] = DEFAULT_RI_K,
    tissue_holdout: dict | None = None,
) -> pd.DataFrame:
    """Score one model's embeddings of the PLISM matched tiles and write them to Parquet `out` (`score_plism`).

    `embeddings`: the model's embedding store of the matched-tile store; `tiles_table`: that store's tile
    table (Parquet with slide_id, scanner, staining per tile), which gives the slides in store order.
    `tissue_holdout` (plism.tissue_holdout, `histodistill.holdout`): when its method is not none, only the
    held-out tissues' tiles are scored (the tissues paired distillation never trains on). Returns the tidy
    pair scores; raises BenchmarkError as `score_plism` does, and for a tissue holdout with a
    `tiles_subset` (one subset at a time); ConfigError for a tissue holdout that names no tissue here.
    """
    held_out_tissues = None
    holdout = TissueHoldoutConfig.parse(tissue_holdout)
    if holdout.method != "none":
        if tiles_subset is not None:
            raise BenchmarkError(
                "benchmarks.plism.tiles_subset and plism.tissue_holdout both restrict the scored tiles: "
                "set one of them"
            )
        table = pd.read_parquet(tiles_table, columns=["slide_id", "tile_id", "x0", "y0"])
        tiles_subset = held_out_positions(table, holdout)[1]
        held_out_tissues = list(holdout.held_out)
    return score_plism(
        embeddings,
        slides_of_matched_tiles(tiles_table),
        out,
        model=model,
        tiles_subset=tiles_subset,
        top_k=top_k,
        dtype=dtype,
        block_size=block_size,
        workers=workers,
        unmatched=unmatched,
        compat=compat,
        robustness_tiles=robustness_tiles,
        robustness_k=robustness_k,
        held_out_tissues=held_out_tissues,
    )


def read_scores(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """A per-pair score file written by `score_plism`, and its provenance."""
    return read_parquet(path, "score file", BenchmarkError)


# ----------------------------------------------------------------------------------------------- summary


def _wide(scores: pd.DataFrame) -> tuple[pd.DataFrame, list[str], np.ndarray, np.ndarray, int]:
    """Scores as one row per pair: (wide frame, metric names, slide codes a, b, number of slides)."""
    need = {"slide_a", "slide_b", "group", "metric", "value"}
    if missing := need - set(scores.columns):
        raise BenchmarkError(f"score frame lacks column(s) {sorted(missing)}")
    metrics = list(dict.fromkeys(scores["metric"]))
    try:
        wide = scores.pivot(index=["slide_a", "slide_b", "group"], columns="metric", values="value")
    except ValueError as exc:  # a (pair, metric) listed twice
        raise BenchmarkError(f"score frame lists a (pair, metric) more than once: {exc}") from exc
    wide = wide.reset_index()
    codes, uniques = pd.factorize(pd.concat([wide["slide_a"], wide["slide_b"]], ignore_index=True))
    return wide, metrics, codes[: len(wide)], codes[len(wide) :], len(uniques)


def _groups(wide: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    present = set(wide["group"])
    return [(ALL, np.ones(len(wide), bool))] + [
        (g, (wide["group"] == g).to_numpy()) for g in PAIR_GROUPS if g in present
    ]


def summarize_scores(
    scores: pd.DataFrame | str | os.PathLike,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per (group, metric): n_pairs, mean, std (ddof 0), median, IQR and cluster-bootstrap CIs.

    CIs (`mean_ci_low` … `median_ci_high`) resample slides, not pairs (see `histodistill.bench.stats`);
    every group and metric uses the same seeded replicates, so the result is deterministic for a seed.
    """
    if not isinstance(scores, pd.DataFrame):
        scores = read_scores(scores)[0]
    scores, pooled = _split_pooled(scores)
    wide, metrics, code_a, code_b, n_slides = _wide(scores)
    counts = slide_resamples(n_slides, n_boot, seed) if n_boot > 0 else None
    rows = []
    for group, mask in _groups(wide):
        values = wide.loc[mask, metrics].to_numpy(np.float64)
        ci = {}
        if counts is not None:
            weights = pair_weights(counts, code_a[mask], code_b[mask])
            for stat in ("mean", "median"):
                ci[stat] = percentile_ci(bootstrap_statistic(values, weights, stat), confidence)
        for j, metric in enumerate(metrics):
            row = {"group": group, "metric": metric, "n_pairs": int(mask.sum()), **summarize(values[:, j])}
            for stat in ("mean", "median"):
                low, high = ci.get(stat, (np.full(len(metrics), np.nan),) * 2)
                row |= {f"{stat}_ci_low": float(low[j]), f"{stat}_ci_high": float(high[j])}
            rows.append(row)
    for metric, value in zip(pooled["metric"], pooled["value"], strict=True):  # one value: no spread, no CI
        v = float(value)
        rows.append({"group": POOLED, "metric": metric, "n_pairs": 0, "mean": v, "std": 0.0, "median": v})
        rows[-1] |= {"iqr": 0.0, **dict.fromkeys(("mean_ci_low", "mean_ci_high"), np.nan)}
        rows[-1] |= dict.fromkeys(("median_ci_low", "median_ci_high"), np.nan)
    columns = ["group", "metric", "n_pairs", *STATS]
    columns += ["mean_ci_low", "mean_ci_high", "median_ci_low", "median_ci_high"]
    return pd.DataFrame(rows, columns=columns)


def _split_pooled(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Slide-pair rows, and the rows of all slides pooled (the robustness index)."""
    if "group" not in scores.columns:
        return scores, scores.iloc[:0]
    pooled = (scores["group"] == POOLED).to_numpy()
    return scores[~pooled], scores[pooled]


def leaderboard_metric(summary: pd.DataFrame, decimals: int | None = None) -> float | pd.Series:
    """Mean of the four leaderboard medians; a Series by model when `summary` has a `model` column.

    `decimals` (plismbench: 3) rounds each median, then the mean, as the public leaderboard does
    (`utils/aggregate.py` `.round(3)`, `utils/metrics.py` `.mean(axis=1).round(3)`; NumPy rounding, half to
    even on the binary value).
    """
    if "model" in summary.columns:
        by_model = {
            m: leaderboard_metric(g.drop(columns="model"), decimals)
            for m, g in summary.groupby("model", sort=False)
        }
        return pd.Series(by_model, name="leaderboard")
    medians = []
    for group, metric in LEADERBOARD:
        hit = summary[(summary["group"] == group) & (summary["metric"] == metric)]
        if len(hit) != 1:
            raise BenchmarkError(
                f"summary has {len(hit)} rows for ({group}, {metric}); the leaderboard needs one"
            )
        medians.append(float(hit["median"].iloc[0]))
    if decimals is None:
        return float(np.mean(medians))
    return float(np.round(np.mean(np.round(medians, decimals)), decimals))


def leaderboard_ci(
    scores: pd.DataFrame | str | os.PathLike, *, n_boot: int = N_BOOT, seed: int = 0, confidence: float = 0.95
) -> dict[str, float]:
    """The leaderboard metric with a cluster-bootstrap CI (each replicate recomputes all four medians)."""
    if not isinstance(scores, pd.DataFrame):
        scores = read_scores(scores)[0]
    wide, metrics, code_a, code_b, n_slides = _wide(_split_pooled(scores)[0])
    counts = slide_resamples(n_slides, n_boot, seed)
    masks = dict(_groups(wide))
    point, samples = [], []
    for group, metric in LEADERBOARD:
        if group not in masks or metric not in metrics:
            raise BenchmarkError(f"scores have no ({group}, {metric}) values; the leaderboard needs them")
        col = wide.loc[masks[group], metric].to_numpy(np.float64)
        point.append(np.median(col))
        weights = pair_weights(counts, code_a[masks[group]], code_b[masks[group]])
        samples.append(bootstrap_statistic(col, weights, "median"))
    low, high = percentile_ci(np.mean(samples, axis=0), confidence)
    return {"value": float(np.mean(point)), "ci_low": float(low), "ci_high": float(high)}


# ----------------------------------------------------------------------------------------------- figures


def _median_of(summary: pd.DataFrame, model: str, group: str, metric: str) -> tuple[float, float, float]:
    hit = summary[(summary["model"] == model) & (summary["group"] == group) & (summary["metric"] == metric)]
    if len(hit) != 1:
        raise BenchmarkError(
            f"summary has {len(hit)} rows for model {model!r}, ({group}, {metric}); need one"
        )
    row = hit.iloc[0]
    return (
        float(row["median"]),
        float(row.get("median_ci_low", np.nan)),
        float(row.get("median_ci_high", np.nan)),
    )


def _limits(values: np.ndarray) -> tuple[float, float]:
    """Axis limits around `values` (point estimates and CI ends), padded 5%, never below 0 for scores that
    are all ≥ 0 nor above 1 for scores that are all ≤ 1 (cosines and accuracies live in [0, 1] here)."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = max(0.05 * (hi - lo), 0.01)
    low, high = lo - pad, hi + pad
    if lo >= 0:
        low = max(low, 0.0)
    if hi <= 1:
        high = min(high, 1.0)
    return low, high


def _scatter(summary: pd.DataFrame, out, x: tuple[str, str], y: tuple[str, str], labels, title, diagonal):
    """One point per model (colours: the axes' property cycle), labelled by a legend outside the axes, so
    names never overprint. When every model sits at one point the plot would show nothing: the PNG then
    says so in words (`histodistill.report.figures.message_png`)."""
    from histodistill.report.figures import message_png, new_figure

    if "model" not in summary.columns:
        raise BenchmarkError("figure needs a summary with a 'model' column (concatenate per-model summaries)")
    models = list(dict.fromkeys(summary["model"]))
    points = {m: (_median_of(summary, m, *x), _median_of(summary, m, *y)) for m in models}
    xy = np.array([[px[0], py[0]] for px, py in points.values()])
    if np.ptp(xy[:, 0]) < 1e-9 and np.ptp(xy[:, 1]) < 1e-9:
        who = "the only model" if len(models) == 1 else f"all {len(models)} models"
        text = (
            f"{title}: not drawn, {who} at ({labels[0]} = {xy[0, 0]:.3f}, {labels[1]} = {xy[0, 1]:.3f}); "
            "nothing to compare (see the tables)."
        )
        with atomic_path(out) as tmp:
            Path(tmp).write_bytes(message_png(text, width=7.0))
        return Path(out)
    fig = new_figure(7.0, 4.5, layout="constrained")
    ax = fig.add_subplot()
    ends = [xy.ravel()]
    for model, ((xm, xl, xh), (ym, yl, yh)) in points.items():
        xerr = None if np.isnan(xl) else [[xm - xl], [xh - xm]]
        yerr = None if np.isnan(yl) else [[ym - yl], [yh - ym]]
        ax.errorbar(xm, ym, xerr=xerr, yerr=yerr, fmt="o", capsize=2, label=str(model))
        ends.append(np.array([v for v in (xl, xh, yl, yh) if not np.isnan(v)]))
    if diagonal:  # one range on both axes, so the diagonal is the 45° line
        lo, hi = _limits(np.concatenate(ends))
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="equal")
        ax.set_aspect("equal")
    else:
        ax.set_xlim(*_limits(np.array([v for (p, _) in points.values() for v in p if not np.isnan(v)])))
        ax.set_ylim(*_limits(np.array([v for (_, q) in points.values() for v in q if not np.isnan(v)])))
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(out)


def plot_topk_vs_cosine(summary: pd.DataFrame, out: str | os.PathLike, k: int = 5, group: str = ALL) -> Path:
    """Median top-k accuracy against median cosine per model (bars: median bootstrap CIs) → PNG."""
    return _scatter(
        summary,
        out,
        (group, COSINE),
        (group, f"top_{k}"),
        (f"median cosine similarity ({group})", f"median top-{k} accuracy ({group})"),
        "PLISM robustness",
        diagonal=False,
    )


def plot_scanner_vs_staining(summary: pd.DataFrame, out: str | os.PathLike, k: int = 1) -> Path:
    """Median top-k inter-scanner against inter-staining accuracy per model (dashed: equal) → PNG."""
    return _scatter(
        summary,
        out,
        (INTER_SCANNER, f"top_{k}"),
        (INTER_STAINING, f"top_{k}"),
        (f"median top-{k} accuracy, inter-scanner", f"median top-{k} accuracy, inter-staining"),
        "scanner vs staining robustness",
        diagonal=True,
    )


# ----------------------------------------------------------------------------------------------- report

LEADERBOARD_TOP10_GROUPS = (INTER_SCANNER, INTER_STAINING, INTER_BOTH)


def _model_rows(frame: pd.DataFrame, model: str, path: Path) -> pd.DataFrame:
    """One model's score rows, tagged with the `compat` its file was scored with and the held-out tissues
    it was restricted to ("" for all tiles; its provenance)."""
    _, meta = read_scores(path)
    params = (meta or {}).get("params") or {}
    held = params.get("held_out_tissues")
    return frame.assign(compat=params.get("compat", "exact"), held_out=", ".join(held) if held else "")


def _compat_of(frame: pd.DataFrame) -> str:
    return str(frame["compat"].iloc[0]) if "compat" in frame.columns and len(frame) else "exact"


def _summarize_for_report(frame: pd.DataFrame, n_boot: int = N_BOOT, boot_seed: int = 0) -> pd.DataFrame:
    summary = summarize_scores(frame, n_boot=n_boot, seed=boot_seed)
    held = str(frame["held_out"].iloc[0]) if "held_out" in frame.columns and len(frame) else ""
    return summary.assign(compat=_compat_of(frame), held_out=held)


def _median(summary: pd.DataFrame, group: str, metric: str) -> float:
    hit = summary[(summary["group"] == group) & (summary["metric"] == metric)]
    return float(hit["median"].iloc[0]) if len(hit) == 1 else np.nan


def _median_columns(summary: pd.DataFrame, value: Callable[[pd.DataFrame, str, str], float]) -> dict:
    """The leaderboard's columns {column: {model: value(part, group, metric)}} of the median headlines (median
    cosine and unmatched cosine, separation, the top-10 medians, the robustness index), with the composite
    `plism_leaderboard` first and empty; `_headline` fills it, `_errors` leaves it without a value."""
    cols: dict[str, dict[str, float]] = {c: {} for c in ("plism_leaderboard", "plism_cosine_median")}
    cols |= {"plism_cosine_unmatched_median": {}, "plism_separation_median": {}}
    cols |= {f"plism_top10_{g}": {} for g in LEADERBOARD_TOP10_GROUPS}
    cols |= {"plism_robustness_index": {}}
    for model, part in summary.groupby("model", sort=False) if len(summary) else []:
        cols["plism_cosine_median"][model] = value(part, ALL, COSINE)
        cols["plism_cosine_unmatched_median"][model] = value(part, ALL, COSINE_UNMATCHED)
        cols["plism_separation_median"][model] = value(part, ALL, SEPARATION)
        for g in LEADERBOARD_TOP10_GROUPS:
            cols[f"plism_top10_{g}"][model] = value(part, g, "top_10")
        ri = _ri_headline_metric(set(part.loc[part["group"] == POOLED, "metric"]))
        cols["plism_robustness_index"][model] = value(part, POOLED, ri) if ri else np.nan
    return cols


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """The PLISM leaderboard metric, the median cosine over all pairs and the three top-10 medians."""
    cols = _median_columns(summary, _median)
    for model, part in summary.groupby("model", sort=False) if len(summary) else []:
        part = part.drop(columns="model")
        decimals = LEADERBOARD_DECIMALS if _compat_of(part).startswith("plismbench") else None
        try:
            cols["plism_leaderboard"][model] = leaderboard_metric(part, decimals)
        except BenchmarkError as exc:
            log.warning("PLISM leaderboard of %r: %s", model, exc)
    return by_model(cols, models)


def _median_se(summary: pd.DataFrame, group: str, metric: str) -> float:
    """The standard error of a median headline from its 95% cluster-bootstrap CI (`summarize_scores`,
    slides resampled): (high − low) / (2 × 1.96), the normal-theory width; NaN without a CI."""
    hit = summary[(summary["group"] == group) & (summary["metric"] == metric)]
    if len(hit) != 1 or not {"median_ci_low", "median_ci_high"} <= set(hit.columns):
        return np.nan
    return float((hit["median_ci_high"].iloc[0] - hit["median_ci_low"].iloc[0]) / (2 * 1.959964))


def _errors(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """The standard errors of the median headlines (`_median_se`, in `_headline`'s columns); NaN for the
    plismbench leaderboard metric, a composite without a CI."""
    return by_model(_median_columns(summary, _median_se), models)


def _ri_headline_metric(metrics: set[str]) -> str | None:
    """The leaderboard's robustness index: site = slide, at the largest k scored."""
    ks = [int(m.removeprefix("ri_slide_k")) for m in metrics if m.startswith("ri_slide_k")]
    return f"ri_slide_k{max(ks)}" if ks else None


def _flags(summary: pd.DataFrame, models: Sequence[str]) -> dict[str, str]:
    """Models whose embeddings of different tiles are nearly as alike as those of the same tile."""
    out = {}
    for model, part in summary.groupby("model", sort=False) if len(summary) else []:
        unmatched = _median(part, ALL, COSINE_UNMATCHED)
        if unmatched >= COLLAPSE_UNMATCHED:
            out[model] = (
                f"PLISM: different tiles have median cosine {unmatched:.3f} ≥ {COLLAPSE_UNMATCHED} "
                f"(separation {_median(part, ALL, SEPARATION):.3f})"
            )
    return out


def _plism_k(metrics: set[str], preferred: int, pick) -> int | None:
    ks = sorted(int(m.removeprefix("top_")) for m in metrics if m.startswith("top_"))
    if not ks:
        return None
    return preferred if preferred in ks else pick(ks)


def _models_with(summary: pd.DataFrame, pairs: list[tuple[str, str]]) -> list[str]:
    ok = []
    for model, part in summary.groupby("model", sort=False):
        if all(((part["group"] == g) & (part["metric"] == m)).sum() == 1 for g, m in pairs):
            ok.append(model)
    return ok


def _figures(summary: pd.DataFrame, fig_dir: Path, colors: Mapping[str, str]) -> list[Figure]:
    """The two PLISM scatters over the models that have the rows each needs; captions name those left out."""
    from histodistill.report import figures

    out = []
    metrics = set(summary["metric"])
    k1 = _plism_k(metrics, 5, max)
    k2 = _plism_k(metrics, 1, min)
    specs = []
    if k1 is not None:
        specs.append(
            (
                plot_topk_vs_cosine,
                {"k": k1},
                [(ALL, COSINE), (ALL, f"top_{k1}")],
                "plism_topk_vs_cosine.png",
                f"PLISM: median top-{k1} accuracy against median cosine similarity over all slide pairs "
                "(bars: 95% cluster-bootstrap CIs of the medians). Up and right is more robust.",
            )
        )
    if k2 is not None:
        specs.append(
            (
                plot_scanner_vs_staining,
                {"k": k2},
                [(INTER_SCANNER, f"top_{k2}"), (INTER_STAINING, f"top_{k2}")],
                "plism_scanner_vs_staining.png",
                f"PLISM: median top-{k2} accuracy across scanners (same staining) against across stainings "
                "(same scanner); dashed: equal robustness.",
            )
        )
    for plot, kwargs, needs, name, caption in specs:
        ok = _models_with(summary, needs)
        left_out = [m for m in dict.fromkeys(summary["model"]) if m not in ok]
        if left_out:
            caption += (
                f" Not shown (no {', '.join(f'{g}/{m}' for g, m in needs)} scores): {', '.join(left_out)}."
            )
        if not ok:
            continue
        part = summary[summary["model"].isin(ok)]
        png = figures.plism_scatter(plot, part, fig_dir / name, colors, **kwargs)
        out.append(Figure(png, name, caption))
    return out


def _section(summary: pd.DataFrame, models: Sequence[str], figs: Sequence[Figure]) -> str:
    from histodistill.report import html as page

    if summary.empty:
        return page.note("No PLISM scores.")
    groups = [ALL, *PAIR_GROUPS]
    metrics = list(dict.fromkeys(summary["metric"]))
    ordered = summary.assign(
        _g=summary["group"].map({g: i for i, g in enumerate(groups)}).fillna(len(groups)),
        _m=summary["metric"].map({m: i for i, m in enumerate(metrics)}),
    ).sort_values(["_g", "_m"], kind="stable")
    paired = ordered[ordered["group"] != POOLED]
    pairs = paired.groupby(["group", "model"], sort=False)["n_pairs"].first()
    body = "".join(page.figure(f.png, f.name, f.caption) for f in figs)
    body += page.note(
        "Median over slide pairs [95% cluster-bootstrap CI, resampling slides], per pair group and metric. "
        "Leaderboard = mean of the medians of cosine (all pairs) and top-10 accuracy in the three "
        "inter-scanner/inter-staining groups. cosine_unmatched: the cosine of different tiles of the same slide "
        "pair (a random pairing); separation = cosine − cosine_unmatched. A model whose embeddings barely "
        f"tell tiles apart (median cosine_unmatched ≥ {COLLAPSE_UNMATCHED}) has a high matched cosine for "
        "the wrong reason, and is flagged. Group pooled: de Jong et al.'s robustness index over all slides "
        "pooled, ri_{site}_k{k} = (neighbours with the same tile from another site) / (neighbours with another "
        "tile from the same site) among the k nearest, site = slide, scanner or staining (> 1: the tissue "
        "dominates the site; one value, no CI). Pairs per group: "
        + "; ".join(f"{g}: {n}" for g, n in pairs.groupby(level=0, sort=False).max().items())
    )
    compat = {}
    if "compat" in summary.columns:
        firsts = summary.groupby("model", sort=False)["compat"].first()
        compat = {m: c for m, c in firsts.items() if c != "exact"}
    if "held_out" in summary.columns:
        held = {m: h for m, h in summary.groupby("model", sort=False)["held_out"].first().items() if h}
        if held:
            body += page.note(
                "Scored on held-out tissues only (plism.tissue_holdout: tissues no paired student trained "
                "on): " + "; ".join(f"{m}: {h}" for m, h in held.items())
            )
    if compat:
        body += page.note(
            "Scored with the public plismbench's float16 arithmetic and tie order, leaderboard from medians "
            "rounded to 3 decimals: " + ", ".join(f"{m} ({c})" for m, c in compat.items())
        )
    body += page.wide_table(
        ordered,
        ["group", "metric"],
        list(models),  # every model, so one absent from this benchmark shows as a column of "–"
        lambda r: page.fmt_ci(r["median"], r.get("median_ci_low"), r.get("median_ci_high")),
    )
    return body


BENCHMARK = Benchmark(
    name="plism",
    title="PLISM robustness",
    order=10,
    columns=frozenset({"slide_a", "slide_b", "group", "metric", "value"}),
    summarize=_summarize_for_report,
    headline=_headline,
    errors=_errors,
    figures=_figures,
    section=_section,
    flags=_flags,
    model_rows=_model_rows,
    unranked=lambda column: column == "plism_cosine_unmatched_median",  # a diagnostic: lower is better
    labels={
        "plism_leaderboard": "PLISM leaderboard",
        "plism_cosine_median": "PLISM cosine (median, all)",
        "plism_cosine_unmatched_median": "PLISM cosine of different tiles (median, all)",
        "plism_separation_median": "PLISM separation (matched − unmatched)",
        "plism_top10_inter_scanner": "PLISM top-10 inter-scanner",
        "plism_top10_inter_staining": "PLISM top-10 inter-staining",
        "plism_top10_inter_scanner_staining": "PLISM top-10 inter-scanner+staining",
        "plism_robustness_index": "PLISM robustness index (de Jong; site = slide, largest k)",
    },
)
