"""The SLPD demo: synthetic slides whose label depends on how tissue patterns are *arranged*, built cheaply
from real tile embeddings instead of rendering and embedding dozens of whole-slide images.

Honest description of what this is: the demo cohort's tile embeddings (the `embed` output of one model) are
split into two tissue patterns A and B by k-means (k = 2, scikit-learn, seeded) on those embeddings; then
`n_slides` slide layouts are *composed* from them, each `regions_per_slide` regions of G × G tokens, every
token a real tile embedding drawn (with replacement) from its pattern's pool:
- label `segregated`: half of a slide's regions are all A, the other half all B;
- label `intermixed`: every region is a random half-A, half-B arrangement of its tokens.
Every slide therefore holds the same share of A and B tiles (exactly half, before missing tiles), so no single
tile and no tile-level mixture tells the label: only how patterns co-occur within regions does. A fraction
`missing` of tokens is marked missing (mask False, zeros), at random. The result is a region store like
`slide.regions.build_region_store`'s (slide ids `synth-000`…) and a labels CSV (slide_id, label).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from histodistill.atomic import atomic_path
from histodistill.slide.regions import write_region_arrays

LABELS = ("segregated", "intermixed")


def synthesize_slides(
    tiles: np.ndarray,
    n_slides: int = 48,
    regions_per_slide: int = 6,
    grid: int = 8,
    missing: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Region arrays (tokens [R, G, G, D], mask, slide_index, row0, col0, x0, y0, tissue_frac) and the
    labels frame (slide_id, label) of `n_slides` synthetic slides (half of each label) from `tiles` [N, D].
    `regions_per_slide` must be even. Deterministic given `seed`."""
    if regions_per_slide % 2:
        raise ValueError(f"regions_per_slide must be even, not {regions_per_slide}")
    rng = np.random.default_rng(seed)
    tiles = np.asarray(tiles, np.float32)
    pattern = KMeans(2, random_state=seed, n_init=3).fit_predict(tiles)
    pools = [np.flatnonzero(pattern == p) for p in (0, 1)]
    n_tok = grid * grid
    tokens, masks, slide_index, labels = [], [], [], []
    for s in range(n_slides):
        label = s % 2
        for r in range(regions_per_slide):
            if label == 0:  # segregated: a pure region, A for the first half of the regions, B for the rest
                kinds = np.full(n_tok, int(r >= regions_per_slide // 2))
            else:  # intermixed: half A, half B, in a random arrangement
                kinds = rng.permutation(np.repeat([0, 1], [n_tok // 2, n_tok - n_tok // 2]))
            picks = np.array([rng.choice(pools[k]) for k in kinds])
            present = rng.random(n_tok) >= missing
            present[0] = True
            block = np.where(present[:, None], tiles[picks], 0.0)
            tokens.append(block.reshape(grid, grid, -1))
            masks.append(present.reshape(grid, grid))
            slide_index.append(s)
        labels.append(LABELS[label])
    r_total = len(tokens)
    order = np.arange(r_total) % regions_per_slide
    arrays = {
        "tokens": np.stack(tokens).astype(np.float32),
        "mask": np.stack(masks),
        "slide_index": np.asarray(slide_index, np.int32),
        "row0": (order * grid).astype(np.int32),
        "col0": np.zeros(r_total, np.int32),
        "x0": np.zeros(r_total, np.int64),
        "y0": np.zeros(r_total, np.int64),
        "tissue_frac": np.stack(masks).mean(axis=(1, 2)).astype(np.float32),
    }
    frame = pd.DataFrame({"slide_id": [f"synth-{i:03d}" for i in range(n_slides)], "label": labels})
    return arrays, frame


def write_demo(
    embeddings: str | Path,
    out_store: str | Path,
    out_labels: str | Path,
    n_slides: int = 48,
    regions_per_slide: int = 6,
    grid: int = 8,
    missing: float = 0.1,
    seed: int = 0,
) -> int:
    """Synthesize the demo slides from an embedding store ([N, D]) and write the region store and labels CSV
    atomically. Returns the number of regions."""
    from histodistill.embed import EmbeddingStore

    tiles = EmbeddingStore(embeddings).embeddings
    arrays, frame = synthesize_slides(tiles, n_slides, regions_per_slide, grid, missing, seed)
    params = {"n_slides": n_slides, "regions_per_slide": regions_per_slide, "grid": grid, "missing": missing,
              "seed": seed}  # fmt: skip
    n = write_region_arrays(
        out_store, arrays, frame["slide_id"].tolist(), params, {"embeddings": str(embeddings)}, min_tissue=0.0,
        synthetic=True,
    )  # fmt: skip
    with atomic_path(out_labels) as tmp:
        frame.to_csv(tmp, index=False)
    return n
