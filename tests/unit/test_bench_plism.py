"""PLISM robustness scorer: hand-computed cases, a brute-force float64 reference, inputs and outputs."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

from histodistill.bench import BenchmarkError
from histodistill.bench.plism import (
    ALL,
    BENCHMARK,
    INTER_BOTH,
    INTER_SCANNER,
    INTER_STAINING,
    REPLICATE,
    leaderboard_ci,
    leaderboard_metric,
    normalize_features,
    open_embedding_features,
    pair_group,
    pair_scores,
    plismbench_pair_scores,
    plot_scanner_vs_staining,
    plot_topk_vs_cosine,
    read_scores,
    robustness_index,
    run,
    score_pairs,
    score_plism,
    slide_pairs,
    summarize_scores,
)
from histodistill.bench.stats import (
    bootstrap_statistic,
    cluster_bootstrap_ci,
    group_summary,
    pair_weights,
    summarize,
)

TOP_K = (1, 3, 5, 10)


def reference(a: np.ndarray, b: np.ndarray, top_k=TOP_K) -> np.ndarray:
    """Brute force in float64: the full 2n × 2n similarity, rows strictly more similar than the target."""
    x = np.concatenate([a, b]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(a)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    target_col = np.r_[np.arange(n, 2 * n), np.arange(n)]
    target = sim[np.arange(2 * n), target_col]
    above = (sim > target[:, None]).sum(axis=1)
    accs = [((above[:n] < k).mean() + (above[n:] < k).mean()) / 2 for k in top_k]
    return np.array([np.mean(target[:n]), *accs])


def unit2d(degrees) -> np.ndarray:
    r = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def slide_table(n_stainings: int, n_scanners: int) -> pd.DataFrame:
    rows = [(f"{st}_{sc}", f"sc{sc}", f"st{st}") for st in range(n_stainings) for sc in range(n_scanners)]
    return pd.DataFrame(rows, columns=["slide_id", "scanner", "staining"])


def noisy_slides(rng, n_slides=4, n=40, dim=16, noise=0.8) -> np.ndarray:
    """Matched tiles: a shared tissue signal per tile plus per-slide noise."""
    tissue = rng.normal(size=(n, dim))
    return np.stack([tissue + noise * rng.normal(size=(n, dim)) for _ in range(n_slides)]).astype(np.float32)


def wide(scores: pd.DataFrame) -> pd.DataFrame:
    return scores.pivot(index=["slide_a", "slide_b"], columns="metric", values="value")


# ------------------------------------------------------------------------------------------ the metrics


def test_identical_slides_score_one():
    x = np.random.default_rng(0).normal(size=(60, 24))
    out = pair_scores(normalize_features(x), normalize_features(x.copy()), block_size=16)
    assert out[0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(out[1:], 1.0)


def test_three_tiles_by_hand():
    # Angles: A = 0°, 90°, 180°; B = 30°, 100°, 50°. Counting rows strictly closer (in angle) than the
    # target among the 5 others: a0→b0: 0, a1→b1: 0, a2→b2 (130°): a1 (90°), b1 (80°) → 2;
    # b0→a0 (30°): b2 (20°) → 1, b1→a1 (10°): 0, b2→a2 (130°): b0, b1, a0, a1 → 4.
    # top-1 = (2/3 + 1/3)/2, top-3 = (3/3 + 2/3)/2, top-5 = top-10 = 1.
    a, b = unit2d([0, 90, 180]), unit2d([30, 100, 50])
    out = pair_scores(normalize_features(a), normalize_features(b), top_k=(1, 3, 5, 10), block_size=2)
    cosine = (np.cos(np.deg2rad(30)) + np.cos(np.deg2rad(10)) + np.cos(np.deg2rad(130))) / 3
    np.testing.assert_allclose(out, [cosine, 0.5, 5 / 6, 1.0, 1.0], rtol=0, atol=1e-6)


def test_ties_count_as_hits():
    # With x = 1/√2: a0 = e1, a1 = (e1+e3)x, b0 = (e1+e2)x, b1 = (e1+e4)x. a0's target b0 (x) ties with
    # its slide-mate a1 (x) and with b1 (x): 0 rows strictly above → hit. a1 → b1 (1/2): a0 (x) above,
    # b0 (1/2) ties → 1 above. b0 → a0 (x): a1, b1 at 1/2 → 0 above. b1 → a1 (1/2): a0 (x) above, b0 (1/2)
    # ties → 1 above. So top-1 = (1/2 + 1/2)/2 and top-2 = 1 (counting ties against would give 0.25, 0.75).
    # Swapping A and B moves each tie from a row count to a column count; the metric is symmetric.
    a = np.array([[1, 0, 0, 0], [1, 0, 1, 0]], dtype=np.float32)
    b = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=np.float32)
    for x, y in [(a, b), (b, a)]:
        out = pair_scores(normalize_features(x), normalize_features(y), top_k=(1, 2), block_size=1)
        np.testing.assert_array_equal(out[1:], [0.5, 1.0])


def test_float16_similarities_tie_by_hand():
    # Inputs exact in float16. a0 = e1, a1 ∝ (1024, 1, 0), b0 ∝ (1024, 0, 2), b1 = e3.
    # float32: a0's target b0 (1 − 1.9e-6) loses to a1 (1 − 4.8e-7) → miss; a1 → b1 (0) and b1 → a1 (0)
    # miss; b0 → a0 beats a1 (1 − 2.4e-6) → hit: top-1 = (0 + 1/2)/2. float16 rounds all three similarities
    # near 1 to 1.0, a tie, so a0 scores a hit too: top-1 = (1/2 + 1/2)/2.
    a = np.array([[1, 0, 0], [1024, 1, 0]], dtype=np.float32)
    b = np.array([[1024, 0, 2], [0, 0, 1]], dtype=np.float32)
    for dtype, expected in [("float32", 0.25), ("float16", 0.5)]:
        xa, xb = normalize_features(a, dtype), normalize_features(b, dtype)
        assert pair_scores(xa, xb, top_k=(1,), dtype=dtype)[1] == expected
    rounded = normalize_features(
        np.array([[1.0, 1.0001]]), "float16"
    )  # inputs rounded first, like plismbench
    assert rounded[0, 0] == rounded[0, 1]


# ------------------------------------------------------------------------------ compat: plismbench


def plismbench_reference(a: np.ndarray, b: np.ndarray, top_k, ties: str) -> np.ndarray:
    """The public plismbench's computation written out on the full matrices (NumPy, float16 throughout):
    dot products and norms rounded separately, top-k = positions 1…k of `argpartition` (CPU) or of a stable
    sort (CuPy's argpartition, GPU)."""
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    n = len(a)
    diag = np.diag(np.matmul(a16, b16.T))  # NumPy's float16 matmul: float32 sum, one rounding
    norm_a, norm_b = np.linalg.norm(a16, axis=1), np.linalg.norm(b16, axis=1)
    cosine = float((diag / (norm_a * norm_b)).mean())
    ab = np.concatenate([a16, b16])
    norm = np.linalg.norm(ab, axis=1, keepdims=True)
    cos = np.matmul(ab, ab.T) / (norm * norm.T)
    kmax = max(top_k)
    if ties == "argpartition":
        top = np.argpartition(-cos, range(1, kmax + 1), axis=1)[:, 1 : kmax + 1]
    else:
        top = np.argsort(-cos, axis=1, kind="stable")[:, 1 : kmax + 1]
    target = np.r_[np.arange(n, 2 * n), np.arange(n)]
    accs = []
    for k in top_k:
        hit = (top[:, :k] == target[:, None]).any(axis=1)
        accs.append((hit[:n].sum() / n + hit[n:].sum() / n) / 2)
    return np.array([cosine, *accs])


# Case 1, a near-duplicate: a0 = e1, a1 = e2, b0 = (1, 0.001), b1 = e2 (a duplicate of a1).
# Exact: every target is the most similar other row → top-1 = top-2 = 1; cosine = (0.9999995 + 1)/2.
# plismbench: |b0|² = 1 + 1e-6 rounds to 1 in float16, so cos(a0, b0) = 1 = cos(a0, a0). Rows of
# [a0, a1, b0, b1] (indices 0-3), ties by index: a0 → [a0, b0, …]: b0 at position 1, a hit; a1 → [a1, b1, …]:
# a hit; b0 → [a0, b0, …]: its target a0 takes position 0 and is dropped, a miss at every k; b1 likewise.
# So top-1 = top-2 = (2/2 + 0/2)/2 = 0.5, and cosine = mean(1, 1) = 1.
NEAR_DUP = (np.array([[1, 0], [0, 1]], np.float32), np.array([[1, 0.001], [0, 1]], np.float32))
# Case 2, ties between other rows: a0 = a1 = b0 = e1, b1 = e2. Exact (rows strictly above the target):
# a0 → b0: 0 above, hit; a1 → b1 (0): a0, b0 above, miss at k ≤ 2; b0 → a0: hit; b1 → a1 (0): none above
# (a0, b0 tie at 0), hit. top-1 = top-2 = (1/2 + 2/2)/2 = 0.75. plismbench, ties by index:
# a0's row [1, 1, 1, 0] → order a0, a1, b0: b0 at position 2, a hit at k = 2 only; a1 → b1 at 3, a miss;
# b0 → a0 at position 0, a miss; b1's row [0, 0, 0, 1] → b1, a0, a1: a1 at position 2, a hit at k = 2.
# top-1 = 0, top-2 = (1/2 + 1/2)/2 = 0.5; cosine = (1 + 0)/2 in both.
TIES = (np.array([[1, 0], [1, 0]], np.float32), np.array([[1, 0], [0, 1]], np.float32))


@pytest.mark.parametrize(
    ("case", "exact", "plismbench"),
    [
        (NEAR_DUP, [(0.9999995 + 1) / 2, 1.0, 1.0], [1.0, 0.5, 0.5]),
        (TIES, [0.5, 0.75, 0.75], [0.5, 0.0, 0.5]),
    ],
)
def test_compat_modes_by_hand(case, exact, plismbench):
    a, b = case
    out = pair_scores(normalize_features(a), normalize_features(b), top_k=(1, 2))
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-7)
    for block_size in (1, 3, 4):
        got = plismbench_pair_scores(a, b, top_k=(1, 2), block_size=block_size, compat="plismbench")
        np.testing.assert_array_equal(got, plismbench)
    np.testing.assert_array_equal(plismbench_reference(a, b, (1, 2), "index"), plismbench)
    cpu = plismbench_pair_scores(a, b, top_k=(1, 2), compat="plismbench_cpu")
    np.testing.assert_array_equal(cpu, plismbench_reference(a, b, (1, 2), "argpartition"))


