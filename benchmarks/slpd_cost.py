"""Per-epoch cost of SLPD's clustering and slide matching vs its training step, at N = 100, 1,000, 10,000 slides.

What one SLPD epoch adds to DINO (histodistill.slide.prototypes), on synthetic data of the paper's shapes
(M = 4 prototypes per slide, 256-d bottleneck codes, `--regions` regions per slide):
- clustering: `slide_prototypes`, one scikit-learn k-means per slide (n_init 3, the config default). Linear in
  N; timed on min(N, `--cluster-cap`) slides and scaled to N when N is larger (printed as "scaled").
- matching: `top_k_slides` (K = 1) on synthetic prototypes, exact (all pairs, Hungarian per pair) and
  approximate (`--candidates` slides prefiltered by mean-prototype cosine, block by block).
- baseline: what the SLPD reference code does (main_SLPD.py, `train_one_epoch`): a dense [N, N, M!] tensor of
  summed cosines under every permutation (numpy einsum per permutation, max, top-k). Quadratic in memory:
  skipped (its size printed) when it would exceed `--max-dense-gib`.
- training step: one pretraining step of the default region encoder (HIPT vit4k_xs, 2 global 14² + 8 local 6²
  crops, 65,536-prototype head) at `--batch` regions, timed here (CPU unless CUDA is available); an epoch is
  N · regions / batch steps.
Threads: `--threads` (default 1) for torch and the BLAS / OpenMP pools (threadpoolctl), so that timings
on a shared machine are not dominated by oversubscription. Each measurement: one warm-up, then `--repeats` runs; min and median printed. Peak memory of the matching is
Python's tracemalloc peak (numpy buffers included). Times grow linearly (clustering, approximate matching)
or quadratically (exact matching, the reference's dense tensor) in N.

    python benchmarks/slpd_cost.py                    # N = 100, 1,000, 10,000
    python benchmarks/slpd_cost.py --sizes 100 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
import tracemalloc

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from histodistill.slide.prototypes import Prototypes, slide_prototypes, top_k_slides

M, D = 4, 256


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def synthetic_prototypes(n: int, seed: int) -> Prototypes:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, M, D)).astype(np.float32)
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    return Prototypes(c, np.zeros(0, np.int64), np.ones(n, bool))


def reference_dense(p: Prototypes, k: int = 1) -> np.ndarray:
    """The reference code's matching: [N, N, M!] summed cosines under every permutation, max, top-k."""
    c = p.centroids
    perms = list(itertools.permutations(range(M)))
    sims = np.empty((len(c), len(c), len(perms)), np.float32)
    for i, perm in enumerate(perms):
        sims[:, :, i] = np.einsum("nkd,mkd->nm", c, c[:, perm])
    best = sims.max(-1)
    np.fill_diagonal(best, -np.inf)
    return np.argsort(-best, axis=1)[:, :k]


def train_step_seconds(batch: int, repeats: int) -> tuple[float, float, str]:
    from histodistill.distill.centering import SoftmaxCenter
    from histodistill.distill.heads import ProjectionHead
    from histodistill.distill.losses import dino_loss
    from histodistill.slide.encoder import RegionViT, multi_crop

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    student = torch.nn.ModuleDict({"b": RegionViT(384, 16), "h": ProjectionHead(192, 65536)}).to(dev)
    teacher = torch.nn.ModuleDict({"b": RegionViT(384, 16), "h": ProjectionHead(192, 65536)}).to(dev).eval()
    center = SoftmaxCenter(65536).to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    tokens, mask = torch.randn(batch, 16, 16, 384), torch.rand(batch, 16, 16) > 0.1
    gen = torch.Generator().manual_seed(0)

    def step():
        crops = [(t.to(dev), m.to(dev)) for t, m in multi_crop(tokens, mask, 14, 6, 8, gen)]
        with torch.no_grad():
            t_out = [teacher["h"](teacher["b"](t, m)) for t, m in crops[:2]]
        s_out = [student["h"](student["b"](t, m)) for t, m in crops]
        loss = dino_loss([center.probs(t, 0.04) for t in t_out], s_out, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    lo, med = timed(step, repeats)
    return lo, med, dev


def measure(n: int, args: argparse.Namespace, step_med: float) -> str:
    """One table row: the costs at N = n slides."""
    rng = np.random.default_rng(n)
    m = min(n, args.cluster_cap)
    codes = rng.normal(size=(m * args.regions, D)).astype(np.float32)
    slides = np.repeat(np.arange(m), args.regions)
    c_min, _ = timed(lambda: slide_prototypes(codes, slides, m, M, 0, 3, 100, 32), 1)
    cluster = c_min * n / m
    protos = synthetic_prototypes(n, 0)
    if n <= args.max_exact:
        ex, _ = timed(lambda: top_k_slides(protos, 1), 1 if n > 100 else args.repeats)
        ex_mib = peak_mib(lambda: top_k_slides(protos, 1))
    else:
        ex, ex_mib = math.nan, math.nan
    ap_min, ap_med = timed(
        lambda: top_k_slides(protos, 1, candidates=args.candidates), 1 if n > 1000 else args.repeats
    )
    ap_mib = peak_mib(lambda: top_k_slides(protos, 1, candidates=args.candidates))
    dense_gib = n * n * math.factorial(M) * 4 / 2**30
    if dense_gib <= args.max_dense_gib:
        ref, _ = timed(lambda: reference_dense(protos), 1 if n > 100 else args.repeats)
        ref_mib = peak_mib(lambda: reference_dense(protos))
    else:
        ref, ref_mib = math.nan, dense_gib * 1024
    epoch = n * args.regions / args.batch * step_med
    row = (f"{n:,}", f"{cluster:.2f}{' (scaled)' if m < n else ''}", f"{ex:.2f}", f"{ex_mib:.1f}",
           f"{ap_min:.2f} (median {ap_med:.2f})", f"{ap_mib:.1f}",
           f"{ref:.2f}" if ref == ref else "skipped", f"{ref_mib:.1f}{'' if ref == ref else ' (would need)'}",
           f"{ex / ref:.2f}" if ex == ex and ref == ref else "-", f"{epoch:.0f}",
           f"{(cluster + ap_min) / epoch:.3f}")  # fmt: skip
    return " | ".join(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--regions", type=int, default=40, help="regions per slide (SLPD keeps slides with ≥ 32)")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--cluster-cap", type=int, default=200, help="slides actually clustered per size")
    ap.add_argument("--max-exact", type=int, default=1000, help="largest N for the exact all-pairs matching")
    ap.add_argument("--max-dense-gib", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-seconds", type=float, default=None, help="reuse a measured training-step time")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS/OpenMP threads (1: stable on a shared machine)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        _run(args)


def _run(args: argparse.Namespace) -> None:

    if args.step_seconds:  # a step time measured before (same --batch): skip the slow CPU step
        step_min = step_med = args.step_seconds
        dev = "given"
    else:
        step_min, step_med, dev = train_step_seconds(args.batch, args.repeats)
    print(f"training step ({dev}, batch {args.batch}, 10 crops, head 65,536): min {step_min:.3f} s, "
          f"median {step_med:.3f} s")  # fmt: skip
    header = ("N", "cluster s", "exact s", "exact MiB", "approx s", "approx MiB", "dense-ref s", "dense-ref MiB",
              "exact/ref", "train-epoch s", "(cluster+approx)/train")  # fmt: skip
    print(" | ".join(header))
    for n in args.sizes:
        print(measure(n, args, step_med), flush=True)


if __name__ == "__main__":
    main()
