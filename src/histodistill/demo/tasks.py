"""Demo benchmark tasks whose labels come from what the synthetic tissue shows, so better features score higher.

- Patch classification (`make_demo_probe`): the demo cohort's tiles labelled by nuclear-density tercile, split
  by slide, as the manifest `bench.probe.load_manifest` reads.
- HEST-like expression (`make_demo_hest`): a task in HEST-Benchmark's layout whose counts depend on tile content.
- Latent tasks (`latent_crops`, `latent_class`): crops of fresh generator slides, each rendered under its own
  random staining and scanner, labelled from the generator's latent maps (nuclear area fraction, fat, …), so
  colour statistics do not give the label away: what a network must read is the tissue, not the stain. The
  cohort-derived tasks above are readable by a random network (nuclear density is a dark-pixel count), so a
  trained teacher barely beats a random init on them and a recovery measured on them is noise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.hest import GENE_LIST, write_h5ad
from histodistill.provenance import provenance
from histodistill.tilestore import TileStore

log = logging.getLogger(__name__)

DEMO_CLASSES = ("sparse", "medium", "dense")


def nuclear_density(tiles: np.ndarray) -> np.ndarray:
    """Fraction of dark, blue-purple pixels per tile: the haematoxylin-rich nuclei of the demo tissue."""
    rgb = tiles.astype(np.float32)
    dark = rgb.mean(axis=-1) < 140
    bluish = rgb[..., 2] > rgb[..., 1] + 10
    return (dark & bluish).mean(axis=(1, 2))


def make_demo_probe(store_path: str | Path, out_csv: str | Path, chunk: int = 256) -> pd.DataFrame:
    """Label the demo cohort's tiles by nuclear-density tercile; split by slide (train / val / test).

    Slides go to train, val, test in turn (slide i → split i mod 3 of that order), so no slide's tiles
    straddle two splits. The classes are visible tissue properties, so better features classify better.
    """
    store = TileStore(store_path)
    n = len(store)
    density = np.concatenate([nuclear_density(store.read(i, min(n, i + chunk))) for i in range(0, n, chunk)])
    cuts = np.quantile(density, [1 / 3, 2 / 3])
    label = np.array(DEMO_CLASSES, dtype=object)[np.searchsorted(cuts, density, side="right")]
    slide_index = store.index["slide_index"].to_numpy()
    if len(np.unique(slide_index)) < 3:
        raise BenchmarkError(
            f"demo probe: {store_path} has fewer than 3 slides (one each for train, val, test)"
        )
    split = np.array(["train", "val", "test"], dtype=object)[slide_index % 3]
    frame = pd.DataFrame({"tile_index": np.arange(n), "label": label, "split": split})
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


@dataclass(frozen=True)
class LatentCrops:
    """Crops with the generator's ground truth: `tiles` uint8 [N, S, S, 3] (each under its own staining and
    scanner), `latents` float32 [N, 5] (`demo.teacher.GLOBAL_TARGETS`: tissue, fat and nuclear area
    fractions, mean haematoxylin and eosin concentration, all stain-independent), `slide` int [N]."""

    tiles: np.ndarray
    latents: np.ndarray
    slide: np.ndarray


def latent_crops(
    n_slides: int = 8,
    per_slide: int = 75,
    seed: int = 0,
    width_px: int = 2048,
    height_px: int = 1536,
    name: str = "demo-task",
) -> LatentCrops:
    """`per_slide` tissue crops from each of `n_slides` fresh demo slides, each under a random staining and
    scanner, with their latent targets.

    Slides are `render_slides` of names `{name}:{i}` (seeds `seed_for(name:i, seed)`: never a demo-cohort,
    demo-teacher or PLISM slide), at `width_px` × `height_px` and the demo's 0.25 µm/px; crops are the demo
    teacher's (`CropPairs`: 224 px at 0.5 µm/px ± 10 % scale, a quarter turn and flip), the first rendering
    of each, always re-stained and scanned (`reference_p` 0) with the ranges of `DemoTeacherConfig`, which
    cover the PLISM and mitosis demo domains. Deterministic in (seed, settings). Raises HistodistillError
    (from `render_slides`) when a slide holds no tissue crop.
    """
    from histodistill.demo.teacher import CropPairs, DemoTeacherConfig, render_slides

    cfg = DemoTeacherConfig(width_px=width_px, height_px=height_px, reference_p=0.0)
    slides = render_slides(cfg, [f"{name}:{i}" for i in range(n_slides)], seed)
    tiles, latents, slide = [], [], []
    for i, rendered in enumerate(slides):
        crops = CropPairs([rendered], cfg, seed, stream=100 + i, grid=1)
        for k in range(per_slide):
            views, targets, _ = crops[k]
            tiles.append(views[0])
            latents.append(targets)
            slide.append(i)
    return LatentCrops(np.stack(tiles), np.stack(latents).astype(np.float32), np.array(slide))


def latent_class(nuclei: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """Class index 0 / 1 / 2 (`DEMO_CLASSES`: sparse, medium, dense) of each crop's latent nuclear area
    fraction `nuclei` [N], cut at the terciles of the crops selected by the bool mask `fit` [N] (the
    training split only, so no test crop sets a cut)."""
    cuts = np.quantile(np.asarray(nuclei)[np.asarray(fit, bool)], [1 / 3, 2 / 3])
    return np.searchsorted(cuts, nuclei, side="right")


def tile_content_features(tiles: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Per tile: mean R, G, B (0..1) and the fraction of dark, nucleus-like pixels (grey < 120)."""
    out = np.empty((len(tiles), 4))
    for s in range(0, len(tiles), chunk):
        block = np.asarray(tiles[s : s + chunk])
        out[s : s + len(block), :3] = block.mean(axis=(1, 2)) / 255.0
        out[s : s + len(block), 3] = (block.sum(-1, dtype=np.uint16) < 3 * 120).mean(axis=(1, 2))
    return out