@pytest.mark.parametrize("compat", ["plismbench", "plismbench_cpu"])
def test_compat_equals_plismbenchs_computation_with_ties_and_duplicates(compat):
    # Coarse features (multiples of 1/4) make float16 ties common; duplicated and near-duplicated tiles too.
    rng = np.random.default_rng(3)
    for trial in range(4):
        a = rng.integers(-3, 4, size=(70, 6)).astype(np.float32) / 4
        b = a + rng.integers(-1, 2, size=a.shape).astype(np.float32) / 4 * (rng.random((70, 1)) < 0.5)
        b[:10] = a[:10] * (1 + 1e-4)  # near-duplicates
        a[a.sum(1) == 0, 0] = 1.0  # no zero rows
        b[b.sum(1) == 0, 0] = 1.0
        ties = "index" if compat == "plismbench" else "argpartition"
        want = plismbench_reference(a, b, (1, 3, 5, 10), ties)
        got = plismbench_pair_scores(a, b, top_k=(1, 3, 5, 10), block_size=32, compat=compat)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def test_compat_plismbench_counts_near_duplicates_as_misses():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 32)).astype(np.float32)
    b = a * 1.0001  # the same tiles, a near-duplicate for every target
    exact = pair_scores(
        normalize_features(a, "float16"), normalize_features(b, "float16"), (1, 10), dtype="float16"
    )
    compat = plismbench_pair_scores(a, b, (1, 10))
    assert exact[1] == 1.0 and compat[1] < 0.9  # many targets tie with or beat the rounded self similarity
    with pytest.raises(BenchmarkError, match="compat 'gpu' is not one of"):
        plismbench_pair_scores(a, b, compat="gpu")


