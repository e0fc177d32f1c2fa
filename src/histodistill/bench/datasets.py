"""Benchmark datasets as tile stores, so the one `embed` rule embeds them like any cohort.

- HEST: a task's patch files (`patches/*.h5`, `img` [N, 224, 224, 3]) → one tile store per task, one "slide"
  per sample, rows in patch-file order (the order `bench.hest.load_task` aligns expression to); patches of
  any mode (grey, RGBA, 16-bit) are converted to uint8 RGB by `histodistill.images.as_rgb8`.
- Demo patch classification: labels for the demo cohort's tiles from what the synthetic tissue shows
  (nuclear density terciles), split by slide, as the manifest `bench.probe.load_manifest` reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import zarr

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.hest import load_task
from histodistill.images import ImageReadError, as_rgb8, read_image_rgb
from histodistill.provenance import provenance
from histodistill.tilestore import create_tiles_array, write_index

log = logging.getLogger(__name__)

HEST_PATCH_MPP = 0.5  # HEST-Benchmark patches: 224 px at 20× (0.5 µm/px)


def pack_hest_task(task_dir: str | Path, out: str | Path, chunk_tiles: int = 64) -> int:
    """Write every sample's patches of one HEST task into a tile store; returns the number of patches."""
    task = load_task(task_dir)
    samples = list(task.samples.values())
    sizes = []
    for sample in samples:
        with h5py.File(sample.patches_path, "r") as f:
            shape = f["img"].shape
        if len(shape) not in (3, 4) or shape[1] != shape[2] or (len(shape) == 4 and shape[3] > 4):
            raise BenchmarkError(
                f"HEST {task.name}/{sample.sample_id} ({sample.patches_path}): img is {shape}, expected "
                "[N, H, H] (grey) or [N, H, H, C] with C = 1, 2 (grey + alpha), 3 (RGB) or 4 (RGBA)"
            )
        sizes.append(shape)
    if len({s[1] for s in sizes}) != 1:
        raise BenchmarkError(
            f"HEST {task.name}: samples have different patch sizes {sorted({s[1] for s in sizes})}"
        )
    tile_px, total = int(sizes[0][1]), sum(s[0] for s in sizes)
    with atomic_path(out) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        tiles = create_tiles_array(root, (total,), tile_px, chunk_tiles)
        write_index(
            root,
            {
                "slide_index": np.concatenate([np.full(s[0], i, np.int32) for i, s in enumerate(sizes)]),
                "tile_id": np.concatenate([np.arange(s[0], dtype=np.int64) for s in sizes]),
                "x0": np.concatenate([np.asarray(x.coords)[:, 0].astype(np.int64) for x in samples]),
                "y0": np.concatenate([np.asarray(x.coords)[:, 1].astype(np.int64) for x in samples]),
                "level": np.zeros(total, np.int32),
                "tissue_frac": np.full(total, np.nan, np.float32),
            },
        )
        start = 0
        for sample, shape in zip(samples, sizes, strict=True):
            with h5py.File(sample.patches_path, "r") as f:
                for lo in range(0, shape[0], chunk_tiles):
                    hi = min(shape[0], lo + chunk_tiles)
                    tiles[start + lo : start + hi] = as_rgb8(
                        f["img"][lo:hi], str(sample.patches_path), has_channels=len(shape) == 4
                    )
            start += shape[0]
        root.attrs.update(
            {
                "tile_px": tile_px,
                "mpp": HEST_PATCH_MPP,
                "n_tiles": total,
                "slides": [
                    {
                        "slide_id": s.sample_id,
                        "path": str(s.patches_path),
                        "slide_mpp": None,
                        "mpp_source": "HEST",
                        "n_tiles": int(n[0]),
                    }
                    for s, n in zip(samples, sizes, strict=True)
                ],
                "hest_task": task.name,
                "provenance": provenance(
                    {"task": task.name, "chunk_tiles": chunk_tiles}, task_dir=str(task_dir)
                ),
            }
        )
    log.info("HEST task %s: %d patches of %d samples → %s", task.name, total, len(samples), out)
    return total


