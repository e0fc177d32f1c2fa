"""ScoreNet's cost claim: time and peak memory of ScoreNet vs its local encoder over every region.

baseline  = what a competent user runs without ScoreNet: the same local encoder over all N full-resolution
            regions of the ROI (region_px each), batched (`--batch-size`), inference mode, same precision;
scorenet  = ScoreNet's test-time forward (`ScoreNet.eval()`): the scorer on the ROI downscaled by
            s = region_px / 16 (the paper's scorer: 96 wide, 8 deep), hard top-K, the local encoder on the
            K selected regions, the mixer.

K is the paper code's ⌈0.1·N⌉ (`--k-fraction`) or a fixed count (`--top-k`, e.g. 20: the reference's `--k`
argument, whose value `get_indicators` ignores for ⌈0.1·N⌉): with K
a fixed share of N, the saving is at most 1 / k_fraction (≈ 10×) whatever the ROI size; a fixed K makes it
grow with the ROI. Both are printed when `--top-k` is given. Per ROI side: min and median over `--repeats`
timed runs after one warm-up, the ratio baseline / ScoreNet of the medians, and the growth exponent of
ScoreNet's time in ROI area between the smallest and the largest side (1 = linear, 2 = quadratic).

Columns: wall time (s, min / median) and CPU seconds (median of the process's CPU time over the same runs,
`time.process_time`, all threads: the fair figure on a shared, loaded machine), their ratios, and peak memory.
`--breakdown` adds, per side, ScoreNet's stages (downscale to the thumbnail, scorer, top-K, cutting the K
regions, the local encoder on them, mixer + head): median wall s, CPU s and GFLOPs (counted by
`torch.utils.flop_counter` on the warm-up run; multiply–adds × 2), and the baseline's GFLOPs.

Peak memory: on a GPU, `torch.cuda.max_memory_allocated` over the timed runs; on a CPU, the process's peak
resident memory (RSS sampled every 2 ms by a thread, psutil) during the timed runs minus its RSS before them,
i.e. what the measured call adds on top of the loaded model and the ROI.

Model: `--model` with random weights (timing only): h0_mini_tiny on CPU by default; the student's real
architecture is h0_mini (ViT-B/14): on a GPU, python benchmarks/scorenet.py --model h0_mini --sides 1024 2048 4096
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time

import torch

from histodistill.bench.scorenet.model import LocalEncoder, ScoreNet, ScoreNetModelConfig
from histodistill.devices import autocast_dtype, pick_device
from histodistill.models import load_model


class _PeakRss:
    """Peak resident memory (MiB) of this process above its level at entry, sampled every 2 ms (psutil)."""

    def __enter__(self):
        import psutil

        self._process, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _gflops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _timed(fn, device: torch.device, repeats: int, warmup=None) -> tuple[float, float, float, float, float]:
    """(min s, median s, median CPU s, peak MiB, GFLOPs) of `fn` over `repeats` runs after one warm-up run,
    which counts the FLOPs (module docstring). `warmup` () → GFLOPs of `fn`: a cheaper warm-up that counts
    them (the baseline's: one batch of regions, its count scaled to all of them)."""
    gflops = warmup() if warmup is not None else _gflops(fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    with _PeakRss() as rss:
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss.mib
    return min(times), statistics.median(times), statistics.median(cpu), peak, gflops


def _stages(net: ScoreNet, roi: torch.Tensor, device: torch.device, repeats: int) -> dict[str, tuple]:
    """ScoreNet's test-time forward cut into its stages (the same calls as `ScoreNet.forward` in eval mode),
    each timed on the previous stage's output: {stage: (median s, median CPU s, GFLOPs)}."""
    state: dict = {}

    def downscale():
        state["thumbs"], state["grid"] = net.thumbnail(roi)

    def scorer():
        state["global"], state["scores"] = net.scorer(state["thumbs"])

    def topk():
        k = net.config.k_for(state["scores"].shape[-1])
        state["indices"] = torch.topk(state["scores"], k, dim=-1, sorted=False).indices.sort(dim=-1).values

    def cut():
        state["regions"] = net._gather(roi, state["indices"], state["grid"])

    def local():
        state["embeddings"] = net.project(net.local(state["regions"].flatten(0, 1)))[None]

    def mixer():
        net.head(torch.cat([state["global"], net.mixer(state["embeddings"])], dim=-1))

    out = {}
    with torch.inference_mode():
        for name, fn in [
            ("downscale", downscale),
            ("scorer", scorer),
            ("top-K", topk),
            ("cut K regions", cut),
            ("local encoder (K)", local),
            ("mixer + head", mixer),
        ]:
            _, med, cpu, _, gflops = _timed(fn, device, repeats)
            out[name] = (med, cpu, gflops)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="registry model (default: h0_mini on GPU, h0_mini_tiny on CPU)"
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--region-px", type=int, default=224)
    parser.add_argument("--k-fraction", type=float, default=0.1)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)"
    )
    parser.add_argument("--breakdown", action="store_true", help="time and count ScoreNet's stages per side")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = args.model or ("h0_mini" if device.type == "cuda" else "h0_mini_tiny")
    loaded = load_model(name, random_init=True)
    amp = autocast_dtype(device, args.precision, loaded.spec.precision)
    local = LocalEncoder(loaded).to(device)
    policies = [("10%" if args.k_fraction == 0.1 else f"{args.k_fraction:.0%}", None)]
    if args.top_k:
        policies.append((f"K={args.top_k}", args.top_k))
    nets = {}
    for label, k in policies:
        config = ScoreNetModelConfig(region_px=args.region_px, k_fraction=args.k_fraction, top_k=k)
        torch.manual_seed(0)
        nets[label] = ScoreNet(config, local, n_classes=7).to(device).eval()
    print(
        f"model {name} (random weights) on {device} ({amp or 'fp32'}, {torch.get_num_threads()} CPU threads), "
        f"regions {args.region_px} px, "
        f"repeats {args.repeats} after 1 warm-up; times in s (min / median)"
    )
    print(
        f"{'side':>6} {'N':>5} {'K':>9} {'baseline':>17} {'scorenet':>17} {'ratio':>7} "
        f"{'CPU s base/sn':>17} {'CPU ratio':>9} {'GFLOP base/sn':>17} {'peak MiB base/sn':>18}"
    )
    medians: dict[str, list[tuple[int, float]]] = {label: [] for label, _ in policies}
    for side in args.sides:
        roi = torch.rand(1, 3, side, side, device=device)
        n_side = side // args.region_px
        any_net = next(iter(nets.values()))
        regions = any_net.regions(roi, (n_side, n_side))[0]

        def baseline(regions=regions):
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                for i in range(0, len(regions), args.batch_size):
                    local(regions[i : i + args.batch_size])

        def baseline_warmup(regions=regions):  # one batch: the same kernels, a fraction of the time
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                first = regions[: args.batch_size]
                return _gflops(lambda: local(first)) * len(regions) / len(first)

        b_min, b_med, b_cpu, b_peak, b_gflops = _timed(baseline, device, args.repeats, baseline_warmup)
        for label, net in nets.items():

            def scorenet(net=net, roi=roi):
                with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    net(roi)

            s_min, s_med, s_cpu, s_peak, s_gflops = _timed(scorenet, device, args.repeats)
            medians[label].append((side, s_med))
            k = net.config.k_for(n_side * n_side)
            print(
                f"{side:>6} {n_side * n_side:>5} {f'{k} ({label})':>9} {b_min:>8.4f}/{b_med:<8.4f} "
                f"{s_min:>8.4f}/{s_med:<8.4f} {b_med / s_med:>6.1f}× {b_cpu:>8.3f}/{s_cpu:<8.3f} "
                f"{b_cpu / max(s_cpu, 1e-9):>8.1f}× {b_gflops:>8.1f}/{s_gflops:<8.1f} {b_peak:>8.0f}/{s_peak:<8.0f}",
                flush=True,
            )
            if args.breakdown:
                for stage, (med, cpu, gflops) in _stages(net, roi, device, args.repeats).items():
                    print(
                        f"{'':>6} {stage:>24}: {med:>8.4f} s {cpu:>8.4f} CPU s {gflops:>9.2f} GFLOP",
                        flush=True,
                    )
    for label, points in medians.items():
        if len(points) > 1:
            (s0, t0), (s1, t1) = points[0], points[-1]
            exponent = math.log(t1 / t0) / math.log((s1 / s0) ** 2)
            print(f"ScoreNet ({label}) time grows as area^{exponent:.2f} from {s0} to {s1} px")


if __name__ == "__main__":
    main()