def test_compat_in_score_pairs_and_leaderboard_rounding():
    rng = np.random.default_rng(1)
    feats = noisy_slides(rng, n_slides=3, n=30, dim=8)
    slides = slide_table(1, 3)
    scores = score_pairs(feats, slides, top_k=(1, 3), compat="plismbench", block_size=16)
    for (a, b), row in wide(scores).iterrows():
        ia, ib = slides["slide_id"].tolist().index(a), slides["slide_id"].tolist().index(b)
        want = plismbench_reference(feats[ia], feats[ib], (1, 3), "index")
        np.testing.assert_array_equal(row[["cosine", "top_1", "top_3"]].to_numpy(np.float64), want)
    # plismbench's leaderboard: medians rounded to 3 decimals, then their mean rounded to 3 decimals
    summary = pd.DataFrame(
        {
            "group": [ALL, INTER_SCANNER, INTER_STAINING, INTER_BOTH],
            "metric": ["cosine", "top_10", "top_10", "top_10"],
            "median": [0.12345, 0.66666, 0.50049, 0.9126],
        }
    )
    assert leaderboard_metric(summary) == pytest.approx(2.2032 / 4)  # 0.5508
    assert leaderboard_metric(summary, decimals=3) == 0.551  # (0.123 + 0.667 + 0.5 + 0.913)/4 = 0.55075


def test_unrelated_slides_score_chance_with_slide_mates_as_distractors():
    # Independent slides: the target is a uniformly random one of the 2n − 1 other rows, so acc@k is
    # k / (2n − 1); had the slide-mates been left out of the candidates it would be k / n (twice as much).
    rng = np.random.default_rng(1)
    n = 200
    feats = rng.normal(size=(6, n, 16)).astype(np.float32)
    scores = wide(score_pairs(feats, slide_table(2, 3), top_k=(1, 10), block_size=64))
    assert scores["top_10"].mean() == pytest.approx(10 / (2 * n - 1), abs=0.008)
    assert scores["top_1"].mean() == pytest.approx(1 / (2 * n - 1), abs=0.003)


