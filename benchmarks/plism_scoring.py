"""PLISM robustness scoring: ours (blockwise, cached self-similarities) vs a full-matrix NumPy baseline.

ours              = `histodistill.bench.plism.score_pairs`: per pair only A·Bᵀ, in row blocks, no sort
full + argsort    = per pair the full 2n × 2n similarity of [A; B] and an argsort of every row
full + argpart    = the same matrix with `argpartition` of the top kmax (what plismbench does)

Features are random matched tiles (a shared tissue signal + per-slide noise), written once to a raw float32
file and read one slide at a time (heap reads, not a memory map, so RSS counts only what a scorer holds).
Each implementation runs in its own subprocess, which reports its throughput (pairs/s), its peak traced
NumPy/Python heap (tracemalloc) and its peak RSS. Ours scores all pairs of S slides (its per-slide pass
included); a baseline times its first `--baseline-pairs` pairs. Ours runs at two slide counts to show that
its memory does not grow with S (apart from S·n·kmax float32 of cached self-similarities).

  python benchmarks/plism_scoring.py                      # the real shape: 91 slides × 8,139 tiles × 1,536
  python benchmarks/plism_scoring.py --slides 21 --tiles 8139 --dim 1536
  python benchmarks/plism_scoring.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

TOP_K = (1, 3, 5, 10)


class FileSlides:
    """[S, n, D] float32 in a raw file; `[s]` reads slide s into a fresh array."""

    def __init__(self, path: Path, n_slides: int, n: int, dim: int):
        self.path, self.shape = path, (n_slides, n, dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: int) -> np.ndarray:
        _, n, dim = self.shape
        return np.fromfile(self.path, np.float32, count=n * dim, offset=int(s) * n * dim * 4).reshape(n, dim)


def slide_table(n_slides: int) -> pd.DataFrame:
    """PLISM-like labels: slide s has staining s // 7 and scanner s % 7."""
    return pd.DataFrame(
        {
            "slide_id": [f"slide{s:02d}" for s in range(n_slides)],
            "scanner": [f"scanner{s % 7}" for s in range(n_slides)],
            "staining": [f"staining{s // 7}" for s in range(n_slides)],
        }
    )


def write_features(path: Path, n_slides: int, n: int, dim: int, seed: int) -> None:
    """Noise set so a matched pair's cosine (≈ 1 / (1 + σ²)) is ~3 sd of an unmatched one (1/√D):
    top-k accuracies land between 0 and 1, so the agreement check is not trivially 0 = 0 or 1 = 1."""
    rng = np.random.default_rng(seed)
    sigma = np.float32(np.sqrt(max(np.sqrt(dim) / 3 - 1, 0.25)))
    tissue = rng.standard_normal((n, dim), dtype=np.float32)
    with open(path, "wb") as fh:
        for _ in range(n_slides):
            (tissue + sigma * rng.standard_normal((n, dim), dtype=np.float32)).tofile(fh)


def full_matrix_pair(a: np.ndarray, b: np.ndarray, top_k=TOP_K, select: str = "argsort") -> list[float]:
    """The straightforward version: full 2n × 2n cosine matrix, then the target's rank in each row."""
    n = len(a)
    x = np.concatenate([a, b]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    cosine = float(np.mean(sim[np.arange(n), np.arange(n, 2 * n)], dtype=np.float64))
    np.fill_diagonal(sim, -np.inf)  # a row never retrieves itself
    target = np.r_[np.arange(n, 2 * n), np.arange(n)]
    kmax = max(top_k)
    if select == "argsort":
        ranked = np.argsort(-sim, axis=1)[:, :kmax]
    else:
        top = np.argpartition(-sim, kmax, axis=1)[:, :kmax]
        ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), axis=1), 1)
    found = ranked == target[:, None]
    accs = [(found[:n, :k].any(1).mean() + found[n:, :k].any(1).mean()) / 2 for k in top_k]
    return [cosine, *map(float, accs)]


def worker(args: argparse.Namespace) -> None:
    """One implementation in this (fresh) process; prints a JSON line with throughput and memory."""
    from histodistill.bench.plism import score_pairs  # imported before timing and tracing

    feats = FileSlides(Path(args.data), args.slides, args.tiles, args.dim)
    tracemalloc.start()
    start = time.perf_counter()
    if args.impl == "ours":
        scores = score_pairs(
            feats,
            slide_table(args.slides),
            block_size=args.block_size,
            workers=args.workers,
            cache_slides=args.cache_slides,
        )
        wide = scores.pivot(index=["slide_a", "slide_b"], columns="metric", values="value")
        values = wide[["cosine", *(f"top_{k}" for k in TOP_K)]].to_numpy()[: args.baseline_pairs].tolist()
        n_pairs = len(wide)
    else:
        values = []
        pairs = list(itertools.combinations(range(args.slides), 2))[: args.baseline_pairs]
        for a, b in pairs:
            values.append(full_matrix_pair(feats[a], feats[b], select=args.impl.removeprefix("full_")))
        n_pairs = len(pairs)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"pairs": n_pairs, "seconds": elapsed, "peak": peak, "rss": rss_kib * 1024, "values": values}
        )
    )


