"""The tile store: a Zarr v3 group holding uint8 tiles [N, H, W, 3] and their index.

Layout: array `tiles` sharded by whole tiles (`chunk_tiles` tiles per shard file, one tile per inner
chunk, zstd-compressed), so both sequential streaming and random access by a DataLoader are cheap; index
arrays `slide_index`, `tile_id`, `x0`, `y0`, `level`, `tissue_frac`; attrs `slides` (id, path, µm/px and its
source), `tile_px`, `mpp` and provenance. Readers open the store lazily in each process: a handle is
never shared across DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

from histodistill.atomic import atomic_path
from histodistill.errors import SlideError
from histodistill.provenance import provenance
from histodistill.shards import ShardRowReader
from histodistill.slides import open_slide
from histodistill.tiling import iter_tile_pixels, read_tile, read_tile_table

INDEX_COLUMNS = ("slide_index", "tile_id", "x0", "y0", "level", "tissue_frac")


def create_tiles_array(root, lead: tuple[int, ...], tile_px: int, chunk_tiles: int, zstd_level: int = 3):
    """The `tiles` array: [N, H, W, 3], or [slide, tile, H, W, 3] for matched tiles (lead = (S, N)).

    One zstd-compressed tile per inner chunk, `chunk_tiles` tiles per shard file (per slide when 5-D).
    """
    inner = (1,) * len(lead)
    shard = (*inner[:-1], max(1, min(chunk_tiles, lead[-1] or 1)))
    names = ("slide", "tile") if len(lead) == 2 else ("tile",)
    return root.create_array(
        "tiles",
        shape=(*lead, tile_px, tile_px, 3),
        chunks=(*inner, tile_px, tile_px, 3),
        shards=(*shard, tile_px, tile_px, 3),
        dtype="uint8",
        compressors=ZstdCodec(level=zstd_level),
        dimension_names=(*names, "y", "x", "rgb"),
    )


def write_index(root, index: dict[str, np.ndarray]) -> None:
    """The flat per-tile index arrays (INDEX_COLUMNS) beside `tiles`."""
    missing = set(INDEX_COLUMNS) - set(index)
    if missing:
        raise ValueError(f"tile store index lacks {sorted(missing)}")
    for name in INDEX_COLUMNS:
        values = index[name]
        root.create_array(name, data=values, chunks=(max(1, min(len(values), 65536)),))


def pack_tiles(
    table_paths: Sequence[str | Path],
    out: str | Path,
    chunk_tiles: int = 64,
    zstd_level: int = 3,
    workers: int = 1,
) -> int:
    """Read the pixels of every tile in `table_paths` and write them to a new tile store at `out`.

    Streams slide by slide and shard by shard: memory holds one shard of tiles and the tiles in flight of
    `workers` reader threads (`histodistill.tiling.iter_tile_pixels`; the store is the same for every
    `workers`). Returns the number of tiles written.
    """
    tables = [read_tile_table(p) for p in table_paths]
    if not tables:
        raise SlideError("pack: no tile tables given")
    grids = [t.grid for t in tables]
    geometry = {(g.tile_px, g.mpp) for g in grids}
    if len(geometry) > 1:
        raise SlideError(
            f"pack: tile tables disagree on (tile_px, mpp): {sorted(geometry)}; retile them alike"
        )
    ((tile_px, mpp),) = geometry
    ids = [g.slide_id for g in grids]
    if len(set(ids)) != len(ids):
        raise SlideError(
            f"pack: the same slide appears twice: {sorted({i for i in ids if ids.count(i) > 1})}"
        )
    total = sum(len(t) for t, _ in tables)

    with atomic_path(out) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        tiles = create_tiles_array(root, (total,), tile_px, chunk_tiles, zstd_level)
        index = {
            "slide_index": np.concatenate([np.full(len(t), i, np.int32) for i, (t, _) in enumerate(tables)]),
            "tile_id": np.concatenate([t["tile_id"].to_numpy(np.int64) for t, _ in tables]),
            "x0": np.concatenate([t["x0"].to_numpy(np.int64) for t, _ in tables]),
            "y0": np.concatenate([t["y0"].to_numpy(np.int64) for t, _ in tables]),
            "level": np.concatenate([t["level"].to_numpy(np.int32) for t, _ in tables]),
            "tissue_frac": np.concatenate([t["tissue_frac"].to_numpy(np.float32) for t, _ in tables]),
        }
        write_index(root, index)

        buffer = np.empty((chunk_tiles, tile_px, tile_px, 3), np.uint8)
        filled, start = 0, 0
        for (table, _), grid in zip(tables, grids, strict=True):
            if table.empty:
                continue
            with open_slide(grid.slide_path) as slide:
                for _, pixels in iter_tile_pixels(slide, table, grid, workers=workers):
                    buffer[filled] = pixels
                    filled += 1
                    if filled == chunk_tiles:
                        tiles[start : start + filled] = buffer
                        start, filled = start + filled, 0
        if filled:
            tiles[start : start + filled] = buffer[:filled]
        assert start + filled == total, (start, filled, total)

        root.attrs.update(
            {
                "tile_px": int(tile_px),
                "mpp": float(mpp),
                "n_tiles": int(total),
                "slides": [
                    {
                        "slide_id": g.slide_id,
                        "path": g.slide_path,
                        "slide_mpp": g.slide_mpp_x,
                        "mpp_source": g.mpp_source,
                        "n_tiles": len(t),
                        "table_config_hash": m["config_hash"],
                    }
                    for (t, m), g in zip(tables, grids, strict=True)
                ],
                "provenance": provenance(
                    {"chunk_tiles": chunk_tiles, "zstd_level": zstd_level, "tables": ids}
                ),
            }
        )
    return total


class TileStore:
    """Read access to a tile store (open one per process).

    A cohort store holds `tiles` [N, H, W, 3]; a matched-tile store (PLISM) holds [slide, tile, H, W, 3].
    Both read as N flat rows (slide-major), so every consumer (embedding, teacher cache) takes either.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise SlideError(f"not a tile store: {self.path} (make it with `histodistill pack`)")
        self.root = zarr.open_group(self.path, mode="r")
        self.tiles = self.root["tiles"]
        self.attrs = dict(self.root.attrs)
        self.per_slide = int(self.tiles.shape[1]) if self.tiles.ndim == 5 else None
        self._rows = ShardRowReader(self.tiles) if self.per_slide is None else None

    def __len__(self) -> int:
        if self.per_slide is not None:
            return int(self.tiles.shape[0]) * self.per_slide
        return int(self.tiles.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        """Tile i, uint8 [H, W, 3] (a new array). A cohort store's tile is read straight from its shard
        file (`shards.ShardRowReader`: one index entry, one read, one zstd decompression; ~8× less CPU
        than zarr's single-chunk read), a matched-tile store's through zarr."""
        if self.per_slide is not None:
            return self.tiles[divmod(int(i), self.per_slide)]
        return self._rows[int(i)]

    def read(self, start: int, stop: int) -> np.ndarray:
        """A contiguous block of tiles (the fast path for streaming)."""
        if self.per_slide is None:
            return self.tiles[start:stop]
        parts, n = [], self.per_slide
        while start < stop:
            s, t = divmod(start, n)
            take = min(stop - start, n - t)
            parts.append(self.tiles[s, t : t + take])
            start += take
        return np.concatenate(parts) if parts else np.empty((0, *self.tiles.shape[2:]), np.uint8)

    @property
    def index(self) -> pd.DataFrame:
        frame = pd.DataFrame({name: self.root[name][:] for name in INDEX_COLUMNS})
        slide_ids = np.array([s["slide_id"] for s in self.attrs["slides"]], dtype=object)
        frame.insert(0, "slide_id", slide_ids[frame["slide_index"].to_numpy()] if len(frame) else [])
        return frame


class ProcessLocal:
    """A value made lazily in each process by `factory` (a picklable callable): DataLoader workers never
    inherit an open handle, and pickling a dataset never carries one."""

    def __init__(self, factory):
        self._factory = factory
        self._value, self._pid = None, None

    def get(self):
        if self._pid != os.getpid():
            self._value, self._pid = self._factory(), os.getpid()
        return self._value

    def __getstate__(self):
        return {"_factory": self._factory, "_value": None, "_pid": None}


class TileStoreDataset:
    """Map-style dataset over a tile store for torch DataLoader: item i → (uint8 tile HWC, i).

    The store is opened on first use in each process, so a DataLoader worker never inherits a handle.
    """

    def __init__(self, path: str | Path, transform=None):
        self.path = Path(path)
        self.transform = transform
        self._store = ProcessLocal(partial(TileStore, self.path))
        self._len = len(TileStore(self.path))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        tile = self._store.get()[i]
        return (self.transform(tile) if self.transform else tile), int(i)


class SlideTileDataset:
    """Map-style dataset reading tiles straight from the slides of tile tables (no packing needed).

    Each process keeps its own OpenSlide handles (keyed by path, reopened after a fork), never shared.
    """

    def __init__(self, table_paths: Sequence[str | Path], transform=None):
        frames, self._grids = [], {}
        for p in table_paths:
            table = read_tile_table(p)
            self._grids[table.grid.slide_id] = table.grid
            frames.append(table.frame)
        self.table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        self.transform = transform
        self._handles = ProcessLocal(dict)  # slide id → this process's OpenSlide handle

    def __len__(self) -> int:
        return len(self.table)

    def _slide(self, slide_id: str):
        handles = self._handles.get()
        if slide_id not in handles:
            handles[slide_id] = open_slide(self._grids[slide_id].slide_path)
        return handles[slide_id]

    def __getitem__(self, i: int):
        row = self.table.iloc[int(i)]
        grid = self._grids[row["slide_id"]]
        tile = read_tile(self._slide(row["slide_id"]), row, grid.tile_px)
        return (self.transform(tile) if self.transform else tile), int(i)