def test_shuffled_rows_destroy_matching():
    rng = np.random.default_rng(2)
    feats = noisy_slides(rng, n_slides=2, n=300, dim=32, noise=0.5)
    matched = pair_scores(normalize_features(feats[0]), normalize_features(feats[1]), top_k=(1, 10))
    shuffled = pair_scores(
        normalize_features(feats[0]), normalize_features(feats[1][rng.permutation(300)]), top_k=(1, 10)
    )
    assert matched[1] > 0.95
    assert shuffled[1] <= 2 / (2 * 300 - 1) + 0.005  # at or below chance: the true mate outranks the target
    assert shuffled[0] < 0.2 < matched[0]


@pytest.mark.parametrize("block_size", [1, 7, 16, 50, 64])
def test_blockwise_equals_full_matrix_reference(block_size):
    rng = np.random.default_rng(3)
    feats = noisy_slides(rng, n_slides=2, n=50, dim=12, noise=1.2)
    out = pair_scores(normalize_features(feats[0]), normalize_features(feats[1]), TOP_K, block_size)
    ref = reference(feats[0], feats[1])
    assert out[0] == pytest.approx(ref[0], abs=1e-6)
    np.testing.assert_array_equal(out[1:], ref[1:])
    assert 0 < ref[1] < ref[2] < 1  # the case is not degenerate


def test_fewer_tiles_than_k():
    a, b = unit2d([0, 90, 180]), unit2d([30, 100, 50])
    out = pair_scores(normalize_features(a), normalize_features(b), top_k=(20,), block_size=1)
    assert out[1] == 1.0


def test_float16_close_to_float32():
    feats = noisy_slides(np.random.default_rng(4), n_slides=3, n=120, dim=64, noise=1.0)
    slides = slide_table(1, 3)
    f32 = wide(score_pairs(feats, slides, dtype="float32"))
    f16 = wide(score_pairs(feats, slides, dtype="float16"))
    assert not f16.equals(f32)  # the option does something
    np.testing.assert_allclose(f16["cosine"], f32["cosine"], atol=1e-3)
    np.testing.assert_allclose(f16.drop(columns="cosine"), f32.drop(columns="cosine"), atol=0.02)


# ---------------------------------------------------------------------------------------------- pairs


def test_plism_pair_counts():
    pairs = slide_pairs(slide_table(13, 7))
    assert len(pairs) == 4095
    counts = pairs["group"].value_counts()
    assert counts[INTER_SCANNER] == 273
    assert counts[INTER_STAINING] == 546
    assert counts[INTER_BOTH] == 3276
    assert REPLICATE not in counts
    assert (pairs["a"] < pairs["b"]).all()


def test_group_labels():
    assert pair_group("AT2", "GM", "P", "GM") == INTER_SCANNER
    assert pair_group("AT2", "GM", "AT2", "HR") == INTER_STAINING
    assert pair_group("AT2", "GM", "P", "HR") == INTER_BOTH
    assert pair_group("AT2", "GM", "AT2", "GM") == REPLICATE
    pairs = slide_pairs(slide_table(2, 2)).set_index(["slide_a", "slide_b"])["group"]
    assert pairs[("0_0", "0_1")] == INTER_SCANNER
    assert pairs[("0_0", "1_0")] == INTER_STAINING
    assert pairs[("0_0", "1_1")] == INTER_BOTH
    assert pairs[("0_1", "1_0")] == INTER_BOTH


# ------------------------------------------------------------------------------------ scorer and output


def test_score_pairs_frame_matches_reference():
    feats = noisy_slides(np.random.default_rng(5), n_slides=4, n=30, dim=8)
    slides = slide_table(2, 2)
    scores = score_pairs(feats, slides, block_size=7, cache_slides=4)  # pairs in 2 × 2 slide tiles
    assert list(scores.columns) == ["slide_a", "slide_b", "group", "metric", "value"]
    assert len(scores) == 6 * 5
    for (a, b), row in wide(scores).iterrows():
        i, j = slides.index[slides["slide_id"] == a][0], slides.index[slides["slide_id"] == b][0]
        ref = reference(feats[i], feats[j])
        np.testing.assert_allclose(row[["cosine", "top_1", "top_3", "top_5", "top_10"]], ref, atol=1e-6)


def test_parallel_equals_serial():
    feats = noisy_slides(np.random.default_rng(6), n_slides=7, n=80, dim=16)
    slides = slide_table(1, 7)
    serial = score_pairs(feats, slides, workers=1, block_size=32)
    parallel = score_pairs(feats, slides, workers=3, cache_slides=1, block_size=32)
    pd.testing.assert_frame_equal(serial, parallel, check_exact=True)


