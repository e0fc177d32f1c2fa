"""The region store: each slide's tile embeddings cut into regions of G × G tiles (SLPD's / HIPT's regions).

HIPT and SLPD tokenize a 4,096 px region at 20× (2 mm at ~0.5 µm/px) as 16 × 16 patches of 256 px, each the
frozen patch encoder's embedding. Here a region is G × G tiles of the tile grid (`tiling`: 224 px at 0.5 µm/px,
so G = 16 spans 1.8 mm) and its tokens are rows of the `embed` output: no encoder pass is repeated.

Regions are the non-overlapping G × G blocks of each slide's tile grid, aligned at tile (0, 0) (the grid of
the tile table, `tile_id = row · cols + col`); a tile the table does not hold (background, too little tissue)
is a *missing* token. A region is kept when its fraction of present tiles is at least `min_tissue`.

Store layout (Zarr v3 group, written atomically, provenance in attrs like the other stores):
- `tokens` float32 [R, G, G, D]: the tiles' embeddings (zeros where missing), one region per chunk;
- `mask` bool [R, G, G]: True where the tile is present;
- `slide_index` int32 [R] (into attrs `slides`), `row0`, `col0` int32 [R] (the region's origin in tiles),
  `x0`, `y0` int64 [R] (its origin in level-0 px), `tissue_frac` float32 [R] (present tiles / G²);
- attrs: `slides` (ids, in the embedding store's order), `grid`, `dim`, `min_tissue`, `n_regions`,
  `provenance`, `complete`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from histodistill.atomic import atomic_path
from histodistill.errors import HistodistillError
from histodistill.provenance import provenance

log = logging.getLogger(__name__)


def cut_regions(
    tile_id: np.ndarray, rows: int, cols: int, grid: int = 16, min_tissue: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The regions of one slide's tile grid ([rows, cols] tiles; `tile_id` [T] = row · cols + col).

    Returns (origins [R, 2] int (row0, col0) in tiles, index [R, G, G] int64 (the position in `tile_id` of each
    token, −1 where the tile is missing), tissue fraction [R] float32), for the regions with at least
    `min_tissue` of their G² tiles present, in row-major order of their origin. Raises HistodistillError for a
    tile id outside the grid or G < 1.
    """
    if grid < 1:
        raise HistodistillError(f"regions.grid must be at least 1, not {grid}")
    tile_id = np.asarray(tile_id, dtype=np.int64)
    if len(tile_id) and (tile_id.min() < 0 or tile_id.max() >= rows * cols):
        raise HistodistillError(f"tile ids outside the {rows} × {cols} grid")
    n_r, n_c = -(-rows // grid), -(-cols // grid)
    lookup = np.full((n_r * grid, n_c * grid), -1, dtype=np.int64)
    r, c = np.divmod(tile_id, cols)
    lookup[r, c] = np.arange(len(tile_id))
    blocks = lookup.reshape(n_r, grid, n_c, grid).transpose(0, 2, 1, 3).reshape(n_r * n_c, grid, grid)
    frac = (blocks >= 0).mean(axis=(1, 2)).astype(np.float32)
    keep = (frac >= min_tissue) & (frac > 0)
    rr, cc = np.divmod(np.arange(n_r * n_c), n_c)
    origins = np.stack([rr * grid, cc * grid], axis=1)[keep]
    return origins, blocks[keep], frac[keep]


def build_region_store(
    embeddings: str | Path,
    tile_tables: Sequence[str | Path],
    out: str | Path,
    grid: int = 16,
    min_tissue: float = 0.25,
) -> int:
    """Write the region store of one embedding store ([N, D], rows in tile-store order) to `out`.

    `tile_tables`: the tile tables of the store's slides (any order; each slide of the store needs its own,
    matched by slide id), whose metadata give the grid shape and footprint. Streams slide by slide: memory
    holds one slide's embeddings and regions. Returns the number of regions. Raises HistodistillError for a
    per-token embedding store ([N, P, D]), a slide without its tile table, or tile ids that disagree.
    """
    from histodistill.embed import EmbeddingStore
    from histodistill.tiling import read_tile_table

    store = EmbeddingStore(embeddings)
    emb = store.root["embeddings"]
    if emb.ndim != 2:
        raise HistodistillError(f"{embeddings}: region tokens need pooled embeddings [N, D], not {emb.shape}")
    dim = int(emb.shape[1])
    index = store.index()
    slide_ids = [s["slide_id"] for s in store.attrs["slides"]]
    tables = {}
    for path in tile_tables:
        table = read_tile_table(path)
        tables[table.metadata["slide_id"]] = (path, table.metadata)
    missing = [s for s in slide_ids if s not in tables]
    if missing:
        raise HistodistillError(f"{embeddings}: no tile table given for slide(s) {missing}")
    slide_of_row = index["slide_index"].astype(np.int64)
    order = np.argsort(slide_of_row, kind="stable")
    bounds = np.searchsorted(slide_of_row[order], np.arange(len(slide_ids) + 1))
    params = {"grid": grid, "min_tissue": min_tissue, "embeddings": store.attrs["provenance"]["config_hash"]}
    total = 0
    with atomic_path(out) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        tokens = root.create_array(
            "tokens", shape=(0, grid, grid, dim), chunks=(1, grid, grid, dim), dtype="float32"
        )
        mask = root.create_array("mask", shape=(0, grid, grid), chunks=(256, grid, grid), dtype="bool")
        columns = {name: [] for name in ("slide_index", "row0", "col0", "x0", "y0", "tissue_frac")}
        for s, sid in enumerate(slide_ids):
            rows_of = order[bounds[s] : bounds[s + 1]]
            path, meta = tables[sid]
            n_rows, n_cols = (int(v) for v in meta["grid"])
            tile_id = index["tile_id"][rows_of]
            origins, idx, frac = cut_regions(tile_id, n_rows, n_cols, grid, min_tissue)
            if not len(origins):
                log.warning("%s: no region with ≥ %.0f%% tissue", sid, 100 * min_tissue)
                continue
            lo, hi = int(rows_of.min()), int(rows_of.max()) + 1
            vectors = np.asarray(emb[lo:hi], dtype=np.float32)[rows_of - lo]  # this slide's rows
            present = idx >= 0
            block = np.where(present[..., None], vectors[np.where(present, idx, 0)], 0.0).astype(np.float32)
            tokens.resize((total + len(block), grid, grid, dim))
            mask.resize((total + len(block), grid, grid))
            tokens[total:] = block
            mask[total:] = present
            foot = float(meta["footprint_px0"])
            columns["slide_index"].append(np.full(len(block), s, np.int32))
            columns["row0"].append(origins[:, 0].astype(np.int32))
            columns["col0"].append(origins[:, 1].astype(np.int32))
            columns["x0"].append(np.round(origins[:, 1] * foot).astype(np.int64))
            columns["y0"].append(np.round(origins[:, 0] * foot).astype(np.int64))
            columns["tissue_frac"].append(frac)
            total += len(block)
        dtypes = {"slide_index": np.int32, "row0": np.int32, "col0": np.int32, "x0": np.int64, "y0": np.int64}
        for name, parts in columns.items():
            values = np.concatenate(parts) if parts else np.zeros(0, dtypes.get(name, np.float32))
            root.create_array(name, data=values)
        root.attrs.update(
            {
                "slides": slide_ids,
                "grid": grid,
                "dim": dim,
                "min_tissue": min_tissue,
                "n_regions": total,
                "provenance": provenance(params, embeddings=str(embeddings)),
                "complete": True,
            }
        )
    log.info("%s: %d regions of %d × %d tiles → %s", embeddings, total, grid, grid, out)
    return total


COLUMNS = ("slide_index", "row0", "col0", "x0", "y0", "tissue_frac")


def write_region_arrays(
    out: str | Path,
    arrays: dict[str, np.ndarray],
    slides: Sequence[str],
    params: dict,
    sources: dict | None = None,
    **attrs,
) -> int:
    """Write whole region arrays (tokens [R, G, G, D], mask [R, G, G] and the `COLUMNS`, see the module
    docstring) as a region store at `out`, atomically, chunked like `build_region_store`'s (one region per
    tokens chunk), so it streams the same way. `params` and `sources` (e.g. the embedding store) go into the provenance; `attrs` (e.g. `min_tissue`,
    `synthetic`) into the attrs. Returns the number of regions. Raises HistodistillError for arrays whose
    lengths or grid disagree."""
    tokens, mask = np.asarray(arrays["tokens"], np.float32), np.asarray(arrays["mask"], bool)
    n = len(tokens)
    if tokens.ndim != 4 or mask.shape != tokens.shape[:3] or any(len(arrays[c]) != n for c in COLUMNS):
        raise HistodistillError(
            f"{out}: region arrays disagree: tokens {tokens.shape}, mask {mask.shape}, "
            + ", ".join(f"{c} {len(arrays[c])}" for c in COLUMNS)
        )
    grid, dim = int(tokens.shape[1]), int(tokens.shape[3])
    with atomic_path(out) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        root.create_array("tokens", data=tokens, chunks=(1, grid, grid, dim))
        root.create_array("mask", data=mask, chunks=(256, grid, grid))
        for name in COLUMNS:
            root.create_array(name, data=np.asarray(arrays[name]))
        root.attrs.update(
            {"slides": list(slides), "grid": grid, "dim": dim, "n_regions": n, **attrs,
             "provenance": provenance(params, **(sources or {})), "complete": True}
        )  # fmt: skip
    return n


class RegionStore:
    """Read access to a region store (see the module docstring): `tokens` [R, G, G, D], `mask` [R, G, G]
    and the per-region columns. `read` and `slide_rows` stream (memory: the regions asked for); `load` reads
    everything (small stores and tests only: at TCGA scale the tokens are tens of GB)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise HistodistillError(f"not a region store: {self.path}")
        self.root = zarr.open_group(self.path, mode="r")
        if not self.root.attrs.get("complete"):
            raise HistodistillError(f"{self.path} is incomplete; rerun rule region_tokens")
        self.attrs = dict(self.root.attrs)
        self._slide_index: np.ndarray | None = None
        self._memory: tuple[np.ndarray, np.ndarray] | None = None  # tokens, mask once `preload`ed

    def __len__(self) -> int:
        return int(self.attrs["n_regions"])

    @property
    def slides(self) -> list[str]:
        return list(self.attrs["slides"])

    @property
    def grid(self) -> int:
        return int(self.attrs["grid"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def slide_index(self) -> np.ndarray:
        """[R] int64: each region's slide (its position in `slides`); read once, then kept (8 bytes a region)."""
        if self._slide_index is None:
            self._slide_index = np.asarray(self.root["slide_index"][:], np.int64)
        return self._slide_index

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens array, uncompressed (R · G² · D · 4)."""
        return int(np.prod(self.root["tokens"].shape)) * 4

    def preload(self, max_mib: float) -> bool:
        """Read tokens and mask into memory when the tokens take at most `max_mib` MiB (then `read` indexes
        memory); True when they are in memory. A larger store stays on disk and is streamed."""
        if self._memory is None and self.nbytes <= max_mib * 2**20:
            self._memory = (
                np.asarray(self.root["tokens"][:], np.float32),
                np.asarray(self.root["mask"][:], bool),
            )
        return self._memory is not None

    def slide_rows(self) -> list[np.ndarray]:
        """The region rows [r_s] int64 of each slide, in store order (contiguous in stores written here)."""
        si = self.slide_index
        order = np.argsort(si, kind="stable")
        bounds = np.searchsorted(si[order], np.arange(len(self.slides) + 1))
        return [order[bounds[s] : bounds[s + 1]] for s in range(len(self.slides))]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens [B, G, G, D] float32 and mask [B, G, G] bool of the regions `rows` [B] (any order, repeats
        allowed), in that order. Reads only their chunks: one slice when the rows are a contiguous run, else
        an orthogonal selection. Raises IndexError for a row outside [0, R)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            g, d = self.grid, self.dim
            return np.zeros((0, g, g, d), np.float32), np.zeros((0, g, g), bool)
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"{self.path}: region rows outside [0, {len(self)})")
        if self._memory is not None:
            return self._memory[0][rows], self._memory[1][rows]
        uniq, inverse = np.unique(rows, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo == len(uniq):
            tokens, mask = self.root["tokens"][lo:hi], self.root["mask"][lo:hi]
        else:
            tokens, mask = self.root["tokens"].oindex[uniq], self.root["mask"].oindex[uniq]
        if not (len(uniq) == len(rows) and (inverse == np.arange(len(rows))).all()):
            tokens, mask = tokens[inverse], mask[inverse]
        return np.asarray(tokens, np.float32), np.asarray(mask, bool)

    def load(self) -> dict[str, np.ndarray]:
        """Every array of the store in memory (tokens, mask, slide_index, row0, col0, x0, y0, tissue_frac)."""
        names = ("tokens", "mask", *COLUMNS)
        return {name: self.root[name][:] for name in names}
