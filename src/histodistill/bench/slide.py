"""EVA's slide-level tasks (Camelyon16-small, PANDA-small): ABMIL on frozen tile embeddings, EVA's settings.

The head, its training and its scoring are `histodistill.bench.probe`'s ABMIL (`score_bags`, `AbmilConfig`);
this module is the benchmark around it: its tasks and their layouts, the `score_slide` rule's entry point
(`run`), the summary (mean ± sample std over runs) and the report's section. Scores are on the test split
(EVA: "evaluation results are reported on the test split if available").

EVA's settings, read at kaiko-ai/eva 0.4.5+1, commit 73b61a79 (the same commit as the patch tasks'), files
under `configs/vision/pathology/offline/classification/` (C16 = `camelyon16_small.yaml`, PS =
`panda_small.yaml`) and `src/eva/` (line numbers of that commit); pinned by tests/unit/test_bench_slide.py:

=====================  ===========================================  =====================================
setting                value (AbmilConfig field)                    source
=====================  ===========================================  =====================================
head                   ABMIL: Linear(D→128) projection, gated       C16 L55-60, PS L54-59;
                       attention (tanh ⊙ sigmoid, hidden 128,       `vision/models/networks/abmil.py`
                       biases), attention-weighted mean, MLP        L34-46 (defaults), L67-90, L161-168
                       (128, 64; ReLU) → logits (projected_dim,
                       hidden_attention, hidden_mlp)
dropout                none (every ABMIL dropout defaults to 0.0)   abmil.py L42-44
outputs / loss         Camelyon16: 1 logit + BCEWithLogits;         C16 L59, L61; PS L58, L60
                       PANDA: 6 logits + cross-entropy
optimizer              AdamW lr 1e-3, betas (0.9, 0.999), torch's   C16 L62-66, PS L61-65
                       weight decay 0.01 (lr, weight_decay)
lr schedule            none in the configs → HeadModule's default   `core/models/modules/head.py` L32,
                       ConstantLR(factor 1/3, 5 epochs), per epoch  L73-77 (low_lr_factor, low_lr_epochs)
batch                  32 slides, shuffled (batch_size)             C16 L126-128, PS L125-127
epochs                 at most 100, one validation each             C16 L7, PS L7 (max_epochs)
early stopping         patience 20 validations, min_delta 0, mode   C16 L24-31, PS L24-31 (patience,
                       max; Camelyon16 monitors val/BinaryBalanced  monitor); `core/metrics/defaults/
                       Accuracy, PANDA val/MulticlassAccuracy       classification/multiclass.py` L16,
                       (macro = balanced accuracy)                  L36-40
checkpoint             the best validation epoch is tested          C16 L8, L19-25
runs                   20, one after another, seeded once (42)      C16 L5, PS L5; `core/trainers/
                       (seeds: 20 labels; seeding once, seed 42)    functional.py` L46-55; `core/cli/
                                                                    setup.py` L24, L36
tiles per slide        Camelyon16-small 1,000, PANDA-small 200:     C16 L84, L102-104; PS L85, L101-103;
                       the first foreground tiles of the grid       `vision/data/wsi/patching/samplers/
                       shuffled by default_rng(42) (max_tiles,      foreground_grid.py` L12-18, L54-72,
                       tile_seed; padded with -inf and masked)      `_utils.py` L24-32; `core/data/
                                                                    transforms/padding/pad_2d_tensor.py`
tiles                  224 px; Camelyon16 at 0.25 µm/px, PANDA at   C16 L105-107, PS L104-106
                       0.5 µm/px (our tiler: tiling.mpp)
leaderboard metric     balanced accuracy on test; 20 runs for       `docs/leaderboards.md` L11, L56
                       slide tasks
=====================  ===========================================  =====================================

Layouts (EVA's datasets, `src/eva/vision/data/datasets/classification/`):

- **Camelyon16-small** (`camelyon16.py`): the 399 Camelyon16 slides, `training/{normal,tumor}/*.tif` and
  `testing/images/*.tif`; labels normal / tumor from the file name (training, L237-246) or
  `testing/reference.csv` (test, L137-141); train = the 216 training slides not in EVA's 54 validation
  slides (PatchCamelyon's, L21-76), val = those 54, test = the 129 test slides (L179-184, L214-235).
  `camelyon16_slides(root)` writes this table. "small" is the 1,000 tiles per slide, not fewer slides.
- **PANDA-small** (`panda.py`): the PANDA `train_images/*.tiff` with `isup_grade` labels 0-5 from
  `train_with_noisy_labels.csv` (L33-39, L189-190), keeping the images whose `noise_ratio_10` is not 0
  (L179-187, as the code reads), then EVA's stratified split with seed 42 (`core/data/splitting/
  stratified.py` L67-95) at PANDASmall's ratios 10 % / 5 % / 5 % (L196-206): 955 / 477 / 477 slides.
  `panda_small_slides(labels_csv, image_ids)` writes this table.

A task is `dataset` (an embedded cohort: the slides, tiled by our tiler at `tiling.mpp`) and `manifest`, a
CSV with `slide_id, label, split` (each slide's bag is all of its tiles, then `max_tiles`) or with
`slide_id, tile_index, label, split` (explicit bags, rows of the embedding store; a tile may be in several
bags). A task named as EVA's (`camelyon16_small`, `panda_small`) counts in the EVA average
(`histodistill.bench.eva`); `eva:` gives it EVA's settings (`EVA_ABMIL`).

Deliberate deviations: our tiler's grid and tissue test replace EVA's foreground sampler (the same number
of uniformly drawn tissue tiles, not the same tiles); our tiling runs at one `tiling.mpp` per run, so
Camelyon16 tiles at EVA's 0.25 µm/px need a run (or cohort) tiled at 0.25; the random stream is ours (runs
are EVA's in structure, not bit for bit).

The demo task (`histodistill.demo.slide_task.make_demo_slide_task`) is not a slide cohort: see its
docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.chance import CHANCE_SE
from histodistill.bench.probe import (
    EVA_ABMIL,
    METRICS,
    ROW_COLUMNS,
    AbmilConfig,
    abmil_config,
    score_bags,
    summarize,
)
from histodistill.bench.registry import Benchmark, by_model, complete_mean, complete_mean_se

log = logging.getLogger(__name__)

__all__ = [
    "EVA_ABMIL",
    "camelyon16_slides",
    "load_slide_manifest",
    "panda_small_slides",
    "run",
    "slide_bags",
]

SLIDE_COLUMNS = ("slide_id", "label", "split")


# ----------------------------------------------------------------------------------------- manifests


def load_slide_manifest(path: str | Path) -> pd.DataFrame:
    """Read a slide task's manifest: CSV `slide_id, label, split[, tile_index]` (all as strings but
    tile_index). Raises BenchmarkError for a missing file or column, an empty table, a non-integer
    tile_index, or a slide whose rows disagree on label or split (naming the slide and the CSV line)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"slide manifest {path} does not exist")
    frame = pd.read_csv(path, dtype={"slide_id": str, "label": str, "split": str}, keep_default_na=False)
    if missing := [c for c in SLIDE_COLUMNS if c not in frame.columns]:
        raise BenchmarkError(
            f"slide manifest {path} lacks column {missing[0]!r} (needs {list(SLIDE_COLUMNS)})"
        )
    if frame.empty:
        raise BenchmarkError(f"slide manifest {path} has no rows")
    if "tile_index" in frame.columns:
        index = pd.to_numeric(frame["tile_index"], errors="coerce")
        bad = np.flatnonzero(index.isna().to_numpy() | (index.to_numpy() % 1 != 0) | (index.to_numpy() < 0))
        if bad.size:
            raise BenchmarkError(
                f"slide manifest {path}: line {bad[0] + 2} has tile_index "
                f"{frame['tile_index'].iloc[bad[0]]!r}, not an integer ≥ 0"
            )
        frame["tile_index"] = index.astype(np.int64)
    for column in ("label", "split"):
        counts = frame.groupby("slide_id", sort=False)[column].nunique()
        if (counts > 1).any():
            sid = counts.index[np.argmax(counts.to_numpy() > 1)]
            raise BenchmarkError(
                f"slide manifest {path}: slide {sid!r} has rows with different {column}s "
                f"{sorted(frame.loc[frame.slide_id == sid, column].unique())}"
            )
    return frame


