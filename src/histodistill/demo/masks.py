"""Ground-truth label masks of the demo slides: what the generator drew, as "mask slides" beside the slides.

The demo slides are rendered from latent maps (`histodistill.demo.slides.TissueMaps`), so the generator knows
where every nucleus is. This module turns those maps into labels, band by band, and writes them as a mask
slide: a tiled pyramidal one-channel uint8 TIFF on exactly the slide's level-0 pixel grid, with its µm/px and
its pyramid levels (`pyramid_shapes`), so that a tile-table row (x0, y0 in level-0 px, level, read_px) reads
the same region of the mask as of the slide (`histodistill.masks.read_mask_tile`). Lower levels are the 2×2
mode of the level above (`mode_reduce2`), never an average of labels.

Labels (`DEMO_MASK_CLASSES`):
- 0 `background`: glass (outside the tissue) and the fat holes inside it (both unstained);
- 1 `tissue`: tissue that is not nucleus (eosin stroma with its faint haematoxylin background);
- 2 `nucleus`: `TissueMaps.nuclei` > NUCLEUS_THRESHOLD inside the tissue body.

The nucleus map is each nucleus's grey value (150–255, i.e. 0.59–1.0) drawn as a filled ellipse and
Gaussian-blurred (σ 0.6 µm), so its level set at 0.3, about half the peak of the faintest nucleus, holds every
nucleus out to at least its half-maximum contour (the edge a pathologist would draw) and never a blur tail.
The generator gives all nuclei one kind (its few large "atypical" ones are not marked in the maps), so no
nucleus types are labelled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histodistill.demo.slides import DemoSlideConfig, iter_tissue_bands, write_pyramid_bands

DEMO_MASK_CLASSES = ("background", "tissue", "nucleus")
NUCLEUS_THRESHOLD = 0.3


def labels_of(maps) -> np.ndarray:
    """Latent maps of one band (`TissueMaps`, [rows, W]) → uint8 labels [rows, W] (module docstring)."""
    body = maps.tissue & ~maps.fat
    labels = body.astype(np.uint8)
    labels[body & (maps.nuclei > NUCLEUS_THRESHOLD)] = 2
    return labels


def iter_label_bands(spec: DemoSlideConfig, seed: int) -> Iterator[np.ndarray]:
    """Level-0 labels of a demo slide, uint8 [≤ BAND_ROWS, W] bands from top to bottom (0 background/glass
    and fat holes, 1 tissue, 2 nucleus), from the same latent maps `make_demo_slide(path, seed, spec)`
    renders, so label pixel (y, x) is the label of RGB pixel (y, x). A blank slide is all 0."""
    for _, maps in iter_tissue_bands(spec, seed):
        yield labels_of(maps)


def mode_reduce2(labels: np.ndarray) -> np.ndarray:
    """2× label downsampling: uint8 [H, W] → [⌈H/2⌉, ⌈W/2⌉], each pixel the most frequent label of its 2×2
    block (an odd last row or column repeats its edge, as if the block were full); ties go to the larger
    label, so a nucleus or tissue pixel is not lost to background on a tie. Never averages labels."""
    labels = np.asarray(labels, np.uint8)
    h, w = labels.shape
    padded = np.pad(labels, ((0, h % 2), (0, w % 2)), mode="edge")
    blocks = np.stack(
        [padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]]
    )  # [4, H/2, W/2]
    n_labels = int(blocks.max()) + 1
    counts = np.stack([(blocks == k).sum(0) for k in range(n_labels)])  # [K, H/2, W/2]
    return (n_labels - 1 - np.argmax(counts[::-1], axis=0)).astype(np.uint8)


def make_demo_mask_slide(path: str | Path, seed: int, spec: DemoSlideConfig = DemoSlideConfig()) -> Path:
    """Write the mask slide of `make_demo_slide(…, seed, spec)`: uint8 labels (`iter_label_bands`) as a tiled
    pyramidal one-channel TIFF with the slide's level-0 grid, µm/px, levels and tile size, lower levels by
    `mode_reduce2`. Streams band by band and writes atomically (`write_pyramid_bands`); the same seed and spec
    give the same bytes."""
    shape = (spec.height_px, spec.width_px)
    write_pyramid_bands(
        iter_label_bands(spec, seed),
        shape,
        path,
        spec.mpp,
        spec.levels,
        spec.tile,
        channels=1,
        reduce=mode_reduce2,
    )
    return Path(path)
