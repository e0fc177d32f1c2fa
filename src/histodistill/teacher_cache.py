"""Teacher feature cache: the teacher runs once per tile and view; students are distilled from the cache.

For each tile of a tile store and each of V views, the cache holds the view's parameters (`augment.py`,
so the student rebuilds exactly that image), a digest of the rendered view, the teacher's CLS token and its
patch tokens after the final norm (fp16; `patch_tokens: full | pool2 | none`, pool2 = 2×2-averaged patch grid, 4× smaller).

Sharding: shard k of S covers tile rows [k·N/S, (k+1)·N/S) and is its own resumable store (one GPU job
each); `gather_teacher_cache` writes a small manifest store that `TeacherCache` reads as one cohort.

Layout (cache format 3, `CACHE_FORMAT`, recorded as attrs `cache_format` in every shard and manifest): each
per-tile array (`params` [N, V, F] float64, `view_digest` [N, V] int64, `cls` [N, V, D] fp16, `patch`
[N, V, T, D] fp16) is a sharded Zarr v3 array with ONE TILE (all its views) PER INNER CHUNK, uncompressed,
and `batch_size · chunk_batches` tiles per shard file (the tile store's scheme, `tilestore.py`). A random
row therefore costs one read of that row's bytes, not the decompression of a 256-row chunk (format 1, whose
`patch` chunks held a whole caching batch: ~96 MiB decompressed per row at the paper's shapes; format 2 had
16 view fields, format 3 adds the HED jitter's 7, `augment.VIEW_FIELDS`). The fp16
tokens are stored uncompressed: zstd saves ~8% on them and costs more than the read (benchmarks/cache_read.py).
`TeacherCache.get` reads rows straight from the shard files (`ShardRowReader`: the shard index entry, then the
row's bytes, as the Zarr v3 sharding spec lays them out; `shards.py`) and only the arrays asked for. A cache of another
format raises a HistodistillError that says to rebuild it.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader

from histodistill.atomic import atomic_path
from histodistill.augment import (
    VIEW_FIELDS,
    AugmentConfig,
    draw_views,
    global_kinds,
    normalize,
    render,
    view_digest,
)
from histodistill.devices import autocast_dtype, pick_device
from histodistill.errors import HistodistillError
from histodistill.models import load_model
from histodistill.provenance import provenance
from histodistill.resumable import ResumableStore
from histodistill.shards import ShardRowReader
from histodistill.tilestore import ProcessLocal, TileStore

log = logging.getLogger(__name__)
PATCH_MODES = ("full", "pool2", "none")
# 1: `patch` chunked by caching batch (no `cache_format` attr); 2: one tile per inner chunk; 3: view parameters
# gained the HED jitter's 7 fields (augment.VIEW_FIELDS: 23, not 16)
CACHE_FORMAT = 3
ROW_ARRAYS = ("params", "view_digest", "cls", "patch")
REBUILD_HINT = (
    "rebuild it: delete it and its shards and rerun `snakemake … cache_teacher` (rules/teacher.smk), or "
    "`histodistill cache-teacher` per shard then `histodistill gather-teacher`"
)


def check_cache_format(attrs: dict, path: str | Path) -> None:
    """HistodistillError unless `attrs` (a shard's or manifest's) record cache format `CACHE_FORMAT`."""
    found = attrs.get("cache_format", 1)
    if found != CACHE_FORMAT:
        raise HistodistillError(
            f"teacher cache {path} has cache format {found}; this version of histodistill reads format "
            f"{CACHE_FORMAT} (one tile per inner chunk, 23 view fields; docs/architecture.md): {REBUILD_HINT}"
        )


def create_row_array(group, name: str, shape: tuple[int, ...], dtype: str, rows_per_shard: int):
    """A per-tile array [N, …]: one row per inner chunk (uncompressed), `rows_per_shard` rows per shard file."""
    n = shape[0]
    return group.create_array(
        name,
        shape=shape,
        chunks=(1, *shape[1:]),
        shards=(max(1, min(rows_per_shard, n or 1)), *shape[1:]),
        dtype=dtype,
        compressors=None,
    )


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    if not 0 <= shard < num_shards:
        raise HistodistillError(f"shard {shard} is not in 0…{num_shards - 1}")
    return n * shard // num_shards, n * (shard + 1) // num_shards


class ViewDataset:
    """Tile rows [lo, hi) → (normalised views [V, 3, S, S], view params [V, F], view digests [V], row)."""

    def __init__(self, store_path, lo, hi, n_views, seed, mean, std, cfg: AugmentConfig = AugmentConfig()):
        self.store_path, self.lo, self.hi = Path(store_path), lo, hi
        self.kinds, self.seed, self.mean, self.std, self.cfg = global_kinds(n_views), seed, mean, std, cfg
        index = TileStore(store_path)
        self.slide_ids = [s["slide_id"] for s in index.attrs["slides"]]
        self.slide_index = index.root["slide_index"][lo:hi]
        self.tile_id = index.root["tile_id"][lo:hi]
        self._store = ProcessLocal(partial(TileStore, self.store_path))

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int):
        tile = self._store.get()[self.lo + i]
        slide_id = self.slide_ids[int(self.slide_index[i])]
        params = draw_views(self.seed, slide_id, int(self.tile_id[i]), self.kinds, tile.shape[:2], self.cfg)
        rendered = [render(tile, p, self.cfg) for p in params]
        digests = torch.tensor([view_digest(v) for v in rendered], dtype=torch.int64)
        views = torch.stack([normalize(v, self.mean, self.std) for v in rendered])
        return views, torch.from_numpy(params), digests, self.lo + i


def pool_patches(patches: torch.Tensor) -> torch.Tensor:
    """[B, g·g, D] → [B, (g/2)·(g/2), D], averaging 2×2 neighbours of the patch grid."""
    b, p, d = patches.shape
    g = int(round(p**0.5))
    grid = patches.reshape(b, g, g, d).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(b, -1, d)


def cache_teacher(
    model_name: str,
    store_path: str | Path,
    out: str | Path,
    views: int = 2,
    patch_tokens: str = "full",
    shard: int = 0,
    num_shards: int = 1,
    weights: str | Path | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "auto",
    chunk_batches: int = 4,
    seed: int = 0,
    augment: AugmentConfig = AugmentConfig(),
) -> int:
    """Fill one shard of the teacher cache; returns its number of tiles."""
    if patch_tokens not in PATCH_MODES:
        raise HistodistillError(f"patch_tokens must be one of {PATCH_MODES}, not '{patch_tokens}'")
    loaded = load_model(model_name, weights, seed=seed)
    spec = loaded.spec
    dev = pick_device(device)
    amp = autocast_dtype(dev, precision, spec.precision)
    store = TileStore(store_path)
    lo, hi = shard_range(len(store), shard, num_shards)
    n, d = hi - lo, spec.embed_dim
    grid = augment.global_px // spec.patch_size
    n_patch = {"full": grid * grid, "pool2": (grid // 2) ** 2, "none": 0}[patch_tokens]
    chunk_rows = batch_size * chunk_batches
    params = {
        "teacher": model_name,
        "weights_digest": loaded.weights_digest,
        "views": views,
        "patch_tokens": patch_tokens,
        "shard": shard,
        "num_shards": num_shards,
        "seed": seed,
        "precision": precision,
        "augment": augment.__dict__,
        "tile_store": store.attrs["provenance"]["config_hash"],
        "chunk_rows": chunk_rows,
        "cache_format": CACHE_FORMAT,
    }
    meta = provenance(
        params,
        model_id=model_name,
        arch=spec.arch,
        hub_id=spec.hub_id,
        weights=loaded.weights,
        weights_digest=loaded.weights_digest,
        view_fields=list(VIEW_FIELDS),
        rows=[lo, hi],
        tile_store=str(store_path),
        num_prefix_tokens=spec.num_prefix_tokens,
        embed_dim=d,
        patch_grid=grid,
        device=str(dev),
        autocast=str(amp),
        transform=spec.to_json()["transform"],
    )

    def create(group):  # one tile per inner chunk, one write block (chunk_rows tiles) per shard file
        create_row_array(group, "params", (n, views, len(VIEW_FIELDS)), "float64", chunk_rows)
        create_row_array(group, "view_digest", (n, views), "int64", chunk_rows)
        create_row_array(group, "cls", (n, views, d), "float16", chunk_rows)
        if n_patch:
            create_row_array(group, "patch", (n, views, n_patch, d), "float16", chunk_rows)
        group.create_array("tile_index", data=np.arange(lo, hi, dtype=np.int64))

    output = ResumableStore(out, meta, create)
    start = output.rows_done
    dataset = ViewDataset(
        store_path, lo + start, hi, views, seed, spec.transform.mean, spec.transform.std, augment
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda"
    )
    model = loaded.model.to(dev)
    pending: dict[str, list[np.ndarray]] = {"params": [], "view_digest": [], "cls": [], "patch": []}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, view_params, digests, _ in loader:
            b = images.shape[0]
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                tokens = model.forward_features(images.flatten(0, 1).to(dev, non_blocking=True)).float()
            pending["params"].append(view_params.numpy())
            pending["view_digest"].append(digests.numpy())
            pending["cls"].append(tokens[:, 0].reshape(b, views, d).half().cpu().numpy())
            if n_patch:
                patches = tokens[:, spec.num_prefix_tokens :]
                if patch_tokens == "pool2":
                    patches = pool_patches(patches)
                pending["patch"].append(patches.reshape(b, views, n_patch, d).half().cpu().numpy())
            if sum(len(x) for x in pending["cls"]) >= chunk_rows:
                done = output.write({k: np.concatenate(v) for k, v in pending.items() if v})
                for v in pending.values():
                    v.clear()
                log.info(
                    "%s shard %d: %d/%d tiles (%.1f tiles/s)",
                    model_name,
                    shard,
                    done,
                    n,
                    (done - start) / (time.perf_counter() - t0),
                )
    if pending["cls"]:
        output.write({k: np.concatenate(v) for k, v in pending.items() if v})
    raw = views * (d + n_patch * d) * 2 + views * (len(VIEW_FIELDS) + 1) * 8
    disk = sum(f.stat().st_size for f in output.partial.rglob("*") if f.is_file())
    output.finish(bytes_per_tile_raw=raw, bytes_per_tile_disk=disk / max(n, 1), cache_format=CACHE_FORMAT)
    log.info(
        "teacher cache shard %d: %d tiles, %.1f KiB/tile raw, %.1f KiB/tile on disk",
        shard,
        n,
        raw / 1024,
        disk / max(n, 1) / 1024,
    )
    return n


def gather_teacher_cache(shard_paths: list[str | Path], out: str | Path) -> dict:
    """Write the manifest of a sharded cache (the shards stay where they are, referenced relatively)."""
    out = Path(out)
    shards = []
    for p in shard_paths:
        root = zarr.open_group(p, mode="r")
        if not root.attrs.get("complete"):
            raise HistodistillError(f"teacher cache shard {p} is incomplete")
        check_cache_format(dict(root.attrs), p)
        shards.append((Path(p), dict(root.attrs)))
    shards.sort(key=lambda s: s[1]["provenance"]["rows"][0])
    rows = [s[1]["provenance"]["rows"] for s in shards]
    if rows[0][0] != 0 or any(a[1] != b[0] for a, b in zip(rows, rows[1:], strict=False)):
        raise HistodistillError(f"teacher cache shards do not tile the store: {rows}")
    first = shards[0][1]["provenance"]
    n = rows[-1][1]
    raw = shards[0][1]["bytes_per_tile_raw"]
    disk = sum(
        s[1]["bytes_per_tile_disk"] * (s[1]["provenance"]["rows"][1] - s[1]["provenance"]["rows"][0])
        for s in shards
    ) / max(n, 1)
    manifest = {
        "shards": [os.path.relpath(p.resolve(), out.resolve().parent) for p, _ in shards],
        "rows": rows,
        "n_tiles": n,
        "teacher": first["model_id"],
        "views": first["params"]["views"],
        "patch_tokens": first["params"]["patch_tokens"],
        "embed_dim": first["embed_dim"],
        "bytes_per_tile_raw": raw,
        "bytes_per_tile_disk": disk,
        "provenance": first,
        "cache_format": CACHE_FORMAT,
    }
    with atomic_path(out) as tmp:
        zarr.open_group(tmp, mode="w", zarr_format=3).attrs.update(manifest)
    return manifest


class TeacherCache:
    """One cohort's cache across its shards: rows are tile-store rows.

    HistodistillError for a path that is neither a manifest nor a complete shard, and for a cache of
    another format than `CACHE_FORMAT` (the message says how to rebuild it)."""

    def __init__(self, path: str | Path):
        """`path` is a manifest (from `gather_teacher_cache`) or a single shard store."""
        self.path = Path(path)
        root = zarr.open_group(self.path, mode="r")
        self.attrs = dict(root.attrs)
        if "shards" in self.attrs:
            check_cache_format(self.attrs, self.path)
            self.shards = [zarr.open_group(self.path.parent / s, mode="r") for s in self.attrs["shards"]]
            self.starts = np.array([r[0] for r in self.attrs["rows"]])
        elif self.attrs.get("complete") and "cls" in root:
            check_cache_format(self.attrs, self.path)
            lo, hi = self.attrs["provenance"]["rows"]
            self.shards, self.starts = [root], np.array([lo])
            self.attrs = {**self.attrs, "n_tiles": hi, "rows": [[lo, hi]]}
        else:
            raise HistodistillError(f"{self.path} is neither a teacher cache manifest nor a complete shard")
        self._readers: list[dict[str, ShardRowReader | None]] = [{} for _ in self.shards]

    def __len__(self) -> int:
        return int(self.attrs["n_tiles"])

    def _locate_shard(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise HistodistillError(f"row {row} is outside the cache's {len(self)} rows ({self.path})")
        k = int(np.searchsorted(self.starts, row, side="right") - 1)
        return k, row - int(self.starts[k])

    def get(self, row: int, fields: tuple[str, ...] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        """Of one tile-store row, the arrays named in `fields` that the cache holds: params [V, F] float64,
        view_digest [V] int64, cls [V, D] fp16, patch [V, T, D] fp16. Only those arrays are read (online
        distillation asks for `("params",)`). HistodistillError for a row outside the cache or an unknown
        field name."""
        unknown = set(fields) - set(ROW_ARRAYS)
        if unknown:
            raise HistodistillError(f"unknown teacher cache fields {sorted(unknown)}; known: {ROW_ARRAYS}")
        k, i = self._locate_shard(int(row))
        shard, readers = self.shards[k], self._readers[k]
        out = {}
        for f in fields:
            if f not in readers:  # None: an array this cache does not hold (patch with patch_tokens: none)
                readers[f] = ShardRowReader(shard[f]) if f in shard else None
            if readers[f] is not None:
                out[f] = readers[f][i]
        return out

    def read(self, lo: int, hi: int, fields: tuple[str, ...] = ("cls", "patch")) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of each array in `fields` (e.g. cls [n, V, D] fp16, patch [n, V, T, D] fp16), read
        as ranges across shards (`ShardRowReader.read`: one index read per shard file, one read per row).
        HistodistillError for a range outside the cache or a field it does not hold."""
        if not 0 <= lo <= hi <= len(self):
            raise HistodistillError(
                f"rows [{lo}, {hi}) are outside the cache's {len(self)} rows ({self.path})"
            )
        ends = [*self.starts[1:], len(self)]
        parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        for k, (shard, start, end) in enumerate(zip(self.shards, self.starts, ends, strict=True)):
            a, b = max(lo, int(start)), min(hi, int(end))
            if a >= b:
                continue
            for f in fields:
                if f not in self._readers[k]:
                    self._readers[k][f] = ShardRowReader(shard[f]) if f in shard else None
                reader = self._readers[k][f]
                if reader is None:
                    raise HistodistillError(f"teacher cache {self.path} holds no {f!r} array")
                parts[f].append(reader.read(a - int(start), b - int(start)))
        return {f: np.concatenate(v) if len(v) != 1 else v[0] for f, v in parts.items()}