def slide_bags(
    manifest: pd.DataFrame,
    embeddings: np.ndarray,
    tile_slide_ids: Sequence[str] | None = None,
    where: str = "",
) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    """The bags of a slide manifest: (bags [n_i, D], labels, splits, slide ids), in manifest order of slides.

    With a `tile_index` column, a bag is its rows of `embeddings` [N, D]; without, it is every tile whose
    slide (`tile_slide_ids[i]`: tile i's slide id, from the embedding store) is the row's slide. Raises
    BenchmarkError for a tile_index beyond the embeddings or a slide with no tiles.
    """
    slides = list(dict.fromkeys(manifest["slide_id"]))
    first = manifest.drop_duplicates("slide_id").set_index("slide_id")
    if "tile_index" in manifest.columns:
        too_big = manifest["tile_index"].to_numpy() >= len(embeddings)
        if too_big.any():
            row = manifest[too_big].iloc[0]
            raise BenchmarkError(
                f"{where}: slide {row.slide_id!r} points at tile_index {row.tile_index}, but the embeddings "
                f"have {len(embeddings)} rows"
            )
        rows = manifest.groupby("slide_id", sort=False)["tile_index"].apply(np.asarray).to_dict()
    else:
        if tile_slide_ids is None:
            raise BenchmarkError(f"{where}: a manifest without tile_index needs each tile's slide id")
        owner = pd.Series(np.arange(len(tile_slide_ids))).groupby(np.asarray(tile_slide_ids, dtype=object))
        rows = {sid: idx.to_numpy() for sid, idx in owner}
    empty = [s for s in slides if len(rows.get(s, ())) == 0]
    if empty:
        raise BenchmarkError(
            f"{where}: slide {empty[0]!r} has no tiles in the embeddings (is it in the task's dataset, "
            "and did its tiling find tissue?)"
        )
    bags = [np.asarray(embeddings[np.sort(rows[s])]) for s in slides]
    return bags, [first.loc[s, "label"] for s in slides], [first.loc[s, "split"] for s in slides], slides


