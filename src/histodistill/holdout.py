"""Honest splits for PLISM-style pairs: whole tissues are held out, never single tiles.

A tissue's tiles either train a student (paired distillation on the matched tiles, `distill.pairs`) or score
it (`bench.plism.score_plism`), never both: neighbouring tiles of one tissue are near-duplicates, so a
tile-level split would score the student on what it trained on. `plism.tissue_holdout` names the held-out
tissues:

- `table`: a TSV (`table`) with columns `tile_id` (the matched tiles' reference-grid tile id) and `tissue`
  (any id; e.g. PLISM's tissue types), every tile listed;
- `blocks`: spatial blocks on the reference slide (the demo, whose slide is one tissue): the bounding box of
  the tile positions cut into `blocks` = [rows, columns] equal blocks, tissue ids `r<row>c<column>`.

`held_out` lists the held-out tissue ids. Chosen before any result is seen; do not tune against them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.errors import ConfigError

HOLDOUT_METHODS = ("none", "blocks", "table")


@dataclass(frozen=True)
class TissueHoldoutConfig:
    """plism.tissue_holdout: `method` (none | blocks | table), `held_out` tissue ids, `blocks` [rows,
    columns] (method blocks), `table` (method table: TSV tile_id, tissue)."""

    method: str = "none"
    held_out: tuple[str, ...] = ()
    blocks: tuple[int, int] = (2, 2)
    table: str | None = None

    @classmethod
    def parse(cls, params: dict | None) -> TissueHoldoutConfig:
        """The config mapping → TissueHoldoutConfig; ConfigError for an unknown method, blocks that are not
        two integers ≥ 1, `table` without its file, or a method other than none without `held_out`."""
        params = dict(params or {})
        cfg = cls(
            method=params.get("method", "none"),
            held_out=tuple(str(t) for t in params.get("held_out", ())),
            blocks=tuple(int(b) for b in params.get("blocks", (2, 2))),
            table=params.get("table"),
        )
        if cfg.method not in HOLDOUT_METHODS:
            raise ConfigError(
                f"plism.tissue_holdout.method must be one of {HOLDOUT_METHODS}, not {cfg.method!r}"
            )
        if len(cfg.blocks) != 2 or min(cfg.blocks) < 1:
            raise ConfigError(
                f"plism.tissue_holdout.blocks must be [rows, columns] ≥ 1, not {list(cfg.blocks)}"
            )
        if cfg.method == "table" and not cfg.table:
            raise ConfigError(
                "plism.tissue_holdout.method table needs plism.tissue_holdout.table (TSV tile_id, tissue)"
            )
        if cfg.method != "none" and not cfg.held_out:
            raise ConfigError("plism.tissue_holdout.held_out is empty: name the held-out tissue ids")
        return cfg


def reference_tiles(tiles: pd.DataFrame) -> pd.DataFrame:
    """The first slide's rows of a matched-tiles table (tile_id, x0, y0 in store order): the grid that
    PLISM tile subsets and the embedding stores' (x0, y0) order refer to."""
    first = tiles["slide_id"].iloc[0]
    return tiles.loc[tiles["slide_id"] == first, ["tile_id", "x0", "y0"]].reset_index(drop=True)


def tile_tissues(tiles: pd.DataFrame, cfg: TissueHoldoutConfig) -> np.ndarray:
    """The tissue id (str) of every tile of the reference grid (`reference_tiles` order).

    ConfigError for method none, or a table that misses tiles (naming a few) or lacks its columns.
    """
    ref = reference_tiles(tiles)
    if cfg.method == "blocks":
        rows, cols = cfg.blocks
        out = []
        for coord, n in ((ref["y0"].to_numpy(float), rows), (ref["x0"].to_numpy(float), cols)):
            lo, span = coord.min(), max(coord.max() - coord.min(), 1.0)
            out.append(np.minimum((coord - lo) / span * n, n - 1).astype(int))
        return np.array([f"r{r}c{c}" for r, c in zip(*out, strict=True)], dtype=object)
    if cfg.method == "table":
        path = Path(cfg.table)
        if not path.is_file():
            raise ConfigError(f"plism.tissue_holdout.table not found: {path}")
        table = pd.read_csv(path, sep="\t", dtype={"tissue": str}, quoting=csv.QUOTE_NONE)
        if not {"tile_id", "tissue"} <= set(table.columns):
            raise ConfigError(
                f"tissue table {path} needs columns tile_id and tissue, has {list(table.columns)}"
            )
        tissue = table.drop_duplicates("tile_id").set_index("tile_id")["tissue"]
        missing = sorted(set(ref["tile_id"]) - set(tissue.index))
        if missing:
            raise ConfigError(f"tissue table {path} lacks {len(missing)} tile id(s), e.g. {missing[:5]}")
        return tissue.loc[ref["tile_id"]].astype(str).to_numpy(dtype=object)
    raise ConfigError("plism.tissue_holdout.method is none: no tissues to hold out")


def held_out_positions(tiles: pd.DataFrame, cfg: TissueHoldoutConfig) -> tuple[np.ndarray, np.ndarray]:
    """(store positions, scoring positions) of the held-out tissues' tiles, both sorted int64.

    Store positions index the tiles of each slide in the matched store's order (for excluding them from
    distillation); scoring positions index the (x0, y0)-sorted order that `score_plism`'s `tiles_subset`
    refers to. ConfigError when a held-out id is no tissue of the grid (the known ids are listed) or when
    every tissue would be held out.
    """
    tissue = tile_tissues(tiles, cfg)
    known = sorted(set(tissue))
    unknown = sorted(set(cfg.held_out) - set(known))
    if unknown:
        raise ConfigError(f"plism.tissue_holdout.held_out: {unknown} are not tissues here (known: {known})")
    if set(cfg.held_out) >= set(known):
        raise ConfigError(f"plism.tissue_holdout holds out every tissue ({known}): nothing would train")
    held = np.isin(tissue, list(cfg.held_out))
    ref = reference_tiles(tiles)
    order = np.lexsort((ref["y0"].to_numpy(), ref["x0"].to_numpy()))  # as bench.plism.open_embedding_features
    return np.flatnonzero(held).astype(np.int64), np.flatnonzero(held[order]).astype(np.int64)
