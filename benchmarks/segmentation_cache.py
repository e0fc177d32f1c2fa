"""EVA segmentation training: time per epoch with the encoder's patch tokens cached vs the encoder re-run.

EVA trains its segmentation decoder on patch tokens computed once per dataset (its predict step writes them;
here the `embed` rule with pooling `patch_tokens`), so an epoch costs only the decoder. The baseline is what a
competent user without a cache writes: each batch's tiles go through the frozen encoder under
`torch.inference_mode` (model transform on the whole batch at once, no gradient, the encoder in eval mode),
then the decoder step. Both sides run the same decoder steps (`bench.segmentation.ConvDecoderMS`, EVA's
Dice loss, AdamW) on the same batches of the same tiles (demo tissue cut into 224 px tiles, with the
generator's masks), so the difference is the encoder's forward passes. The one-time cost of the cache (one
encoder pass over the tiles) is printed too, with the number of epochs after which caching has paid off.

Warm-up: one epoch of each side first (not timed). Then `--repeats` epochs per side, interleaved; min and
median seconds per epoch are printed. Defaults: H0-mini's architecture (ViT-B/14, 4 registers; random
weights: timing only), 64 tiles, batch 16, on CPU with all torch threads.

Last run (2026-11-30, `--tiles 32 --batch 16 --repeats 3`, H0-mini architecture on 2 shared CPU cores at a
load average of ~14, so absolute times are inflated): cached 22.96 s/epoch min, 33.65 median; encoder re-run
168.0 min, 174.2 median: 7.3× (min), 5.2× (median); the cache cost 124.8 s once, paid back after 0.9 epochs.

    python benchmarks/segmentation_cache.py
    python benchmarks/segmentation_cache.py --model h0_mini_tiny --tiles 32 --repeats 3   # quick
    python benchmarks/segmentation_cache.py --device cuda --tiles 512 --batch 64          # EVA's batch
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from histodistill.bench.segmentation import ConvDecoderMS, dice_loss, tokens_to_grid
from histodistill.demo.masks import iter_label_bands
from histodistill.demo.slides import DemoSlideConfig, iter_rgb_bands
from histodistill.models import encode, load_model
from histodistill.models.transforms import ModelTransform, transform_batch


def demo_tiles(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n tiles uint8 [n, 224, 224, 3] and their labels [n, 224, 224] from demo slides' centre rows."""
    side = 224
    per_row = 8
    rows = -(-n // per_row)
    spec = DemoSlideConfig(width_px=side * per_row + 512, height_px=side * rows + 512, mpp=0.5)
    rgb = np.concatenate(list(iter_rgb_bands(spec, seed)))[256:-256, 256:-256]
    labels = np.concatenate(list(iter_label_bands(spec, seed)))[256:-256, 256:-256]

    def cut(a: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                a[r * side : (r + 1) * side, c * side : (c + 1) * side]
                for r in range(rows)
                for c in range(per_row)
            ]
        )[:n]

    return cut(rgb), cut(labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="h0_mini", help="registry name (random weights)")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = load_model(args.model, random_init=True)
    spec, encoder = loaded.spec, loaded.model.to(device).eval()
    prefix = 1 + spec.num_registers
    transform = ModelTransform(spec.transform)
    tiles, masks = demo_tiles(args.tiles)
    target = torch.as_tensor(masks).long().to(device)
    batches = [slice(s, min(s + args.batch, args.tiles)) for s in range(0, args.tiles, args.batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def encode_tiles(part: slice) -> torch.Tensor:
        images = transform_batch(transform, tiles[part]).to(device)
        return encode(encoder, images, prefix, "patch_tokens").float()

    start = time.perf_counter()
    cache = torch.cat([encode_tiles(b) for b in batches])  # the one-time cache (what `embed` writes)
    sync()
    cache_s = time.perf_counter() - start

    decoder = ConvDecoderMS(spec.embed_dim, 3).to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=0.002)

    def step(tokens: torch.Tensor, part: slice) -> None:
        loss = dice_loss(decoder(tokens_to_grid(tokens.clone()), (224, 224)), target[part])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def epoch(cached: bool) -> float:
        sync()
        start = time.perf_counter()
        for part in batches:
            step(cache[part] if cached else encode_tiles(part), part)
        sync()
        return time.perf_counter() - start

    epoch(True), epoch(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for cached in (True, False):
            times[cached].append(epoch(cached))
    print(
        f"{args.model} ({spec.arch}, {spec.embed_dim}-d, {cache.shape[1]} patch tokens) on {device}, "
        f"{torch.get_num_threads()} threads: {args.tiles} tiles, batch {args.batch}, {len(batches)} steps per epoch, "
        f"{args.repeats} repeats after 1 warm-up epoch per side"
    )
    for cached, label in ((True, "cached patch tokens"), (False, "encoder re-run per epoch")):
        t = times[cached]
        print(f"  {label:26s} min {min(t):8.3f} s/epoch   median {statistics.median(t):8.3f} s/epoch")
    ratio_min = min(times[False]) / min(times[True])
    ratio_med = statistics.median(times[False]) / statistics.median(times[True])
    saved = statistics.median(times[False]) - statistics.median(times[True])
    print(f"  speed-up with the cache: {ratio_min:.1f}× (min), {ratio_med:.1f}× (median)")
    print(
        f"  building the cache once: {cache_s:.3f} s, paid back after {cache_s / saved:.1f} epochs "
        f"(EVA's CoNSeP: 2,000 steps of batch 64 on 432 patches ≈ 286 epochs)"
    )


if __name__ == "__main__":
    main()