def embeddings_by_sample(embeddings: np.ndarray, slide_index: np.ndarray, sample_ids: list[str]) -> dict:
    """Split an embedding store's rows (in tile-store order) back into one array per HEST sample."""
    return {sid: embeddings[slide_index == i] for i, sid in enumerate(sample_ids)}


IMAGE_MANIFEST_COLUMNS = ("path", "label", "split")


def pack_image_dataset(
    manifest: str | Path,
    out_store: str | Path,
    out_manifest: str | Path,
    tile_px: int = 224,
    chunk_tiles: int = 64,
) -> int:
    """Image files listed in a manifest (CSV: path, label, split[, slide_id]) → a tile store + a row manifest.

    Each image is resized so its shorter side is `tile_px`, then centre-cropped to `tile_px` (the patch
    datasets of EVA, e.g. BACH, CRC, MHIST, PCam, are single images at the dataset's own resolution). Relative
    paths are taken relative to the manifest. The row manifest (tile_index, label, split[, slide_id]) is what
    `bench.probe.load_manifest` reads. Images of any mode are read by `histodistill.images.read_image_rgb` (grey
    and palette expanded, alpha composited on white, 16-bit scaled to 8-bit). A missing or unreadable image is
    an error naming its line and file.
    """
    from PIL import Image

    manifest = Path(manifest)
    if not manifest.is_file():
        raise BenchmarkError(f"image manifest {manifest} does not exist")
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in IMAGE_MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise BenchmarkError(
            f"image manifest {manifest} lacks column(s) {missing} (needs path, label, split[, slide_id])"
        )
    paths = [Path(p) if Path(p).is_absolute() else manifest.parent / p for p in frame["path"]]
    absent = [f"line {i + 2}: {p}" for i, p in enumerate(paths) if not p.is_file()]
    if absent:
        raise BenchmarkError(
            f"image manifest {manifest}: missing image(s) {absent[:5]} ({len(absent)} in all)"
        )
    slide_ids = frame["slide_id"].tolist() if "slide_id" in frame.columns else ["images"] * len(frame)
    slides = list(dict.fromkeys(slide_ids))
    slide_index = np.array([slides.index(s) for s in slide_ids], np.int32)
    n = len(frame)
    with atomic_path(out_store) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        tiles = create_tiles_array(root, (n,), tile_px, chunk_tiles)
        write_index(
            root,
            {
                "slide_index": slide_index,
                "tile_id": np.arange(n, dtype=np.int64),
                "x0": np.zeros(n, np.int64),
                "y0": np.zeros(n, np.int64),
                "level": np.zeros(n, np.int32),
                "tissue_frac": np.full(n, np.nan, np.float32),
            },
        )
        buffer = np.empty((chunk_tiles, tile_px, tile_px, 3), np.uint8)
        for start in range(0, n, chunk_tiles):
            stop = min(n, start + chunk_tiles)
            for k, i in enumerate(range(start, stop)):
                try:
                    buffer[k] = _square(Image.fromarray(read_image_rgb(paths[i])), tile_px)
                except ImageReadError as exc:
                    raise BenchmarkError(f"image manifest {manifest}, line {i + 2}: {exc}") from exc
            tiles[start:stop] = buffer[: stop - start]
        root.attrs.update(
            {
                "tile_px": tile_px,
                "mpp": None,
                "n_tiles": n,
                "slides": [
                    {"slide_id": s, "path": str(manifest), "slide_mpp": None, "mpp_source": "images"}
                    for s in slides
                ],
                "provenance": provenance(
                    {"manifest": str(manifest), "tile_px": tile_px, "chunk_tiles": chunk_tiles}
                ),
            }
        )
    rows = pd.DataFrame({"tile_index": np.arange(n), "label": frame["label"], "split": frame["split"]})
    if "slide_id" in frame.columns:
        rows["slide_id"] = frame["slide_id"]
    with atomic_path(out_manifest) as tmp:
        rows.to_csv(tmp, index=False)
    log.info("%d images of %s → %s", n, manifest, out_store)
    return n


def _square(image, side: int) -> np.ndarray:
    """Resize so the shorter side is `side`, then centre-crop to side × side."""
    from PIL import Image

    w, h = image.size
    scale = side / min(w, h)
    image = image.resize(
        (max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BILINEAR
    )
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)))
