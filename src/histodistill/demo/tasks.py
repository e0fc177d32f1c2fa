"""Demo benchmark tasks whose labels come from what the synthetic tissue shows, so better features score higher.

The demo's patch-classification and HEST tasks are one set of **latent crops** (`latent_crops`): crops of
fresh generator slides, each rendered under its own random staining and scanner, with the generator's latent
maps as ground truth (nuclear area fraction, fat, …), so colour statistics do not give the label away: what a
network must read is the tissue, not the stain. A random network reads it less well than the trained demo
teacher, so the report's recovery (student − random init) / (teacher − random init) is a measurement.
(Tasks labelled from the demo cohort's pixels were readable by a random network about as well as by the
teacher: nuclear density is a dark-pixel count.)

- HEST-like expression (`make_latent_hest_task`, rule `hest_demo`): the crops are the spots of a task in
  HEST-Benchmark's layout, samples made of whole generator slides, expression driven by the latents; the
  latents are kept beside it (`LATENTS_FILE`).
- Patch classification (`make_latent_probe`, rule `probe_demo`): the same crops, packed by `hest_store`,
  labelled by latent nuclear-area tercile, in 3 cross-validation folds over generator slides (each crop is
  tested once), as `bench.probe.load_manifest` reads. Sharing the crops means the probe needs no embedding
  jobs of its own (the demo's budget).

Why many small slides and folds: a slide's nuclear-area fraction varies far more between slides than within
one, so the classes of a test split follow the few slides in it. With 6 slides (2 per split) one test split
held 84 % "dense" crops and the teacher − random-init gap of the linear probe (0.08) was about the null
standard error of its balanced accuracy; the student's recovery ranged from −17 to 4 over the 6 orderings of
the same 3 slide groups. 36 slides of 1024 × 768 px (12 per split) cost what 6 of 2048 × 1536 did, and the
3 folds test every crop once.
- `make_demo_hest`: the task writer, also on any tiles with content computed from their pixels.
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
LATENTS_FILE = "latents.parquet"  # in a latent HEST task: sample_id, row, slide and the GLOBAL_TARGETS
PROBE_SPLITS = ("train", "val", "test")  # fold f: generator slide i → PROBE_SPLITS[(i − f) mod 3]
PROBE_FOLDS = 3


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
        crops = CropPairs([rendered], cfg, seed, stream=100 + i, grid=0, views=1)  # one rendering, no maps
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
    sample_of: np.ndarray | None = None,
    tables: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Write a small HEST task whose counts depend on tile content, so better features score higher.

    Spots draw `spots_per_sample` tiles per sample from `tiles` (uint8 [N, H, W, 3]; without replacement
    when there are enough), or, with `sample_of` (int [N], values 0 … n_samples − 1), every tile is one spot
    of its sample, in tile order (e.g. whole generator slides per sample, so no slide is in two folds).
    Each of the `n_genes` benchmark genes has a Poisson rate log-linear in the tile's standardised mean
    colour and dark-pixel (nuclear) density; `extra_genes` more genes do not depend on the tile and are
    left out of `var_50genes.json`. `content` float [N, F]: per-tile features to use instead (e.g. the
    generator's latents of `latent_crops`, so the expression follows the tissue, not its staining). The
    AnnData rows are shuffled relative to the patch file, so readers must align by barcode. Folds leave one
    sample out (fold i tests sample i). `tables`: {file name: frame} written as Parquet into the task in
    the same atomic write (e.g. `LATENTS_FILE`). Raises BenchmarkError on bad tiles, fewer than 2 samples, a
    `content` or `sample_of` of another length, or an empty sample.
    """
    tiles, content_given = np.asarray(tiles), content
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8 or len(tiles) == 0:
        raise BenchmarkError(f"demo tiles must be uint8 [N, H, W, 3], got {tiles.dtype} {tiles.shape}")
    if n_samples < 2:
        raise BenchmarkError("the demo needs at least 2 samples (folds leave one sample out)")
    rng = np.random.default_rng(seed)
    if sample_of is None:
        n_spots = n_samples * spots_per_sample
        pick = rng.choice(len(tiles), n_spots, replace=len(tiles) < n_spots)
        groups = [pick[s * spots_per_sample : (s + 1) * spots_per_sample] for s in range(n_samples)]
    else:
        sample_of = np.asarray(sample_of)
        if len(sample_of) != len(tiles):
            raise BenchmarkError(f"demo HEST: {len(sample_of)} sample_of entries for {len(tiles)} tiles")
        groups = [np.flatnonzero(sample_of == s) for s in range(n_samples)]
        if empty := [s for s, g in enumerate(groups) if len(g) == 0]:
            raise BenchmarkError(f"demo HEST: sample(s) {empty} get no tile from sample_of")
        pick = np.concatenate(groups)
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
        "spots_per_sample": spots_per_sample if sample_of is None else [len(g) for g in groups],
        "n_genes": n_genes,
        "extra_genes": extra_genes,
        "sparse": sparse,
        "n_tiles": int(len(tiles)),
    }
    if content_given is not None:
        params["content"] = "given"
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        for sub in ("patches", "adata", "splits"):
            (tmp / sub).mkdir(parents=True)
        ids = [f"DEMO{s}" for s in range(n_samples)]
        start = 0
        for sid, group in zip(ids, groups, strict=True):
            n, rows = len(group), slice(start, start + len(group))
            start += n
            side = int(np.ceil(np.sqrt(n)))
            barcodes = np.array([f"SPOT{j:05d}-1" for j in range(n)])
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 100
            with h5py.File(tmp / "patches" / f"{sid}.h5", "w") as f:
                f.create_dataset("img", data=tiles[group], chunks=(1, *tiles.shape[1:]))
                f.create_dataset("barcode", data=barcodes.astype("S").reshape(-1, 1))
                f.create_dataset("coords", data=coords.astype(np.int64))
            order = rng.permutation(n)
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
        for name, table in (tables or {}).items():
            table.to_parquet(tmp / name, index=False)
        (tmp / "provenance.json").write_text(
            json.dumps(provenance(params, generator="make_demo_hest"), indent=1)
        )
    log.info("demo HEST task: %d samples, %d spots, %d genes → %s", n_samples, len(pick), n_genes, out_dir)
    return out_dir