def test_tile_subset_selects_rows():
    feats = noisy_slides(np.random.default_rng(7), n_slides=3, n=50, dim=8)
    subset = np.array([4, 40, 2, 17, 33, 8, 21, 30, 11, 0])
    slides = slide_table(1, 3)
    pd.testing.assert_frame_equal(
        score_pairs(feats, slides, tiles_subset=subset), score_pairs(feats[:, subset], slides)
    )


def test_score_plism_writes_parquet_with_provenance(tmp_path):
    feats = noisy_slides(np.random.default_rng(8), n_slides=3, n=20, dim=8)
    out = tmp_path / "plism" / "model.parquet"
    scores = score_plism(feats, slide_table(1, 3), out, model="toy", tiles_subset=np.arange(0, 20, 2))
    back, meta = read_scores(out)
    pd.testing.assert_frame_equal(back, scores)
    assert meta["model"] == "toy" and meta["params"]["n_tiles"] == 10
    assert meta["params"]["dtype"] == "float32" and meta["config_hash"]
    assert b"histodistill" in pq.read_schema(out).metadata
    assert [p.name for p in out.parent.iterdir()] == ["model.parquet"]  # no temporary left behind
    summary = summarize_scores(out, n_boot=50)
    assert set(summary["group"]) == {ALL, INTER_SCANNER}


