"""The demo's slide-level task: bags of demo tiles, positive when they hold a dense-nuclei tile.

Kept free of torch and scikit-learn, so the `slide_demo` job costs a pandas import (the demo's budget).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError

DECIDING_CLASS = "dense"


def make_demo_slide_task(
    probe_manifest: str | Path,
    out_csv: str | Path,
    seed: int = 0,
    bags_per_split: Mapping[str, int] | None = None,
    bag_size: tuple[int, int] = (4, 8),
) -> pd.DataFrame:
    """A slide-level demo task where one tile class decides the label: a bag is "positive" when it holds a
    "dense" tile (the top third of the demo cohort by nuclear density, the labels of the demo probe's
    manifest `probe_manifest`, CSV tile_index, label, split; `histodistill.demo.tasks.make_demo_probe`).

    The demo cohort has three slides, too few for slide-level training, so the "slides" are bags drawn
    from the tiles of one split, i.e. of one real slide each (the probe manifest splits by slide): no tile
    is in two splits. A negative bag holds `bag_size` (a uniform draw of its bounds) other tiles; a positive
    bag the same with 1-2 of them replaced by dense tiles; half of each split's `bags_per_split` bags are
    positive. Bags reuse tiles (a bag repeats a tile only when its split has fewer tiles than the bag; tiles
    recur across bags), so they are not independent slides, and on the demo's few tiles (about 20 at the
    test size) the task is a check of the wiring, not a measurement. Writes CSV `slide_id, tile_index,
    label, split` atomically; returns it. Raises BenchmarkError when a split lacks dense or other tiles.
    """
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