def make_latent_hest_task(
    out_dir: str | Path,
    *,
    task: str,
    seed: int = 0,
    n_slides: int = 36,
    crops_per_slide: int = 10,
    width_px: int = 1024,
    height_px: int = 768,
    n_samples: int = 2,
) -> Path:
    """The demo HEST task `task` on latent crops: `latent_crops` of `n_slides` fresh slides
    (`crops_per_slide` each, slide names `demo-task-{task}:{i}`, seed `seed`), every crop one spot, the
    crops of slide i in sample i mod `n_samples` (no slide in two folds), expression driven by the crops'
    standardised latents (`make_demo_hest(content=latents)`, seeded `seed_for("hest:<task>", seed)`).

    Also writes `LATENTS_FILE` in the task: one row per spot in patch-file order, `sample_id`, `row` (the
    patch's row in its sample), `slide` (generator slide) and the latents (`demo.teacher.GLOBAL_TARGETS`),
    which `make_latent_probe` labels. Returns `out_dir`. Raises BenchmarkError when a sample gets no slide
    (`n_slides` < `n_samples`), HistodistillError when a slide holds no tissue crop (`render_slides`).
    Cost: about 0.3 CPU s per 1024 × 768 slide (1.5 s at 2048 × 1536) and 11 ms per crop (one rendering
    each): 36 × 10 at 1024 × 768, about 14 CPU s.
    """
    from histodistill.demo.slides import seed_for
    from histodistill.demo.teacher import GLOBAL_TARGETS

    crops = latent_crops(n_slides, crops_per_slide, seed, width_px, height_px, name=f"demo-task-{task}")
    sample_of = crops.slide % n_samples
    order = np.concatenate([np.flatnonzero(sample_of == s) for s in range(n_samples)])  # patch-file order
    latents = pd.DataFrame(
        {
            "sample_id": [f"DEMO{s}" for s in sample_of[order]],
            "row": np.concatenate([np.arange((sample_of == s).sum()) for s in range(n_samples)]),
            "slide": crops.slide[order],
            **{name: crops.latents[order, k] for k, name in enumerate(GLOBAL_TARGETS)},
        }
    )
    return make_demo_hest(
        out_dir,
        crops.tiles,
        seed=seed_for(f"hest:{task}", seed),
        n_samples=n_samples,
        content=crops.latents,
        sample_of=sample_of,
        tables={LATENTS_FILE: latents},
    )


def make_latent_probe(task_dir: str | Path, store_path: str | Path, out_csv: str | Path) -> pd.DataFrame:
    """The demo probe manifest on a latent HEST task's crops, in `PROBE_FOLDS` cross-validation folds over
    generator slides: for fold f, generator slide i goes to split `PROBE_SPLITS`[(i − f) mod 3] (fold 0:
    slides 0, 3, … train, 1, 4, … val, 2, 5, … test; over the folds every slide is tested once and never
    straddles two splits of a fold). One row per (fold, tile of `store_path`) (the task packed by
    `bench.datasets.pack_hest_task`, rows located by sample id and patch row, so any packing order works);
    `label` the nuclear-area tercile (`DEMO_CLASSES`, cut on that fold's training split, `latent_class`);
    no `slide_id` column (that would make it a slide-level task). Writes CSV `tile_index, label, split,
    fold` atomically (`bench.probe.load_manifest` reads the folds; the score is their mean); returns it.

    Raises BenchmarkError when the task has no `LATENTS_FILE` (not made by `make_latent_hest_task`), when a
    tile of the store has no latent row, or when the crops come from fewer than 3 slides.
    """
    latents_path = Path(task_dir) / LATENTS_FILE
    if not latents_path.is_file():
        raise BenchmarkError(
            f"demo probe: {latents_path} is missing; the task must be made by make_latent_hest_task "
            "(rule hest_demo)"
        )
    latents = pd.read_parquet(latents_path).set_index(["sample_id", "row"])
    index = TileStore(store_path).index
    keys = pd.MultiIndex.from_arrays([index["slide_id"], index["tile_id"]])
    if missing := (~keys.isin(latents.index)).sum():
        raise BenchmarkError(f"demo probe: {missing} tiles of {store_path} have no row in {latents_path}")
    rows = latents.loc[keys]
    slide = rows["slide"].to_numpy()
    if len(np.unique(slide)) < 3:
        raise BenchmarkError(
            f"demo probe: {latents_path} has crops of fewer than 3 slides (one each for train, val, test)"
        )
    folds = []
    for fold in range(PROBE_FOLDS):
        split = np.array(PROBE_SPLITS, dtype=object)[(slide - fold) % 3]
        classes = latent_class(rows["nuclei"].to_numpy(), split == "train")
        folds.append(
            pd.DataFrame(
                {
                    "tile_index": np.arange(len(index)),
                    "label": np.array(DEMO_CLASSES, dtype=object)[classes],
                    "split": split,
                    "fold": fold,
                }
            )
        )
    frame = pd.concat(folds, ignore_index=True)
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    return frame