def run(impl: str, args: argparse.Namespace, data: Path, n_slides: int) -> dict:
    cmd = [sys.executable, __file__, "--_worker", impl, "--_data", str(data), "--slides", str(n_slides)]
    cmd += ["--tiles", str(args.tiles), "--dim", str(args.dim), "--block-size", str(args.block_size)]
    cmd += ["--workers", str(args.workers), "--cache-slides", str(args.cache_slides)]
    cmd += ["--baseline-pairs", str(args.baseline_pairs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=91)
    parser.add_argument("--tiles", type=int, default=8139, help="tiles per slide (the leaderboard subset)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1, help="pair threads (BLAS already uses every core)")
    parser.add_argument("--cache-slides", type=int, default=2, help="slides ours keeps (+1 per worker)")
    parser.add_argument("--baseline-pairs", type=int, default=3, help="pairs the baselines are timed on")
    parser.add_argument("--baselines", nargs="*", default=["full_argsort", "full_argpartition"])
    parser.add_argument("--quick", action="store_true", help="a small run: 8 slides × 1,000 tiles × 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_worker", dest="impl", help=argparse.SUPPRESS)
    parser.add_argument("--_data", dest="data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        return worker(args)
    if args.quick:
        args.slides, args.tiles, args.dim = 8, 1000, 256
    # The smaller run still fills ours' slide cache, so that the two peaks compare like with like.
    small = min(args.slides, max(3, args.slides // 2, args.cache_slides + args.workers + 1))
    gib = args.slides * args.tiles * args.dim * 4 / 2**30
    print(
        f"{args.slides} slides × {args.tiles} tiles × {args.dim} dims ({gib:.2f} GiB float32), top-k {TOP_K}"
    )
    print(
        f"ours: block {args.block_size}, workers {args.workers}, cache {args.cache_slides} slides; ", end=""
    )
    print(f"CPU cores {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "features.f32"
        write_features(data, args.slides, args.tiles, args.dim, args.seed)
        results = {f"ours ({args.slides} slides)": run("ours", args, data, args.slides)}
        results[f"ours ({small} slides)"] = run("ours", args, data, small)
        for impl in args.baselines:
            results[impl] = run(impl, args, data, args.slides)

    ours = results[f"ours ({args.slides} slides)"]
    rate_ours = ours["pairs"] / ours["seconds"]
    header = f"{'implementation':<22}{'pairs':>7}{'s':>9}{'pairs/s':>10}{'vs ours':>9}"
    print(f"\n{header}{'peak heap':>12}{'peak RSS':>11}")
    for name, r in results.items():
        rate = r["pairs"] / r["seconds"]
        ratio = f"{rate_ours / rate:.1f}×" if not name.startswith("ours") else ""
        row = f"{name:<22}{r['pairs']:>7}{r['seconds']:>9.1f}{rate:>10.3f}{ratio:>9}"
        print(row + f"{r['peak'] / 2**20:>9.0f} MiB{r['rss'] / 2**20:>7.0f} MiB")
    growth = (args.slides - small) * args.tiles * max(TOP_K) * 4 / 2**20
    print(f"(ours is expected to grow only by S·n·kmax·4 B between the two slide counts: {growth:.1f} MiB)")
    ref = np.asarray(ours["values"])
    cos, top1, top10 = ref[:, [0, 1, 4]].mean(0)
    print(f"ours on the compared pairs: mean cosine {cos:.3f}, top-1 {top1:.3f}, top-10 {top10:.3f}")
    for impl in args.baselines:
        other = np.asarray(results[impl]["values"])
        m = min(len(ref), len(other))
        cos = np.abs(ref[:m, 0] - other[:m, 0]).max()
        acc = np.abs(ref[:m, 1:] - other[:m, 1:]).max()
        print(f"agreement with {impl} on {m} pairs: max |Δ cosine| {cos:.1e}, max |Δ top-k| {acc:.1e}")


if __name__ == "__main__":
    main()
