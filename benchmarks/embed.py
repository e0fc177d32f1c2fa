"""Embedding extraction throughput: DataLoader-fed (the real `extract_embeddings`) vs model only.

model only  = forward passes on a batch already in memory (the ceiling)
loader-fed  = `extract_embeddings`: tile store → DataLoader workers → transform → forward → Zarr writes

The ratio loader-fed / model-only shows whether the loader is the bottleneck: the target (≥ 0.9) is for real
architectures such as ViT-B/14; a two-block tiny model is loader-bound by design and is shown for contrast.
Models: h0_mini (ViT-B/14 reg4 SwiGLU, the real architecture, random weights: timing only) and its tiny twin.
On a GPU (bf16 autocast) add h_optimus_0 (ViT-g/14): python benchmarks/embed.py --models h0_mini h_optimus_0
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
from histodistill.devices import autocast_dtype, pick_device
from histodistill.embed import extract_embeddings
from histodistill.models import load_model
from histodistill.tilestore import TileStore, pack_tiles
from histodistill.tiling import TilingConfig, tile_slide


def model_only(name: str, n: int, batch_size: int, device: torch.device, precision: str) -> float:
    loaded = load_model(name, random_init=True)
    model = loaded.model.to(device)
    amp = autocast_dtype(device, precision)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model.forward_features(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, done = time.perf_counter(), 0
        while done < n:
            model.forward_features(x).float().cpu()
            done += batch_size
    return done / (time.perf_counter() - start)


def loader_fed(name, store, out, batch_size, num_workers, device, precision) -> float:
    start = time.perf_counter()
    n = extract_embeddings(
        name,
        store,
        out,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        random_init=True,
        chunk_batches=4,
    )
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["h0_mini", "h0_mini_tiny"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--slide-px", type=int, nargs=2, default=[6144, 4608], help="demo slide width, height"
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = DemoSlideConfig(*args.slide_px, mpp=0.25)
        child = multiprocessing.get_context("spawn").Process(
            target=make_demo_slide, args=(tmp / "s.tiff", 1, spec)
        )
        child.start()
        child.join()
        tile_slide(tmp / "s.tiff", "bench", tmp / "t.parquet", TilingConfig(min_tissue=0.0))
        pack_tiles([tmp / "t.parquet"], tmp / "store.zarr")
        n = len(TileStore(tmp / "store.zarr"))
        print(
            f"{n} tiles of 224 px, batch {args.batch_size}, {args.num_workers} loader worker(s), device {device}, "
            f"precision {autocast_dtype(device, args.precision) or 'fp32'}, torch threads {torch.get_num_threads()}"
        )
        for name in args.models:
            # Warm the page cache and the code paths once, then time each way.
            loader_fed(
                name,
                tmp / "store.zarr",
                tmp / f"warm-{name}.zarr",
                args.batch_size,
                args.num_workers,
                args.device,
                args.precision,
            )
            fed = loader_fed(
                name,
                tmp / "store.zarr",
                tmp / f"{name}.zarr",
                args.batch_size,
                args.num_workers,
                args.device,
                args.precision,
            )
            ceiling = model_only(name, n, args.batch_size, device, args.precision)
            print(
                f"{name:>14}: model only {ceiling:8.1f} tiles/s | loader-fed {fed:8.1f} tiles/s | "
                f"ratio {fed / ceiling:.2f} (target ≥ 0.9)"
            )


if __name__ == "__main__":
    main()
