"""Embedding extraction: any registered model over a tile store → Zarr [N, D] (or [N, P, D]), resumable.

Streaming: a DataLoader (workers, pinned memory on GPU) feeds `inference_mode` forward passes (bf16 autocast
on GPU); results are written chunk by chunk into `OUT.partial`, whose attrs record how many rows are done.
A killed run resumes from the last complete chunk when rerun with the same settings; the finished store
is renamed to OUT, so OUT is never partial.

Throughput: the finished store's attrs hold `tiles_per_s` of this run, `throughput_device`, and
`throughput_conditions`, the load it was measured under (the machine's 1-minute load average, the larger of
its values before and after the timed loop; the CPUs this process may use; torch threads; DataLoader
workers; batch size; tiles timed). The report shows them beside the number: a speed measured on a shared,
busy machine (load above the CPUs) is not a property of the model.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Subset

from histodistill.devices import autocast_dtype, pick_device
from histodistill.errors import HistodistillError
from histodistill.models import encode, load_model
from histodistill.models.transforms import ModelTransform
from histodistill.provenance import provenance
from histodistill.resumable import ResumableStore
from histodistill.tilestore import INDEX_COLUMNS, TileStore, TileStoreDataset

log = logging.getLogger(__name__)


def extract_embeddings(
    model_name: str,
    store_path: str | Path,
    out: str | Path,
    pooling: str | None = None,
    weights: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "auto",
    chunk_batches: int = 8,
    seed: int = 0,
    random_init: bool = False,
) -> int:
    """Embed every tile of `store_path` with `model_name` into `out`; returns the number of rows.

    `model_name`: a registry name or `student:<run>` (then `weights` is its checkpoint). The store holds
    `embeddings` float32 [N, D'] (D' = the pooling's width, `ModelSpec.pooled_dim`) or [N, P, D] for
    `patch_tokens`, in tile-store row order, plus the store's index columns.
    """
    out = Path(out)
    loaded = load_model(model_name, weights, seed=seed, random_init=random_init)
    spec = loaded.spec
    pooling = pooling or spec.default_pooling
    dev = pick_device(device)
    amp = autocast_dtype(dev, precision, spec.precision)
    store = TileStore(store_path)
    n = len(store)
    chunk_rows = batch_size * chunk_batches
    n_patches = (spec.transform.size // spec.patch_size) ** 2
    shape = (n, n_patches, spec.embed_dim) if pooling == "patch_tokens" else (n, spec.pooled_dim(pooling))
    params = {
        "model": model_name,
        "weights_digest": loaded.weights_digest,
        "pooling": pooling,
        "precision": precision,
        "batch_size": batch_size,
        "chunk_rows": chunk_rows,
        "tile_store": store.attrs["provenance"]["config_hash"],
    }
    meta = provenance(
        params,
        model_id=model_name,
        arch=spec.arch,
        hub_id=spec.hub_id,
        weights=loaded.weights,
        weights_digest=loaded.weights_digest,
        pooling=pooling,
        transform=spec.to_json()["transform"],
        num_prefix_tokens=spec.num_prefix_tokens,
        device=str(dev),
        autocast=str(amp),
        tile_store=str(store_path),
        slides=store.attrs["slides"],
        tile_px=store.attrs["tile_px"],
        mpp=store.attrs["mpp"],
    )

    def create(group):
        group.create_array("embeddings", shape=shape, chunks=(chunk_rows, *shape[1:]), dtype="float32")
        for name in INDEX_COLUMNS:
            group.create_array(name, data=store.root[name][:])

    output = ResumableStore(out, meta, create)
    start = output.rows_done

    model = loaded.model.to(dev)
    dataset = TileStoreDataset(store_path, transform=ModelTransform(spec.transform))
    loader = DataLoader(
        Subset(dataset, range(start, n)),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        shuffle=False,
    )
    buffer: list[np.ndarray] = []
    load_before = _load_1min()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                pooled = encode(model, images.to(dev, non_blocking=True), spec.num_prefix_tokens, pooling)
            buffer.append(pooled.float().cpu().numpy())
            if sum(len(b) for b in buffer) >= chunk_rows:
                written = output.write({"embeddings": np.concatenate(buffer)})
                buffer.clear()
                rate = (written - start) / (time.perf_counter() - t0)
                log.info("%s: %d/%d tiles (%.1f tiles/s)", model_name, written, n, rate)
    if buffer:
        output.write({"embeddings": np.concatenate(buffer)})
    if output.rows_done != n:
        raise HistodistillError(f"embedding {store_path}: wrote {output.rows_done} of {n} rows")
    elapsed = time.perf_counter() - t0
    # Throughput of this run (the report's "measured speed"); a resumed run measures its own part only.
    rate = (n - start) / elapsed if elapsed > 0 and n > start else None
    conditions = {
        "load_1min": max((v for v in (load_before, _load_1min()) if v is not None), default=None),
        "cpus": _cpus(),
        "torch_threads": torch.get_num_threads(),
        "num_workers": num_workers,
        "batch_size": batch_size,
        "tiles_timed": n - start,
    }
    output.finish(tiles_per_s=rate, throughput_device=str(dev), throughput_conditions=conditions)
    log.info("%s: %d embeddings of shape %s → %s", model_name, n, shape[1:], out)
    return n


def _load_1min() -> float | None:
    """The machine's 1-minute load average (runnable processes, this one included); None where the OS has
    none (os.getloadavg is Unix-only)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class EmbeddingStore:
    """Read access to a finished embedding store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise HistodistillError(f"not an embedding store: {self.path}")
        self.root = zarr.open_group(self.path, mode="r")
        if not self.root.attrs.get("complete"):
            raise HistodistillError(f"{self.path} is incomplete; rerun the extraction to resume it")
        self.attrs = dict(self.root.attrs)

    @property
    def embeddings(self) -> np.ndarray:
        return self.root["embeddings"][:]

    def index(self) -> dict[str, np.ndarray]:
        return {name: self.root[name][:] for name in INDEX_COLUMNS}
