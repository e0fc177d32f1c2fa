"""`histodistill <stage> …`: every pipeline stage without Snakemake (the rules call the same functions).

Option defaults are the library's: a settings dataclass field (`TilingConfig().mpp`) or a function's
parameter default (`pack_tiles`' chunk_tiles). The stages that need torch (embed, cache-teacher) leave an
option unset when it is not given, so the function's own default applies without importing torch for --help.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any

from histodistill.demo.slides import DemoSlideConfig, make_demo_cohort
from histodistill.errors import HistodistillError
from histodistill.ids import check_id, id_from_path
from histodistill.logs import stderr_handler
from histodistill.registration import RegistrationConfig, register_to_grid
from histodistill.tilestore import pack_tiles
from histodistill.tiling import TilingConfig
from histodistill.tissue import TISSUE_METHODS

log = logging.getLogger("histodistill")
LIBRARY_DEFAULT = "default: the library's"  # help text of an option left to the function's own default


def param_default(func, name: str) -> Any:
    """The default of parameter `name` of `func` (ValueError if it has none)."""
    default = inspect.signature(func).parameters[name].default
    if default is inspect.Parameter.empty:
        raise ValueError(f"{func.__qualname__}() has no default for {name!r}")
    return default


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among `names` that were given (not None): the others keep the library's defaults."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _demo(args: argparse.Namespace) -> None:
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
    from histodistill.tiling import tile_slide

    params = TilingConfig(
        mpp=args.mpp,
        tile_px=args.tile_px,
        min_tissue=args.min_tissue,
        mask_mpp=args.mask_mpp,
        tissue_method=args.tissue_method,
        tissue_weights=args.tissue_weights,
        on_no_tissue=args.on_no_tissue,
    )
    slide_id = check_id(args.slide_id, "--slide-id") if args.slide_id else id_from_path(args.slide)
    start = time.perf_counter()
    table = tile_slide(args.slide, slide_id, args.out, params, slide_mpp=args.slide_mpp, qc=args.qc)
    log.info("%s: %d tiles → %s (%.1f s)", slide_id, len(table), args.out, time.perf_counter() - start)


def _pack(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    n = pack_tiles(args.tables, args.out, chunk_tiles=args.chunk_tiles, workers=args.workers)
    elapsed = time.perf_counter() - start
    log.info("packed %d tiles → %s (%.1f s, %.0f tiles/s)", n, args.out, elapsed, n / max(elapsed, 1e-9))


def _register(args: argparse.Namespace) -> None:
    from histodistill.tiling import tile_slide

    out = Path(args.out)
    fixed_id, moving_id = id_from_path(args.fixed), id_from_path(args.moving)
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
    if "error" in qc:
        log.warning("%s → %s: left out (%s); qc.json, qc.png in %s", moving_id, fixed_id, qc["error"], out)
        return
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
        **_given(args, *_MODEL_OPTIONS),
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
    from histodistill.augment import AugmentConfig
    from histodistill.teacher_cache import cache_teacher

    augment = {"augment": AugmentConfig(hed_jitter=args.hed_jitter)} if args.hed_jitter is not None else {}
    n = cache_teacher(
        args.model,
        args.tiles,
        args.out,
        weights=args.weights,
        **_given(args, "views", "patch_tokens", "shard", "num_shards", *_MODEL_OPTIONS),
        **augment,
    )
    log.info("teacher cache: %d tiles → %s", n, args.out)


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


def _train_heads(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from histodistill.distill.teacher_heads import HeadsConfig, train_teacher_heads

    cfg = HeadsConfig(**_given(args, *(f.name for f in fields(HeadsConfig))))
    summary = train_teacher_heads(
        args.cache, args.out, cfg, teacher=args.teacher, log_dir=args.log_dir, device=args.device or "auto"
    )
    log.info(
        "teacher heads → %s: effective prototypes DINO %.1f, iBOT %.1f of %d",
        args.out,
        summary["eval_dino_eff_prototypes"],
        summary["eval_ibot_eff_prototypes"],
        cfg.n_prototypes,
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="registry name (e.g. h_optimus_0, phikon_tiny) or student:<run> (--weights: its checkpoint)",
    )
    p.add_argument(
        "--weights", help="local weights (.safetensors, or a torch checkpoint); default: the hub id"
    )
    p.add_argument("--tiles", required=True, help="tile store (.zarr) from `histodistill pack`")
    p.add_argument("--batch-size", type=int, help=LIBRARY_DEFAULT)
    p.add_argument("--num-workers", type=int, help=f"DataLoader worker processes ({LIBRARY_DEFAULT})")
    p.add_argument(
        "--device", help=f"auto (GPU when present), cpu, cuda, cuda:1, … ({LIBRARY_DEFAULT}: auto)"
    )
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], help=f"auto: bf16 on GPU ({LIBRARY_DEFAULT})"
    )
    p.add_argument("--seed", type=int, help=LIBRARY_DEFAULT)


_MODEL_OPTIONS = ("batch_size", "num_workers", "device", "precision", "seed")  # from _add_model_args
# histodistill.distill.teacher_heads.HeadsConfig's fields and types (an option per field; a test checks they
# agree, so --help needs no torch import)
_HEADS_OPTIONS: dict[str, type] = {
    "n_prototypes": int,
    "dino_bottleneck": int,
    "ibot_bottleneck": int,
    "head_hidden": int,
    "iterations": int,
    "batch_size": int,
    "ibot_patches": int,
    "head_precision": str,
    "read_windows": int,
    "lr": float,
    "min_lr": float,
    "warmup_iters": int,
    "weight_decay": float,
    "weight_decay_end": float,
    "student_temp": float,
    "teacher_temp": float,
    "warmup_teacher_temp": float,
    "warmup_teacher_temp_iters": int,
    "centering": str,
    "center_momentum": float,
    "ema_momentum": float,
    "clip_grad": float,
    "eval_batches": int,
    "collapse_floor": float,
    "collapse_patience": int,
    "collapse_entropy_ceiling": float,
    "seed": int,
    "num_workers": int,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histodistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="write deterministic synthetic H&E slides and their sample sheet")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-slides", type=int, default=param_default(make_demo_cohort, "n_slides"))
    p.add_argument("--seed", type=int, default=param_default(make_demo_cohort, "seed"))
    p.add_argument("--cohort", default=param_default(make_demo_cohort, "cohort"))
    p.add_argument("--width-px", type=int, default=DemoSlideConfig().width_px)
    p.add_argument("--height-px", type=int, default=DemoSlideConfig().height_px)
    p.add_argument("--mpp", type=float, default=DemoSlideConfig().mpp, help="µm/px of level 0")
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
    p.add_argument(
        "--slide-id",
        help="id stored in the table (default: the file name without extension and .ome); ASCII letters, "
        "digits, '_', '-' and single '.' (histodistill.ids)",
    )
    tiling = TilingConfig()
    p.add_argument("--mpp", type=float, default=tiling.mpp, help="target µm/px of the tiles")
    p.add_argument("--tile-px", type=int, default=tiling.tile_px, help="tile side in px at the target µm/px")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=tiling.min_tissue,
        help="drop tiles with less tissue than this fraction",
    )
    p.add_argument(
        "--mask-mpp", type=float, default=tiling.mask_mpp, help="µm/px of the tissue-mask thumbnail"
    )
    p.add_argument("--slide-mpp", type=float, help="override the slide's own µm/px (level 0)")
    p.add_argument(
        "--tissue-method",
        choices=list(TISSUE_METHODS),
        default=tiling.tissue_method,
        help="tissue mask: classical cues, or a learned TorchScript segmenter (--tissue-weights)",
    )
    p.add_argument(
        "--tissue-weights", default=tiling.tissue_weights, help="local TorchScript tissue segmenter"
    )
    p.add_argument("--on-no-tissue", choices=["warn", "error"], default=tiling.on_no_tissue)
    p.add_argument("--qc", help="write a QC PNG (thumbnail, tissue mask, tile grid) here")
    p.set_defaults(func=_tile)

    p = sub.add_parser("pack", help="read the tiles of tile tables into one Zarr tile store")
    p.add_argument("tables", nargs="+", help="tile tables (.parquet) from `histodistill tile`")
    p.add_argument("--out", required=True, help="tile store (.zarr)")
    p.add_argument(
        "--chunk-tiles", type=int, default=param_default(pack_tiles, "chunk_tiles"), help="tiles per shard"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=param_default(pack_tiles, "workers"),
        help="reader threads (the store is the same for any number)",
    )
    p.set_defaults(func=_pack)

    p = sub.add_parser(
        "register", help="register MOVING to FIXED with elastix (affine → B-spline) and QC it on tile windows"
    )
    p.add_argument("fixed", help="reference slide")
    p.add_argument("moving", help="slide to align to the reference")
    p.add_argument("--out", required=True, help="directory: transform/ (elastix maps), qc.json, qc.png")
    p.add_argument("--grid", help="tile table of FIXED for QC (default: plan one at --tile-mpp/--tile-px)")
    registration = RegistrationConfig()
    p.add_argument("--tile-mpp", type=float, default=tiling.mpp)
    p.add_argument("--tile-px", type=int, default=tiling.tile_px)
    p.add_argument("--fine-mpp", type=float, default=registration.fine_mpp, help="µm/px elastix works at")
    p.add_argument(
        "--grid-spacing-um",
        type=float,
        default=registration.grid_spacing_um,
        help="B-spline control point spacing",
    )
    p.add_argument("--iterations", type=int, default=registration.iterations, help="per pyramid level")
    p.add_argument(
        "--min-ncc", type=float, default=registration.min_ncc, help="QC threshold: median NCC after"
    )
    p.add_argument(
        "--max-residual-um",
        type=float,
        default=registration.max_residual_um,
        help="QC threshold: median residual",
    )
    p.add_argument("--fixed-mpp", type=float, help="override FIXED's µm/px")
    p.add_argument("--moving-mpp", type=float, help="override MOVING's µm/px")
    p.add_argument(
        "--on-failure", choices=["error", "exclude"], default=param_default(register_to_grid, "on_failure")
    )
    p.set_defaults(func=_register)

    p = sub.add_parser("embed", help="embed every tile of a tile store with a registered model → Zarr [N, D]")
    _add_model_args(p)
    p.add_argument(
        "--pooling",
        choices=["cls", "cls_mean", "patch_tokens", "pooled"],  # models/encoders.py POOLINGS
        help="default: the model's own (pooled: its own projected embedding, e.g. CONCH, PLIP)",
    )
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
    p.add_argument("--views", type=int, help=f"augmented global views per tile ({LIBRARY_DEFAULT})")
    p.add_argument(
        "--hed-jitter",
        type=float,
        help=f"HED stain jitter of every view, ± this (0.05: HED-light; {LIBRARY_DEFAULT}: off)",
    )
    p.add_argument("--patch-tokens", choices=["full", "pool2", "none"], help=LIBRARY_DEFAULT)
    p.add_argument("--shard", type=int, help=LIBRARY_DEFAULT)
    p.add_argument("--num-shards", type=int, help=LIBRARY_DEFAULT)
    p.add_argument("--out", required=True, help="cache store (.zarr) of this shard")
    p.set_defaults(func=_cache_teacher)

    p = sub.add_parser(
        "train-heads",
        help="learn DINO/iBOT heads on a teacher's cached tokens (for teachers released without them)",
    )
    p.add_argument("--teacher", required=True, help="registry name of the teacher the cache must hold")
    p.add_argument("--cache", required=True, help="teacher cache (.zarr) from cache-teacher/gather-teacher")
    p.add_argument(
        "--out", required=True, help="heads file (.safetensors) that distill loads (teacher_heads)"
    )
    p.add_argument(
        "--log-dir", help="train_log.parquet, loss.png, summary.json (default: OUT without suffix)"
    )
    p.add_argument("--device", help=f"auto, cpu, cuda, … ({LIBRARY_DEFAULT}: auto)")
    for name, kind in _HEADS_OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=LIBRARY_DEFAULT)
    p.set_defaults(func=_train_heads)

    p = sub.add_parser("gather-teacher", help="write the manifest that joins teacher cache shards")
    p.add_argument("shards", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_gather_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[stderr_handler()])
    try:
        args.func(args)
    except HistodistillError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
