"""The demo's slide-level task: bags of demo tiles, positive when they hold a dense-nuclei tile.

Kept free of torch and scikit-learn, so the `slide_demo` job costs a pandas and zarr import (the demo's
budget). Its tile labels are the demo cohort's nuclear density (`density_labels`), not the latent probe's
(`demo.tasks`): bags are drawn from the cohort's own tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError

DECIDING_CLASS = "dense"
DENSITY_CLASSES = ("sparse", "medium", "dense")


def nuclear_density(tiles: np.ndarray) -> np.ndarray:
    """Fraction of dark, blue-purple pixels per tile (uint8 [N, H, W, 3] → float [N]): the
    haematoxylin-rich nuclei of the demo tissue."""
    rgb = tiles.astype(np.float32)
    dark = rgb.mean(axis=-1) < 140
    bluish = rgb[..., 2] > rgb[..., 1] + 10
    return (dark & bluish).mean(axis=(1, 2))


def density_labels(store_path: str | Path, chunk: int = 256) -> pd.DataFrame:
    """The demo cohort's tiles labelled by nuclear-density tercile (`DENSITY_CLASSES`), split by slide
    (slide i → train / val / test by i mod 3, so no slide's tiles straddle two splits): a frame
    `tile_index, label, split`. Raises BenchmarkError when the store holds fewer than 3 slides."""
    from histodistill.tilestore import TileStore

    store = TileStore(store_path)
    n = len(store)
    density = np.concatenate([nuclear_density(store.read(i, min(n, i + chunk))) for i in range(0, n, chunk)])
    cuts = np.quantile(density, [1 / 3, 2 / 3])
    label = np.array(DENSITY_CLASSES, dtype=object)[np.searchsorted(cuts, density, side="right")]
    slide_index = store.index["slide_index"].to_numpy()
    if len(np.unique(slide_index)) < 3:
        raise BenchmarkError(
            f"demo slide task: {store_path} has fewer than 3 slides (one each for train, val, test)"
        )
    split = np.array(["train", "val", "test"], dtype=object)[slide_index % 3]
    return pd.DataFrame({"tile_index": np.arange(n), "label": label, "split": split})


def make_demo_slide_task_from_store(
    store_path: str | Path, out_csv: str | Path, seed: int = 0
) -> pd.DataFrame:
    """`make_demo_slide_task` on the demo cohort's tile store `store_path` labelled by `density_labels`
    (rule `slide_demo`)."""
    return make_demo_slide_task(density_labels(store_path), out_csv, seed=seed)


def make_demo_slide_task(
    probe_manifest: str | Path | pd.DataFrame,
    out_csv: str | Path,
    seed: int = 0,
    bags_per_split: Mapping[str, int] | None = None,
    bag_size: tuple[int, int] = (4, 8),
) -> pd.DataFrame:
    """A slide-level demo task where one tile class decides the label: a bag is "positive" when it holds a
    "dense" tile (the top third of the demo cohort by nuclear density: `probe_manifest`, a frame or CSV
    tile_index, label, split, as `density_labels` makes).

    The demo cohort has three slides, too few for slide-level training, so the "slides" are bags drawn
    from the tiles of one split, i.e. of one real slide each (the labels split by slide): no tile
    is in two splits. A negative bag holds `bag_size` (a uniform draw of its bounds) other tiles; a positive
    bag the same with 1-2 of them replaced by dense tiles; half of each split's `bags_per_split` bags are
    positive. Bags reuse tiles (a bag repeats a tile only when its split has fewer tiles than the bag; tiles
    recur across bags), so they are not independent slides, and on the demo's few tiles (about 20 at the
    test size) the task is a check of the wiring, not a measurement. Writes CSV `slide_id, tile_index,
    label, split` atomically; returns it. Raises BenchmarkError when a split lacks dense or other tiles.
    """
    if isinstance(probe_manifest, pd.DataFrame):
        probe, probe_manifest = probe_manifest, "the tile labels"
    else:
        probe = pd.read_csv(probe_manifest, dtype={"label": str, "split": str})
    if missing := {"tile_index", "label", "split"} - set(probe.columns):
        raise BenchmarkError(f"demo slide task: {probe_manifest} lacks column(s) {sorted(missing)}")
    counts = dict(bags_per_split or {"train": 48, "val": 24, "test": 24})
    rng = np.random.default_rng(seed)
    rows = []
    for split, n_bags in counts.items():
        here = probe[probe["split"] == split]
        pos_pool = here.loc[here["label"] == DECIDING_CLASS, "tile_index"].to_numpy()
        neg_pool = here.loc[here["label"] != DECIDING_CLASS, "tile_index"].to_numpy()
        if len(pos_pool) < 1 or len(neg_pool) < 1:
            raise BenchmarkError(
                f"demo slide task: split {split} of {probe_manifest} has {len(pos_pool)} dense and "
                f"{len(neg_pool)} other tiles; needs at least one of each (larger demo slides?)"
            )
        for b in range(n_bags):
            size = int(rng.integers(bag_size[0], bag_size[1] + 1))
            tiles = rng.choice(neg_pool, size, replace=len(neg_pool) < size)
            label = "positive" if b % 2 else "negative"
            if label == "positive":
                k = int(rng.integers(1, 3))
                tiles[:k] = rng.choice(pos_pool, k, replace=len(pos_pool) < k)
            rows += [(f"{split}_{b:03d}", int(t), label, split) for t in tiles]
    frame = pd.DataFrame(rows, columns=["slide_id", "tile_index", "label", "split"])
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame
