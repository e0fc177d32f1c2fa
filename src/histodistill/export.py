"""Exporters of an embedding store to the formats other tools read.

- plismbench: `{out}/{slide_id}/features.npy`, float32 [n, 3 + D] = [level, x, y, features…], rows sorted
  by (x, y) (level-0 px of the tile's top-left corner; level = the pyramid level the tile was read from).
- TRIDENT/CLAM: `{out}/{slide_id}.h5` with `features` [n, D] and `coords` [n, 2] (x, y level-0 px), coords
  attrs `patch_size` (px at the tile's µm/px), `patch_size_level0`, `patch_level`, `mpp`.

Each slide id is checked (`histodistill.ids.check_id`) and each final path resolved inside `out_dir`
(`histodistill.ids.inside`): an id such as `../escaped` raises IdError and nothing is written outside.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from histodistill.atomic import atomic_path
from histodistill.embed import EmbeddingStore
from histodistill.errors import HistodistillError
from histodistill.ids import check_id, inside


def _per_slide(store: EmbeddingStore):
    emb = store.root["embeddings"]
    if emb.ndim != 2:
        raise HistodistillError(f"{store.path}: export needs pooled [N, D] embeddings, not {emb.shape}")
    index = store.index()
    prov = store.attrs["provenance"]
    for i, slide in enumerate(prov["slides"]):
        rows = np.flatnonzero(index["slide_index"] == i)
        order = np.lexsort((index["y0"][rows], index["x0"][rows]))  # by x, then y
        rows = rows[order]
        yield (
            slide,
            rows,
            emb.get_orthogonal_selection((rows, slice(None)))
            if len(rows)
            else np.zeros((0, emb.shape[1]), np.float32),
            index,
        )


def export_plismbench(store_path: str | Path, out_dir: str | Path) -> list[Path]:
    store = EmbeddingStore(store_path)
    written = []
    for slide, rows, feats, index in _per_slide(store):
        table = np.concatenate(
            [index["level"][rows, None], index["x0"][rows, None], index["y0"][rows, None], feats], axis=1
        ).astype(np.float32)
        path = inside(out_dir, check_id(slide["slide_id"], where=str(store_path)), "features.npy")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, table)
        written.append(path)
    return written


def export_h5(store_path: str | Path, out_dir: str | Path) -> list[Path]:
    store = EmbeddingStore(store_path)
    prov = store.attrs["provenance"]
    written = []
    for slide, rows, feats, index in _per_slide(store):
        path = inside(out_dir, f"{check_id(slide['slide_id'], where=str(store_path))}.h5")
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("features", data=feats.astype(np.float32))
                coords = h5.create_dataset("coords", data=np.stack([index["x0"][rows], index["y0"][rows]], 1))
                coords.attrs["patch_size"] = int(prov["tile_px"])
                coords.attrs["patch_size_level0"] = float(prov["tile_px"] * prov["mpp"] / slide["slide_mpp"])
                coords.attrs["patch_level"] = int(index["level"][rows[0]]) if len(rows) else 0
                coords.attrs["mpp"] = float(prov["mpp"])
                h5.attrs["model"] = prov["model_id"]
                h5.attrs["pooling"] = prov["pooling"]
        written.append(path)
    return written