def _embedding_store(path, feats, ids, rng):
    """A minimal finished embedding store: slide-major rows, each slide's tiles stored in shuffled order."""
    n_slides, n, dim = feats.shape
    x0, y0 = np.meshgrid(np.arange(n // 5) * 224, np.arange(5) * 224, indexing="ij")
    x0, y0 = x0.ravel(), y0.ravel()  # (x, y) order: the order tile i has in `feats`
    perm = rng.permutation(n)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array("embeddings", data=feats[:, perm].reshape(n_slides * n, dim), chunks=(16, dim))
    index = {
        "slide_index": np.repeat(np.arange(n_slides, dtype=np.int32), n),
        "tile_id": np.tile(perm, n_slides).astype(np.int64),
        "x0": np.tile(x0[perm], n_slides),
        "y0": np.tile(y0[perm], n_slides),
        "level": np.zeros(n_slides * n, np.int32),
        "tissue_frac": np.ones(n_slides * n, np.float32),
    }
    for name, values in index.items():
        root.create_array(name, data=values)
    root.attrs.update(
        {"complete": True, "provenance": {"config_hash": "abc", "slides": [{"slide_id": s} for s in ids]}}
    )


def test_reads_embedding_store_and_zarr_array(tmp_path):
    rng = np.random.default_rng(9)
    feats = noisy_slides(rng, n_slides=3, n=25, dim=8)
    slides = slide_table(1, 3)
    store = tmp_path / "emb.zarr"
    _embedding_store(store, feats, slides["slide_id"].tolist(), rng)
    view, ids = open_embedding_features(store)
    assert ids == slides["slide_id"].tolist() and view.shape == (3, 25, 8)
    np.testing.assert_array_equal(view[2], feats[2])  # back in (x, y) order
    expected = score_pairs(feats, slides, tiles_subset=np.arange(0, 25, 3))
    got = score_plism(store, slides, tmp_path / "a.parquet", tiles_subset=np.arange(0, 25, 3))
    pd.testing.assert_frame_equal(got, expected)
    assert read_scores(tmp_path / "a.parquet")[1]["source"]["embeddings_config_hash"] == "abc"
    zarr.create_array(tmp_path / "arr.zarr", data=feats, chunks=(1, 25, 8))
    pd.testing.assert_frame_equal(
        score_plism(tmp_path / "arr.zarr", slides, tmp_path / "b.parquet"), score_pairs(feats, slides)
    )
    with pytest.raises(BenchmarkError, match="0_2"):
        score_plism(store, slides.iloc[::-1], tmp_path / "c.parquet")


def test_run_reads_the_slide_order_from_the_matched_tiles_table(tmp_path):
    rng = np.random.default_rng(11)
    feats = noisy_slides(rng, n_slides=3, n=25, dim=8)
    slides = slide_table(1, 3)
    store = tmp_path / "emb.zarr"
    _embedding_store(store, feats, slides["slide_id"].tolist(), rng)
    tiles = slides.loc[np.repeat(np.arange(3), 25)].assign(tile=np.tile(np.arange(25), 3))  # one row per tile
    tiles.to_parquet(tmp_path / "tiles.parquet")
    got = run(store, tmp_path / "tiles.parquet", tmp_path / "a.parquet", model="m", top_k=(1, 5))
    pd.testing.assert_frame_equal(got, score_pairs(feats, slides, top_k=(1, 5)))
    assert read_scores(tmp_path / "a.parquet")[1]["model"] == "m"
    tiles.iloc[::-1].to_parquet(tmp_path / "reversed.parquet")  # slides out of the store's order
    with pytest.raises(BenchmarkError, match="store's order"):
        run(store, tmp_path / "reversed.parquet", tmp_path / "b.parquet", model="m")
    with pytest.raises(BenchmarkError, match="does not exist"):
        run(store, tmp_path / "nope.parquet", tmp_path / "c.parquet", model="m")


def test_run_scores_only_the_held_out_tissues_and_records_them(tmp_path):
    rng = np.random.default_rng(12)
    feats = noisy_slides(rng, n_slides=3, n=25, dim=8)
    slides = slide_table(1, 3)
    store = tmp_path / "emb.zarr"
    _embedding_store(store, feats, slides["slide_id"].tolist(), rng)
    emb = zarr.open_group(store, mode="r")
    tiles = slides.loc[np.repeat(np.arange(3), 25)].reset_index(drop=True)
    tiles = tiles.assign(tile_id=emb["tile_id"][:], x0=emb["x0"][:], y0=emb["y0"][:])  # the store's order
    tiles.to_parquet(tmp_path / "tiles.parquet")
    # 5 columns of tiles (x0 = 0 … 4·224): one block per column; column 4 is (x, y)-order tiles 20 … 24
    holdout = {"method": "blocks", "blocks": [1, 5], "held_out": ["r0c4"]}
    got = run(store, tmp_path / "tiles.parquet", tmp_path / "a.parquet", model="m", tissue_holdout=holdout)
    pd.testing.assert_frame_equal(got, score_pairs(feats, slides, tiles_subset=np.arange(20, 25)))
    meta = read_scores(tmp_path / "a.parquet")[1]
    assert meta["params"]["held_out_tissues"] == ["r0c4"] and meta["params"]["n_tiles"] == 5
    # the report names the held-out tissues the model was scored on
    rows = BENCHMARK.model_rows(got, "m", tmp_path / "a.parquet")
    summary = BENCHMARK.summarize(rows, n_boot=0).assign(model="m")
    assert set(summary["held_out"]) == {"r0c4"}
    assert "Scored on held-out tissues only" in BENCHMARK.section(
        summary, ["m"], []
    ) and "m: r0c4" in BENCHMARK.section(summary, ["m"], [])
    with pytest.raises(BenchmarkError, match="set one of them"):
        run(
            store,
            tmp_path / "tiles.parquet",
            tmp_path / "b.parquet",
            model="m",
            tiles_subset=[1],
            tissue_holdout=holdout,
        )


# ---------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_item():
    rng = np.random.default_rng(10)
    feats = noisy_slides(rng, n_slides=3, n=10, dim=4)
    slides = slide_table(1, 3)
    with pytest.raises(BenchmarkError, match=r"3 slides but the slide table lists 2"):
        score_pairs(feats, slides.iloc[:2])
    with pytest.raises(BenchmarkError, match=r"at least 2 slides.*0_0"):
        score_pairs(feats[:1], slides.iloc[:1])
    with pytest.raises(BenchmarkError, match=r"slide '0_1' has 9 tiles but slide '0_0' has 10"):
        score_pairs([feats[0], feats[1][:9], feats[2]], slides)
    with pytest.raises(BenchmarkError, match=r"entry 1 = 10 is out of range for 10 tiles"):
        score_pairs(feats, slides, tiles_subset=np.array([0, 10]))
    with pytest.raises(BenchmarkError, match=r"repeats tile 3"):
        score_pairs(feats, slides, tiles_subset=np.array([3, 1, 3]))
    bad = feats.copy()
    bad[2, 7, 1] = np.nan
    with pytest.raises(
        BenchmarkError, match=r"slide '0_2': 1 tile\(s\) have NaN/inf features \(first: tile 7\)"
    ):
        score_pairs(bad, slides)
    with pytest.raises(BenchmarkError, match=r"lacks column\(s\) \['staining'\]"):
        score_pairs(feats, slides.drop(columns="staining"))
    with pytest.raises(BenchmarkError, match=r"dtype 'bfloat16'"):
        score_pairs(feats, slides, dtype="bfloat16")


# ---------------------------------------------------------------------------------- summary and stats


def test_summarize_by_hand():
    assert summarize([1, 2, 3, 4]) == pytest.approx(
        {"mean": 2.5, "std": np.sqrt(1.25), "median": 2.5, "iqr": 3.25 - 1.75}
    )
    frame = pd.DataFrame({"g": ["x", "x", "y"], "value": [1.0, 3.0, 5.0]})
    out = group_summary(frame, ["g"])
    assert out["n"].tolist() == [2, 1] and out["std"].tolist() == [1.0, 0.0]


def _hand_scores() -> pd.DataFrame:
    """Hand-made per-pair scores for 2 stainings × 2 scanners (6 pairs)."""
    rows = []
    for (a, b), cos, t10 in zip(
        itertools.combinations(slide_table(2, 2)["slide_id"], 2),
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
        [0.95, 0.5, 0.1, 0.2, 0.3, 0.45],
        strict=True,
    ):
        sa, sb = a.split("_"), b.split("_")
        group = pair_group(sa[1], sa[0], sb[1], sb[0])
        rows += [(a, b, group, "cosine", cos), (a, b, group, "top_10", t10)]
    return pd.DataFrame(rows, columns=["slide_a", "slide_b", "group", "metric", "value"])


def test_leaderboard_is_mean_of_four_medians():
    summary = pd.DataFrame(
        {
            "group": [ALL, INTER_SCANNER, INTER_STAINING, INTER_BOTH, ALL],
            "metric": ["cosine", "top_10", "top_10", "top_10", "top_10"],
            "median": [0.8, 0.9, 0.3, 0.2, 0.99],
        }
    )
    assert leaderboard_metric(summary) == pytest.approx((0.8 + 0.9 + 0.3 + 0.2) / 4)
    by_model = leaderboard_metric(pd.concat([summary.assign(model="m1"), summary.assign(model="m2")]))
    assert by_model.to_dict() == pytest.approx({"m1": 0.55, "m2": 0.55})
    # From pairs: pairs (0_0,0_1) and (1_0,1_1) are inter-scanner with top-10 0.95 and 0.45 → median 0.7;
    # (0_0,1_0), (0_1,1_1) inter-staining: 0.5, 0.3 → 0.4; (0_0,1_1), (0_1,1_0) both: 0.1, 0.2 → 0.15;
    # cosine over all six → 0.65. Leaderboard = (0.65 + 0.7 + 0.4 + 0.15) / 4.
    summary = summarize_scores(_hand_scores(), n_boot=0)
    assert leaderboard_metric(summary) == pytest.approx((0.65 + 0.7 + 0.4 + 0.15) / 4)
    assert leaderboard_ci(_hand_scores(), n_boot=200)["value"] == pytest.approx(0.475)


def test_pair_weights_by_hand():
    counts = np.array([[2, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(pair_weights(counts, [0, 0, 1], [1, 2, 2]), [[0, 2, 0], [1, 1, 1]])
    medians = bootstrap_statistic(
        np.array([1.0, 2.0, 10.0]), np.array([[0, 2, 0], [1, 1, 1], [0, 0, 0]]), "median"
    )
    np.testing.assert_array_equal(medians[:2], [2.0, 2.0])
    assert np.isnan(medians[2])


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    feats = noisy_slides(np.random.default_rng(11), n_slides=12, n=30, dim=8, noise=1.5)
    scores = score_pairs(feats, slide_table(3, 4))
    one = summarize_scores(scores, n_boot=300, seed=1)
    pd.testing.assert_frame_equal(one, summarize_scores(scores, n_boot=300, seed=1))
    assert not one.equals(summarize_scores(scores, n_boot=300, seed=2))
    for stat in ("mean", "median"):
        assert (one[f"{stat}_ci_low"] <= one[stat]).all() and (one[stat] <= one[f"{stat}_ci_high"]).all()
        assert (one[f"{stat}_ci_low"] < one[f"{stat}_ci_high"]).all()
    cos = wide(scores)["cosine"].reset_index()
    codes = {s: i for i, s in enumerate(slide_table(3, 4)["slide_id"])}
    a, b = cos["slide_a"].map(codes).to_numpy(), cos["slide_b"].map(codes).to_numpy()
    low, high = cluster_bootstrap_ci(cos["cosine"].to_numpy(), a, b, 12, "mean", n_boot=300, seed=5)
    assert low < cos["cosine"].mean() < high
    assert (low, high) == cluster_bootstrap_ci(cos["cosine"].to_numpy(), a, b, 12, "mean", n_boot=300, seed=5)


def test_figures(tmp_path):
    feats = noisy_slides(np.random.default_rng(12), n_slides=4, n=20, dim=8)
    summary = pd.concat(
        [
            summarize_scores(score_pairs(feats * w, slide_table(2, 2)), n_boot=20).assign(model=name)
            for name, w in [("a", 1.0), ("b", 2.0)]
        ]
    )
    for plot, name in [(plot_topk_vs_cosine, "topk.png"), (plot_scanner_vs_staining, "scan.png")]:
        out = plot(summary, tmp_path / "fig" / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BenchmarkError, match="model"):
        plot_topk_vs_cosine(summary.drop(columns="model"), tmp_path / "x.png")


def test_report_rounds_the_leaderboard_of_plismbench_compat_scores(tmp_path):
    from histodistill.report import build_report

    rng = np.random.default_rng(5)
    feats, slides = noisy_slides(rng, n_slides=4, n=24, dim=8, noise=1.5), slide_table(2, 2)
    paths = {}
    for compat in ("exact", "plismbench"):
        paths[compat] = tmp_path / f"{compat}.parquet"
        score_plism(feats, slides, paths[compat], model=compat, top_k=(1, 10), compat=compat)
    assert read_scores(paths["plismbench"])[1]["params"]["compat"] == "plismbench"
    board = build_report({"plism": {m: str(p) for m, p in paths.items()}}, tmp_path / "report", n_boot=0)
    board = board.set_index("model")["plism_leaderboard"]
    for compat, decimals in (("exact", None), ("plismbench", 3)):
        summary = summarize_scores(read_scores(paths[compat])[0], n_boot=0)
        medians = [float(summary.query("group == @g and metric == @m")["median"].iloc[0]) for g, m in LB]
        want = np.mean(medians) if decimals is None else np.round(np.mean(np.round(medians, 3)), 3)
        assert board[compat] == pytest.approx(want, abs=1e-12)
    assert board["plismbench"] == round(board["plismbench"], 3)
    assert "plismbench" in (tmp_path / "report" / "index.html").read_text()


LB = [(ALL, "cosine"), (INTER_SCANNER, "top_10"), (INTER_STAINING, "top_10"), (INTER_BOTH, "top_10")]


# ----------------------------------------------------------------------------- robustness index


def test_robustness_index_by_hand():
    # Tiles t0, t1 on slides s0, s1 at angles p00 = 0°, p10 = 10°, p01 = 25°, p11 = 60° (p{tile}{slide}).
    # Nearest first: p00 → p10 (OS), p01 (SO), p11; p10 → p00 (OS), p01 (OO), p11 (SO);
    # p01 → p10 (OO), p00 (SO), p11 (OS); p11 → p01 (OS), p10 (SO), p00 (OO).
    # k = 1: SO 0, OS 3 → 0; k = 2: SO 3 (p00, p01, p11), OS 3 → 1; k = 3: SO 4, OS 4 → 1.
    x = unit2d([0, 10, 25, 60])
    tile, slide = [0, 1, 0, 1], ["s0", "s0", "s1", "s1"]
    out = robustness_index(x, tile, {"slide": slide, "scanner": ["X"] * 4}, ks=(1, 2, 3), block_size=3)
    assert out == {
        "ri_slide_k1": 0.0,
        "ri_slide_k2": 1.0,
        "ri_slide_k3": 1.0,
        # one scanner: no neighbour has the same tile from another scanner
        "ri_scanner_k1": 0.0,
        "ri_scanner_k2": 0.0,
        "ri_scanner_k3": 0.0,
    }
    with pytest.raises(BenchmarkError, match="k values"):
        robustness_index(x, tile, {"slide": slide}, ks=(4,))


def test_robustness_index_in_the_scores_and_the_report(tmp_path):
    from histodistill.report import build_report

    rng = np.random.default_rng(2)
    slides = slide_table(2, 2)  # 4 slides
    tissue = rng.normal(size=(30, 16))
    site = rng.normal(size=(4, 16)) * 10
    robust = np.stack([tissue + 0.01 * rng.normal(size=tissue.shape) for _ in range(4)]).astype(np.float32)
    by_site = np.stack([site[s] + 0.1 * tissue for s in range(4)]).astype(np.float32)
    paths = {}
    for name, feats in (("robust", robust), ("by_site", by_site)):
        scores = score_pairs(feats, slides, top_k=(1, 10), robustness_tiles=20, robustness_k=(3, 10))
        pooled = scores[scores["group"] == "pooled"].set_index("metric")["value"]
        assert set(pooled.index) == {
            f"ri_{s}_k{k}" for s in ("slide", "scanner", "staining") for k in (3, 10)
        }
        if name == "robust":  # the 3 nearest are the same tile on the 3 other slides: no OS at all
            assert pooled["ri_slide_k3"] == np.inf
        else:  # the nearest are other tiles of the same slide: no SO at k = 3, 10
            assert pooled["ri_slide_k3"] == 0.0 and pooled["ri_slide_k10"] == 0.0
        paths[name] = tmp_path / f"{name}.parquet"
        score_plism(
            feats, slides, paths[name], model=name, top_k=(1, 10), robustness_tiles=20, robustness_k=(3,)
        )
    summary = summarize_scores(read_scores(paths["by_site"])[0], n_boot=10)
    row = summary[(summary["group"] == "pooled") & (summary["metric"] == "ri_slide_k3")].iloc[0]
    assert row["median"] == 0.0 and row["n_pairs"] == 0
    assert len(summary[summary["group"] == ALL]) == 3  # the pairs' metrics are unchanged
    board = build_report({"plism": {m: str(p) for m, p in paths.items()}}, tmp_path / "report", n_boot=0)
    ri = board.set_index("model")["plism_robustness_index"]  # site = slide at k = 3
    assert ri["robust"] > 1 > ri["by_site"]
    assert "robustness index" in (tmp_path / "report" / "index.html").read_text()