def camelyon16_slides(root: str | Path) -> pd.DataFrame:
    """EVA's Camelyon16 slide table (slide_id, label, split) from a Camelyon16 folder in EVA's layout:
    `training/normal/*.tif`, `training/tumor/*.tif`, `testing/images/*.tif`, `testing/reference.csv`
    (slide, class, …; no header). Splits and labels as `eva.vision.datasets.Camelyon16` (see the module
    docstring). Raises BenchmarkError for a missing folder or a test slide without a reference label."""
    root = Path(root)
    for part in ("training/normal", "training/tumor", "testing/images"):
        if not (root / part).is_dir():
            raise BenchmarkError(f"Camelyon16: {root / part} does not exist (EVA's layout)")
    reference = root / "testing" / "reference.csv"
    if not reference.is_file():
        raise BenchmarkError(f"Camelyon16: {reference} does not exist (the test labels)")
    ref = pd.read_csv(reference, header=None)
    test_labels = {str(k): str(v).lower() for k, v in zip(ref[0], ref[1], strict=True)}
    rows = []
    for path in sorted((root / "training").glob("*/*.tif")):
        sid = path.stem
        rows.append((sid, sid.split("_")[0], "val" if sid in CAMELYON16_VAL else "train"))
    for path in sorted((root / "testing" / "images").glob("*.tif")):
        if path.stem not in test_labels:
            raise BenchmarkError(f"Camelyon16: test slide {path.stem!r} has no label in {reference}")
        rows.append((path.stem, test_labels[path.stem], "test"))
    return pd.DataFrame(rows, columns=list(SLIDE_COLUMNS))