def make_demo_hest(
    out_dir: str | Path,
    tiles: np.ndarray,
    seed: int = 0,
    n_samples: int = 2,
    spots_per_sample: int = 60,
    n_genes: int = 50,
    extra_genes: int = 10,
    sparse: bool = True,
    content: np.ndarray | None = None,
) -> Path:
    """Write a small HEST task whose counts depend on tile content, so better features score higher.

    Spots draw tiles from `tiles` (uint8 [N, H, W, 3]; without replacement when there are enough).
    Each of the `n_genes` benchmark genes has a Poisson rate log-linear in the tile's standardised mean
    colour and dark-pixel (nuclear) density; `extra_genes` more genes do not depend on the tile and are
    left out of `var_50genes.json`. `content` float [N, F]: per-tile features to use instead (e.g. the
    generator's latents of `latent_crops`, so the expression follows the tissue, not its staining). The AnnData rows are shuffled relative to the patch file, so readers
    must align by barcode. Folds leave one sample out (fold i tests sample i).
    """
    tiles, content_given = np.asarray(tiles), content
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8 or len(tiles) == 0:
        raise BenchmarkError(f"demo tiles must be uint8 [N, H, W, 3], got {tiles.dtype} {tiles.shape}")
    if n_samples < 2:
        raise BenchmarkError("the demo needs at least 2 samples (folds leave one sample out)")
    rng = np.random.default_rng(seed)
    n_spots = n_samples * spots_per_sample
    pick = rng.choice(len(tiles), n_spots, replace=len(tiles) < n_spots)
    if content is not None and len(content) != len(tiles):
        raise BenchmarkError(f"demo HEST: {len(content)} content rows for {len(tiles)} tiles")
    content = tile_content_features(tiles[pick]) if content is None else np.asarray(content, float)[pick]
    spread = content.std(0)
    z = (content - content.mean(0)) / np.where(spread > 0, spread, 1.0)

    n_total = n_genes + extra_genes
    genes = [f"GENE{g:03d}" for g in range(n_total)]
    weights = np.zeros((z.shape[1], n_total))
    weights[:, :n_genes] = rng.normal(0.0, 0.6, size=(z.shape[1], n_genes))
    base = rng.uniform(0.5, 2.5, size=n_total)
    counts = rng.poisson(np.exp(base + z @ weights)).astype(np.int32)

    params = {
        "seed": seed,
        "n_samples": n_samples,
        "spots_per_sample": spots_per_sample,
        "n_genes": n_genes,
        "extra_genes": extra_genes,
        "sparse": sparse,
        "n_tiles": int(len(tiles)),
    }
    if content_given is not None:
        params["content"] = "given"
    out_dir = Path(out_dir)
    side = int(np.ceil(np.sqrt(spots_per_sample)))
    with atomic_path(out_dir) as tmp:
        for sub in ("patches", "adata", "splits"):
            (tmp / sub).mkdir(parents=True)
        ids = [f"DEMO{s}" for s in range(n_samples)]
        for s, sid in enumerate(ids):
            rows = slice(s * spots_per_sample, (s + 1) * spots_per_sample)
            barcodes = np.array([f"SPOT{j:05d}-1" for j in range(spots_per_sample)])
            coords = (
                np.stack([np.arange(spots_per_sample) % side, np.arange(spots_per_sample) // side], 1) * 100
            )
            with h5py.File(tmp / "patches" / f"{sid}.h5", "w") as f:
                f.create_dataset("img", data=tiles[pick[rows]], chunks=(1, *tiles.shape[1:]))
                f.create_dataset("barcode", data=barcodes.astype("S").reshape(-1, 1))
                f.create_dataset("coords", data=coords.astype(np.int64))
            order = rng.permutation(spots_per_sample)
            write_h5ad(tmp / "adata" / f"{sid}.h5ad", counts[rows][order], barcodes[order], genes, sparse)
        for i, sid in enumerate(ids):
            for kind, members in (("train", [t for t in ids if t != sid]), ("test", [sid])):
                pd.DataFrame(
                    {
                        "sample_id": members,
                        "patches_path": [f"patches/{m}.h5" for m in members],
                        "expr_path": [f"adata/{m}.h5ad" for m in members],
                    }
                ).to_csv(tmp / "splits" / f"{kind}_{i}.csv", index=False)
        (tmp / GENE_LIST).write_text(json.dumps({"genes": genes[:n_genes]}, indent=1))
        (tmp / "provenance.json").write_text(
            json.dumps(provenance(params, generator="make_demo_hest"), indent=1)
        )
    log.info(
        "demo HEST task: %d samples × %d spots, %d genes → %s", n_samples, spots_per_sample, n_genes, out_dir
    )
    return out_dir


def make_demo_hest_from_store(
    store_path: str | Path, out_dir: str | Path, *, task: str, seed: int = 0
) -> Path:
    """`make_demo_hest` on every tile of a (small) tile store, seeded per task from the run's `seed`.

    The task's seed is `seed_for("hest:<task>", seed)`, so two demo tasks of one run differ. All tiles are
    read into memory: meant for the demo cohort. Returns `out_dir`; raises BenchmarkError as `make_demo_hest`.
    """
    from histodistill.demo.slides import seed_for

    store = TileStore(store_path)
    return make_demo_hest(out_dir, store.read(0, len(store)), seed=seed_for(f"hest:{task}", seed))
