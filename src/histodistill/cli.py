"""`histodistill <stage> …`: every pipeline stage without Snakemake (the rules call the same functions)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rich.logging import RichHandler

from histodistill.errors import HistodistillError

log = logging.getLogger("histodistill")


def _demo(args: argparse.Namespace) -> None:
    from histodistill.demo.slides import DemoSlideConfig, make_demo_cohort

    spec = DemoSlideConfig(width_px=args.width_px, height_px=args.height_px, mpp=args.mpp)
    sheet = make_demo_cohort(args.out, n_slides=args.n_slides, seed=args.seed, spec=spec, cohort=args.cohort)
    log.info("wrote %d demo slides and the sample sheet %s", args.n_slides, sheet)


def _demo_teacher(args: argparse.Namespace) -> None:
    from histodistill.demo.teacher import DemoTeacherConfig, train_demo_teacher

    cfg = DemoTeacherConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        n_slides=args.n_slides,
        width_px=args.width_px,
        height_px=args.height_px,
        threads=args.threads,
        num_workers=args.num_workers,
    )
    out = Path(args.out)
    stem = str(out).removesuffix(".safetensors")
    metrics = train_demo_teacher(
        out, args.model, cfg, seed=args.seed, train_log=f"{stem}_train_log.parquet", plot=f"{stem}_train.png"
    )
    log.info(
        "demo teacher → %s (%.0f s): held-out probe accuracy %.3f (random init %.3f)",
        out,
        metrics["total_seconds"],
        metrics["trained_probe_accuracy"],
        metrics["random_init_probe_accuracy"],
    )


def _tile(args: argparse.Namespace) -> None:
    from histodistill.tiling import TilingConfig, tile_slide

    params = TilingConfig(
        mpp=args.mpp,
        tile_px=args.tile_px,
        min_tissue=args.min_tissue,
        mask_mpp=args.mask_mpp,
        on_no_tissue=args.on_no_tissue,
    )
    slide_id = args.slide_id or Path(args.slide).stem
    start = time.perf_counter()
    table = tile_slide(args.slide, slide_id, args.out, params, slide_mpp=args.slide_mpp, qc=args.qc)
    log.info("%s: %d tiles → %s (%.1f s)", slide_id, len(table), args.out, time.perf_counter() - start)


def _pack(args: argparse.Namespace) -> None:
    from histodistill.tilestore import pack_tiles

    start = time.perf_counter()
    n = pack_tiles(args.tables, args.out, chunk_tiles=args.chunk_tiles)
    elapsed = time.perf_counter() - start
    log.info("packed %d tiles → %s (%.1f s, %.0f tiles/s)", n, args.out, elapsed, n / max(elapsed, 1e-9))


def _register(args: argparse.Namespace) -> None:
    from histodistill.registration import RegistrationConfig, register_to_grid
    from histodistill.tiling import TilingConfig, tile_slide

    out = Path(args.out)
    fixed_id, moving_id = Path(args.fixed).stem, Path(args.moving).stem
    grid = args.grid
    if grid is None:  # QC needs tile windows: plan the fixed slide's tile grid
        grid = out / "grid.parquet"
        tile_slide(args.fixed, fixed_id, grid, TilingConfig(mpp=args.tile_mpp, tile_px=args.tile_px))
    params = RegistrationConfig(
        fine_mpp=args.fine_mpp,
        grid_spacing_um=args.grid_spacing_um,
        iterations=args.iterations,
        min_ncc=args.min_ncc,
        max_residual_um=args.max_residual_um,
    )
    start = time.perf_counter()
    qc = register_to_grid(
        args.fixed,
        args.moving,
        grid,
        out / "transform",
        out / "qc.json",
        out / "qc.png",
        params,
        names=(fixed_id, moving_id),
        slide_mpps=(args.fixed_mpp, args.moving_mpp),
        on_failure=args.on_failure,
    )
    log.info(
        "%s → %s: %s, median NCC %.3f → %.3f, median residual %.2f µm (%.1f s); transform, qc.json, qc.png in %s",
        moving_id,
        fixed_id,
        "passed" if qc["passed"] else "FAILED QC",
        qc["ncc_before_median"],
        qc["ncc_after_median"],
        qc["residual_um_median"],
        time.perf_counter() - start,
        out,
    )


def _embed(args: argparse.Namespace) -> None:
    from histodistill.embed import extract_embeddings
    from histodistill.export import export_h5, export_plismbench

    start = time.perf_counter()
    n = extract_embeddings(
        args.model,
        args.tiles,
        args.out,
        pooling=args.pooling,
        weights=args.weights,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
    )
    log.info("embedded %d tiles with %s in %.1f s → %s", n, args.model, time.perf_counter() - start, args.out)
    if args.export_plismbench:
        log.info(
            "plismbench features: %d slides → %s",
            len(export_plismbench(args.out, args.export_plismbench)),
            args.export_plismbench,
        )
    if args.export_h5:
        log.info("HDF5 features: %d slides → %s", len(export_h5(args.out, args.export_h5)), args.export_h5)


def _cache_teacher(args: argparse.Namespace) -> None:
    from histodistill.teacher_cache import cache_teacher

    n = cache_teacher(
        args.model,
        args.tiles,
        args.out,
        views=args.views,
        patch_tokens=args.patch_tokens,
        shard=args.shard,
        num_shards=args.num_shards,
        weights=args.weights,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
    )
    log.info("teacher cache: %d tiles × %d views → %s", n, args.views, args.out)


def _gather_teacher(args: argparse.Namespace) -> None:
    from histodistill.teacher_cache import gather_teacher_cache

    manifest = gather_teacher_cache(args.shards, args.out)
    log.info(
        "teacher cache %s: %d tiles in %d shards, %.1f KiB/tile on disk",
        args.out,
        manifest["n_tiles"],
        len(manifest["shards"]),
        manifest["bytes_per_tile_disk"] / 1024,
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="registry name (e.g. h_optimus_0, h0_mini_tiny) or student:<run>"
    )
    p.add_argument(
        "--weights", help="local weights (.safetensors, or a torch checkpoint); default: the hub id"
    )
    p.add_argument("--tiles", required=True, help="tile store (.zarr) from `histodistill pack`")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, …")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on GPU"
    )
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histodistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="write deterministic synthetic H&E slides and their sample sheet")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-slides", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohort", default="demo")
    p.add_argument("--width-px", type=int, default=4096)
    p.add_argument("--height-px", type=int, default=3072)
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of level 0")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "demo-teacher",
        help="train a tiny teacher on synthetic slides (generator ground truth, random stains and scanners)",
    )
    p.add_argument("--out", required=True, help="weights (.safetensors); the train log and plot go beside it")
    p.add_argument("--model", default="h_optimus_0_tiny", help="registry name of the (tiny) teacher")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=24, help="images per step (half as many crops)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-slides", type=int, default=2, help="training slides rendered (one more is held out)")
    p.add_argument("--width-px", type=int, default=4096, help="size of the rendered slides (as the demo's)")
    p.add_argument("--height-px", type=int, default=3072)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results are exact per count)")
    p.add_argument("--num-workers", type=int, default=1, help="processes rendering training crops")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo_teacher)

    p = sub.add_parser("tile", help="tissue mask + tile grid of one slide → tile table (Parquet) [+ QC PNG]")
    p.add_argument("slide", help="slide file (any format OpenSlide reads)")
    p.add_argument("--out", required=True, help="tile table (.parquet)")
    p.add_argument("--slide-id", help="id stored in the table (default: the file name without extension)")
    p.add_argument("--mpp", type=float, default=0.5, help="target µm/px of the tiles")
    p.add_argument("--tile-px", type=int, default=224, help="tile side in px at the target µm/px")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="drop tiles with less tissue than this fraction"
    )
    p.add_argument("--mask-mpp", type=float, default=8.0, help="µm/px of the tissue-mask thumbnail")
    p.add_argument("--slide-mpp", type=float, help="override the slide's own µm/px (level 0)")
    p.add_argument("--on-no-tissue", choices=["warn", "error"], default="warn")
    p.add_argument("--qc", help="write a QC PNG (thumbnail, tissue mask, tile grid) here")
    p.set_defaults(func=_tile)

    p = sub.add_parser("pack", help="read the tiles of tile tables into one Zarr tile store")
    p.add_argument("tables", nargs="+", help="tile tables (.parquet) from `histodistill tile`")
    p.add_argument("--out", required=True, help="tile store (.zarr)")
    p.add_argument("--chunk-tiles", type=int, default=64, help="tiles per shard")
    p.set_defaults(func=_pack)

    p = sub.add_parser(
        "register", help="register MOVING to FIXED with elastix (affine → B-spline) and QC it on tile windows"
    )
    p.add_argument("fixed", help="reference slide")
    p.add_argument("moving", help="slide to align to the reference")
    p.add_argument("--out", required=True, help="directory: transform/ (elastix maps), qc.json, qc.png")
    p.add_argument("--grid", help="tile table of FIXED for QC (default: plan one at --tile-mpp/--tile-px)")
    p.add_argument("--tile-mpp", type=float, default=0.5)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--fine-mpp", type=float, default=2.0, help="µm/px elastix works at")
    p.add_argument("--grid-spacing-um", type=float, default=150.0, help="B-spline control point spacing")
    p.add_argument("--iterations", type=int, default=500, help="per pyramid level")
    p.add_argument("--min-ncc", type=float, default=0.5, help="QC threshold: median NCC after")
    p.add_argument("--max-residual-um", type=float, default=4.0, help="QC threshold: median residual")
    p.add_argument("--fixed-mpp", type=float, help="override FIXED's µm/px")
    p.add_argument("--moving-mpp", type=float, help="override MOVING's µm/px")
    p.add_argument("--on-failure", choices=["error", "exclude"], default="error")
    p.set_defaults(func=_register)

    p = sub.add_parser("embed", help="embed every tile of a tile store with a registered model → Zarr [N, D]")
    _add_model_args(p)
    p.add_argument("--pooling", choices=["cls", "cls_mean", "patch_tokens"], help="default: the model's own")
    p.add_argument("--out", required=True, help="embedding store (.zarr); resumes OUT.partial after a kill")
    p.add_argument(
        "--export-plismbench", help="also write {slide}/features.npy ([level, x, y, features…]) here"
    )
    p.add_argument("--export-h5", help="also write TRIDENT/CLAM-style {slide}.h5 (features, coords) here")
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "cache-teacher", help="run the teacher once per tile and view → teacher cache (one shard)"
    )
    _add_model_args(p)
    p.add_argument("--views", type=int, default=2, help="augmented global views per tile")
    p.add_argument("--patch-tokens", choices=["full", "pool2", "none"], default="full")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--out", required=True, help="cache store (.zarr) of this shard")
    p.set_defaults(func=_cache_teacher)

    p = sub.add_parser("gather-teacher", help="write the manifest that joins teacher cache shards")
    p.add_argument("shards", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_gather_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    try:
        args.func(args)
    except HistodistillError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