def panda_small_slides(labels_csv: str | Path, image_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """EVA's PANDA-small slide table (slide_id, label, split) from `train_with_noisy_labels.csv` (columns
    image_id, isup_grade, noise_ratio_10): the images EVA keeps (`noise_ratio_10` ≠ 0, as its code reads),
    split per ISUP grade with EVA's stratified split (numpy `default_rng(42)` shuffles each grade's indices,
    in grade order; floor(10 %) train, floor(5 %) val, floor(5 %) test, each at least 1), on the images in
    sorted file order. `image_ids`: the images present (default: every image in the CSV). Slides outside
    the 20 % are left out."""
    labels = pd.read_csv(labels_csv, dtype={"image_id": str})
    for column in ("image_id", "isup_grade", "noise_ratio_10"):
        if column not in labels.columns:
            raise BenchmarkError(f"PANDA: {labels_csv} lacks column {column!r}")
    labels = labels.set_index("image_id")
    ids = sorted(image_ids if image_ids is not None else labels.index)
    unknown = [i for i in ids if i not in labels.index]
    if unknown:
        raise BenchmarkError(f"PANDA: image {unknown[0]!r} is not in {labels_csv}")
    ids = [i for i in ids if labels.loc[i, "noise_ratio_10"] != 0]
    targets = np.array([int(labels.loc[i, "isup_grade"]) for i in ids])
    rng = np.random.default_rng(42)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for grade in np.unique(targets):
        members = np.flatnonzero(targets == grade)
        rng.shuffle(members)
        n_train = int(np.floor(0.1 * len(members))) or 1
        n_val = int(np.floor(0.05 * len(members))) or 1
        n_test = int(np.floor(0.05 * len(members))) or 1
        parts["train"] += members[:n_train].tolist()
        parts["val"] += members[n_train : n_train + n_val].tolist()
        parts["test"] += members[n_train + n_val : n_train + n_val + n_test].tolist()
    rows = [(ids[i], str(targets[i]), split) for split, members in parts.items() for i in members]
    return pd.DataFrame(rows, columns=list(SLIDE_COLUMNS))


# EVA's validation slides of Camelyon16 (PatchCamelyon's; eva/vision/data/datasets/classification/
# camelyon16.py L21-76 at commit 73b61a79).
CAMELYON16_VAL = frozenset(
    [f"normal_{i:03d}" for i in (10, 13, 16, 17, 19, 20, 25, 30, 31, 32, 52, 56, 57, 67, 76, 79, 85, 95)]
    + [f"normal_{i:03d}" for i in (98, 99, 101, 102, 105, 106, 109, 129, 132, 137, 142, 143, 148, 152)]
    + [f"tumor_{i:03d}" for i in (1, 5, 11, 12, 13, 19, 31, 37, 43, 46, 57, 65, 69, 71, 73, 79, 80, 81)]
    + [f"tumor_{i:03d}" for i in (82, 85, 97, 109)]
)


# ----------------------------------------------------------------------------------------- scoring


def task_config(task: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> AbmilConfig:
    """A task's ABMIL settings: EVA's when it names an EVA task (`eva`), else `base`; then its `abmil`."""
    return abmil_config(base, task.get("eva"), task.get("abmil"))


def run(
    tasks: Mapping[str, Mapping[str, Any]],
    embedding_stores: Sequence[str | Path],
    out: str | Path,
    *,
    model: str,
    abmil: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Score one model on every slide task and write the tidy rows to Parquet `out`, with provenance.

    `tasks[name]`: `manifest` (see `load_slide_manifest`) and optionally `eva` (camelyon16_small,
    panda_small: `EVA_ABMIL`) and `abmil` (overrides); `embedding_stores[i]`: the model's embedding store
    of task i's dataset. `abmil`: the base settings of tasks without `eva`. Returns the rows (task, method
    "abmil", seed, metric, value). Raises BenchmarkError when the lists differ in length or a manifest
    does not fit its embeddings.
    """
    from histodistill.bench import write_scores
    from histodistill.embed import EmbeddingStore
    from histodistill.provenance import provenance

    if len(tasks) != len(embedding_stores):
        raise BenchmarkError(f"{len(tasks)} slide task(s) but {len(embedding_stores)} embedding store(s)")
    frames = []
    for (name, task), emb_path in zip(tasks.items(), embedding_stores, strict=True):
        store = EmbeddingStore(emb_path)
        embeddings = store.embeddings
        manifest = load_slide_manifest(task["manifest"])
        tile_slides = None
        if "tile_index" not in manifest.columns:
            slides = store.attrs.get("provenance", {}).get("slides", [])
            ids = np.array([s["slide_id"] for s in slides], dtype=object)
            tile_slides = ids[store.root["slide_index"][:]]  # each tile's slide
        bags, labels, splits, names = slide_bags(manifest, embeddings, tile_slides, f"slide task {name}")
        cfg = task_config(task, abmil)
        log.info("slide task %s: %d slides, settings %s", name, len(bags), cfg)
        frames.append(score_bags(bags, labels, splits, name, cfg, names=names))
    rows = pd.concat(frames, ignore_index=True)
    params = {"tasks": {k: dict(v) for k, v in tasks.items()}, "abmil": dict(abmil or {})}
    write_scores(rows, out, provenance(params, benchmark="slide", model=model))
    return rows


# ----------------------------------------------------------------------------------------- report


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    rows = summary[(summary["method"] == "abmil") & (summary["metric"] == "balanced_accuracy")]
    return by_model(
        {"slide_balanced_accuracy": complete_mean(rows, "mean", models) if len(rows) else {}}, models
    )


def _errors(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """The null standard error of the headline (ABMIL balanced accuracy averaged over tasks): each task's
    recorded `CHANCE_SE` (`bench.chance.chance_metrics` of its test labels), combined by `complete_mean_se`."""
    rows = summary[(summary["method"] == "abmil") & (summary["metric"] == CHANCE_SE)]
    return by_model(
        {"slide_balanced_accuracy": complete_mean_se(rows, "mean", models) if len(rows) else {}}, models
    )


def eva_scores(summary: pd.DataFrame) -> pd.DataFrame:
    """The EVA leaderboard's numbers of this benchmark: per model and task, ABMIL's mean balanced accuracy."""
    rows = summary[(summary["method"] == "abmil") & (summary["metric"] == "balanced_accuracy")]
    return rows[["model", "task"]].assign(value=rows["mean"].to_numpy())


def _section(summary: pd.DataFrame, models: Sequence[str], figs) -> str:
    from histodistill.report import html as page

    if summary.empty:
        return page.note("No slide-level scores.")
    body = page.note(
        "ABMIL on each slide's tile embeddings with EVA's settings (AdamW 1e-3, batch 32, ≤ 100 epochs, early "
        "stopping on validation balanced accuracy, patience 20); mean ± sample std over the runs (EVA: 20), "
        "on the test split."
    )
    for metric in METRICS:
        rows = summary[(summary["metric"] == metric) & (summary["method"] == "abmil")]
        if len(rows):
            cell = lambda r: page.fmt_pm(r["mean"], r["std"])  # noqa: E731
            body += f"<h3>{page.esc(metric.replace('_', ' '))}</h3>" + page.wide_table(
                rows, ["task"], models, cell
            )
    return body


BENCHMARK = Benchmark(
    name="slide",
    title="Slide-level classification (ABMIL)",
    order=32,
    columns=frozenset(ROW_COLUMNS),
    summarize=summarize,
    headline=_headline,
    section=_section,
    labels={"slide_balanced_accuracy": "slide bal. acc. (ABMIL, mean over tasks)"},
    # No collapse flag from slide-level tasks: a weak slide label at chance (the demo's bags are, for every
    # model) says nothing about the tile embeddings; the patch probes judge that (probe_flags in bench/probe).
    errors=_errors,
    eva_scores=eva_scores,
)
