"""Classification probes on frozen embeddings: EVA linear probe, DINO k-NN, UNI logistic regression, ABMIL.

Protocols and the sources they were checked against:

- **Linear probe (kaiko-ai/eva `configs/vision/pathology/offline/classification/{bach,crc,mhist,
  patch_camelyon}.yaml` and `eva.HeadModule`; read at eva 0.4.5+1, commit 73b61a79 of 2026-04-29, the
  settings unchanged since eva 0.2.1)**: a `torch.nn.Linear` head (one logit + BCE for two classes, K logits +
  cross-entropy otherwise, as EVA's binary/multiclass configs), `torch.optim.AdamW(lr 3e-4)` (torch's
  other defaults: betas (0.9, 0.999), weight decay 0.01), batch 256 with shuffling, a budget of 12,500
  steps, validation every epoch (Lightning's default; `eval_every` overrides it), early stopping when the
  monitored validation metric has not strictly improved for `patience` checks (Lightning `EarlyStopping`,
  `min_delta` 0, mode max), and the best checkpoint is the one evaluated (`checkpoint_type: best`).
  Learning rate: EVA's configs set no scheduler, so `HeadModule`'s default applies, torch's
  `ConstantLR` with its defaults (factor 1/3, total_iters 5) stepped once per epoch (Lightning's default
  interval): lr/3 for the first 5 epochs, then lr (`low_lr_factor`, `low_lr_epochs`). Seeding: EVA seeds
  once (`seed_everything(42)`, its `EVA_GLOBAL_SEED`) and runs its 5 runs one after the other from that
  stream; `seeding: once` does the same with one torch generator seeded with `seed` (head init and batch
  order of run i continue where run i − 1 stopped; `seeds` then only label the runs), `seeding: per_run`
  reseeds each run with its entry of `seeds`. Per-task settings (`EVA_LINEAR`):

  ========  ========  =========  ============================================  ==================
  task      patience  max steps  monitored (EVA name)                          EVA's validation
  ========  ========  =========  ============================================  ==================
  BACH      1250      12,500     val/MulticlassAccuracy (macro = bal. acc.)    val
  CRC       7         12,500     val/MulticlassAccuracy (macro = bal. acc.)    val (CRC-VAL-HE-7K)
  MHIST     278       12,500     val/BinaryBalancedAccuracy                    the test split
  PCam      3         12,500     val/BinaryBalancedAccuracy                    val (test separate)
  ========  ========  =========  ============================================  ==================

  Every task: batch 256, AdamW lr 3e-4, ConstantLR(1/3, 5 epochs), 5 runs seeded once with 42. Mean ±
  sample std over the runs (EVA's `statistics.stdev`). Deliberate deviations: the generator is ours, so
  the runs are EVA's in structure, not bit for bit (Lightning draws its sampler seeds from the global RNG);
  the split that early-stops the head is the manifest's `val` (EVA's MHIST config early-stops on test).
- **k-NN (DINO's `knn_classifier`)**: cosine similarity of L2-normalised features, the k most similar
  training tiles vote with weight exp(sim / 0.07); computed block by block (queries × training blocks,
  keeping a running top-k), never as an all-pairs matrix. k is chosen on the validation split (best
  balanced accuracy, smallest k on ties) from `ks` (default 1, 2, 5, 10, 20, 50); the test split is scored
  at that k. Without a validation split DINO's k = 20 is used.
- **Logistic regression (mahmoodlab/UNI `eval_patch_features/linear_probe.py`)**: L-BFGS, 1000 iterations,
  C = 1/λ with λ = 100 / (D · K) (UNI: `cost = feats.shape[1] * NUM_C / 100`), fitted on train + val
  (UNI's `combine_trainval=True`). Here sklearn's `LogisticRegression` on standardised features, as
  requested; UNI's default path is its own torch L-BFGS on un-standardised features, whose penalty is
  (1/C)·0.5·‖W‖₂ added to the *mean* loss, so the two are not numerically identical.
- **Metrics**: balanced accuracy, weighted F1, AUROC (binary: the positive class's probability;
  multiclass: one-vs-rest, macro over the classes present in the evaluated split). Every run also records
  its balanced accuracy's chance level and null standard error (`chance_metrics`), from which the report
  flags a model whose probes are at chance (`at_chance`, `probe_flags`).
- **ABMIL (Ilse et al. 2018, gated attention; EVA's `vision/models/networks/abmil.py` with the settings of
  its `camelyon16_small.yaml` and `panda_small.yaml`, eva 0.4.5+1, commit 73b61a79)**: Linear projection
  to 128 → gated attention (tanh ⊙ sigmoid, hidden 128, with biases) → attention-weighted mean → MLP
  (128, 64; ReLU) → logits, no dropout anywhere; AdamW(lr 1e-3, torch's weight decay 0.01), lr/3 for the
  first 5 epochs (ConstantLR: EVA's configs set no scheduler), batch 32 slides (padded and masked), at
  most 100 epochs with one validation each, early stopping on validation balanced accuracy with patience
  20 (best state kept), 20 runs seeded once with 42, at most 1,000 (Camelyon16-small) or 200
  (PANDA-small) tiles per slide. `histodistill.bench.slide` scores EVA's slide tasks with it; its
  docstring has the table of sources (file and line).

Inputs stay in memory: X [N, D] floats, y [N] labels, split [N] in {train, val, test}, and for slide tasks
the slide id of each tile. Scores come back as tidy rows: task, method, seed, metric, value. Methods
without randomness (k-NN, logistic regression) report one run, with seed 0.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from torch import nn

from histodistill.bench import BenchmarkError
from histodistill.bench.chance import CHANCE, CHANCE_SE, at_chance, at_chance_reason, chance_metrics
from histodistill.bench.registry import Benchmark, Figure, by_model, complete_mean, complete_mean_se
from histodistill.devices import torch_threads

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("tile_index", "label", "split")
ROW_COLUMNS = ["task", "method", "seed", "metric", "value"]
METRICS = ("balanced_accuracy", "f1_weighted", "auroc")


# ----------------------------------------------------------------------------------------- configs


MONITORS = ("balanced_accuracy", "accuracy")
SEEDING = ("once", "per_run")


@dataclass(frozen=True)
class LinearProbeConfig:
    """EVA's offline linear-probe settings (defaults: EVA's CRC config); `eval_every=None` validates once per
    epoch. `patience` counts validation checks without improvement (None: never stop); `monitor` is the
    validation metric that early-stops and selects the head; the lr is `lr · low_lr_factor` for the first
    `low_lr_epochs` epochs (EVA: torch `ConstantLR` defaults; 0 epochs: constant); `seeding` once (EVA: one
    stream seeded with `seed` for all runs) or per_run (each run seeded with its entry of `seeds`).
    `EVA_LINEAR` holds each EVA task's settings.
    """

    max_steps: int = 12_500
    batch_size: int = 256
    lr: float = 3e-4
    eval_every: int | None = None
    patience: int | None = 7
    monitor: str = "balanced_accuracy"
    low_lr_factor: float = 1 / 3
    low_lr_epochs: int = 5
    seeding: str = "once"
    seed: int = 42
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    threads: int | None = 1  # torch threads while training; None leaves torch's setting

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise BenchmarkError(f"linear probe: monitor {self.monitor!r} is not one of {MONITORS}")
        if self.seeding not in SEEDING:
            raise BenchmarkError(f"linear probe: seeding {self.seeding!r} is not one of {SEEDING}")
        if not 0 < self.low_lr_factor <= 1:
            raise BenchmarkError(f"linear probe: low_lr_factor {self.low_lr_factor} is not in (0, 1]")


# EVA's per-task linear-probe settings (kaiko-ai/eva 0.4.5+1, commit 73b61a79; unchanged since 0.2.1):
# configs/vision/pathology/offline/classification/{bach,crc,mhist,patch_camelyon}.yaml. EVA's multiclass
# `MulticlassAccuracy` is macro-averaged, i.e. balanced accuracy; its binary tasks monitor
# `BinaryBalancedAccuracy`. Pinned by tests/unit/test_bench_probe.py.
_EVA = LinearProbeConfig()
EVA_LINEAR: dict[str, LinearProbeConfig] = {
    "bach": replace(_EVA, patience=1250),
    "crc": replace(_EVA, patience=7),
    "mhist": replace(_EVA, patience=278),
    "pcam": replace(_EVA, patience=3),
}


def linear_config(
    base: LinearProbeConfig | Mapping[str, Any] | None = None,
    eva: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LinearProbeConfig:
    """A task's linear-probe settings: EVA's for task `eva` (one of `EVA_LINEAR`) or else `base` (a config or
    a mapping of `LinearProbeConfig` fields), then the task's `overrides`. Raises BenchmarkError for an
    unknown EVA task or setting."""
    if eva is not None:
        if eva not in EVA_LINEAR:
            raise BenchmarkError(f"probe: unknown EVA task {eva!r}; expected one of {sorted(EVA_LINEAR)}")
        cfg = EVA_LINEAR[eva]
    elif isinstance(base, LinearProbeConfig):
        cfg = base
    else:
        cfg = _from_mapping(LinearProbeConfig(), base or {})
    return _from_mapping(cfg, overrides or {})


def _from_mapping(cfg: LinearProbeConfig, values: Mapping[str, Any]) -> LinearProbeConfig:
    known = {f.name for f in fields(LinearProbeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BenchmarkError(f"linear probe: unknown setting {unknown[0]!r} (settings: {sorted(known)})")
    values = dict(values)
    if "seeds" in values:
        values["seeds"] = tuple(values["seeds"])
    return replace(cfg, **values)


@dataclass(frozen=True)
class KnnConfig:
    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50)  # tried on validation (config key benchmarks.probe.knn_ks)
    temperature: float = 0.07
    block_size: int = 1024
    default_k: int = 20  # DINO's default, used when there is no validation split
    report_all_k: bool = False  # also emit rows for every k (method "knn_k{k}")


@dataclass(frozen=True)
class LogRegConfig:
    max_iter: int = 1000
    standardize: bool = True
    combine_trainval: bool = True


@dataclass(frozen=True)
class AbmilConfig:
    """EVA's slide-level ABMIL settings (defaults: EVA's `camelyon16_small.yaml` / `panda_small.yaml`, which
    differ only in `max_tiles`; `EVA_ABMIL` holds each task's). `patience` counts epochs (one validation
    each) without a strict improvement of `monitor` (None: never stop); the lr is `lr · low_lr_factor` for
    the first `low_lr_epochs` epochs (torch `ConstantLR`); `max_tiles` keeps at most that many tiles per
    slide, a subset drawn once with `numpy.random.default_rng(tile_seed)` (None: every tile); `seeding` as
    `LinearProbeConfig`'s (once: one stream seeded with `seed`; per_run: each run with its `seeds` entry).
    """

    max_epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    projected_dim: int | None = 128
    hidden_attention: int = 128
    hidden_mlp: tuple[int, ...] = (128, 64)
    patience: int | None = 20
    monitor: str = "balanced_accuracy"
    low_lr_factor: float = 1 / 3
    low_lr_epochs: int = 5
    max_tiles: int | None = None
    tile_seed: int = 42
    seeding: str = "once"
    seed: int = 42
    seeds: tuple[int, ...] = tuple(range(20))
    threads: int | None = 1  # torch threads while training; None leaves torch's setting

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise BenchmarkError(f"ABMIL: monitor {self.monitor!r} is not one of {MONITORS}")
        if self.seeding not in SEEDING:
            raise BenchmarkError(f"ABMIL: seeding {self.seeding!r} is not one of {SEEDING}")
        if not 0 < self.low_lr_factor <= 1:
            raise BenchmarkError(f"ABMIL: low_lr_factor {self.low_lr_factor} is not in (0, 1]")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise BenchmarkError(f"ABMIL: max_tiles {self.max_tiles} is not ≥ 1 (or None)")


# EVA's per-task ABMIL settings (kaiko-ai/eva 0.4.5+1, commit 73b61a79):
# configs/vision/pathology/offline/classification/{camelyon16_small,panda_small}.yaml. They differ only in
# the tiles per slide (N_PATCHES: 1000 and 200); every other setting is AbmilConfig's default. Pinned by
# tests/unit/test_bench_slide.py; the table is in histodistill.bench.slide's docstring.
EVA_ABMIL: dict[str, AbmilConfig] = {
    "camelyon16_small": AbmilConfig(max_tiles=1000),
    "panda_small": AbmilConfig(max_tiles=200),
}


def abmil_config(
    base: AbmilConfig | Mapping[str, Any] | None = None,
    eva: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AbmilConfig:
    """A slide task's ABMIL settings: EVA's for task `eva` (one of `EVA_ABMIL`) or else `base` (a config or
    a mapping of `AbmilConfig` fields), then the task's `overrides`. Raises BenchmarkError for an unknown
    EVA task or setting."""
    if eva is not None:
        if eva not in EVA_ABMIL:
            raise BenchmarkError(f"ABMIL: unknown EVA task {eva!r}; expected one of {sorted(EVA_ABMIL)}")
        cfg = EVA_ABMIL[eva]
    elif isinstance(base, AbmilConfig):
        cfg = base
    else:
        cfg = _replace_fields(AbmilConfig(), base or {}, "ABMIL")
    return _replace_fields(cfg, overrides or {}, "ABMIL")


def _replace_fields(cfg, values: Mapping[str, Any], what: str):
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BenchmarkError(f"{what}: unknown setting {unknown[0]!r} (settings: {sorted(known)})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return replace(cfg, **values)


# ----------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Encoded:
    """Labels as integer codes into `classes` (sorted training labels), with the split of each row."""

    classes: np.ndarray
    codes: np.ndarray
    split: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def validate_split(
    y: Sequence,
    split: Sequence[str],
    classes: Sequence | None = None,
    where: str = "input",
    row_names: Sequence | None = None,
) -> Encoded:
    """Check labels and splits (names the offending row or class) and encode the labels.

    Errors: lengths differ; a split other than train/val/test; a missing label; no training rows; fewer
    than two training classes; a declared class (`classes`) with no training rows; a val/test label never
    seen in training.
    """
    y = np.asarray(y, dtype=object)
    split = np.asarray(split, dtype=object)
    names = row_names if row_names is not None else [f"row {i}" for i in range(len(y))]
    if len(y) != len(split):
        raise BenchmarkError(f"{where}: {len(y)} labels but {len(split)} split entries")
    bad = [i for i, s in enumerate(split) if s not in SPLITS]
    if bad:
        raise BenchmarkError(
            f"{where}: {names[bad[0]]} has unknown split {split[bad[0]]!r}; expected {SPLITS}"
        )
    missing = [i for i, v in enumerate(y) if _is_missing(v)]
    if missing:
        raise BenchmarkError(f"{where}: {names[missing[0]]} has no label")
    masks = {s: split == s for s in SPLITS}
    if not masks["train"].any():
        raise BenchmarkError(f"{where}: no training rows (split == 'train')")
    train_classes = set(y[masks["train"]].tolist())
    if classes is not None:
        empty = [c for c in classes if c not in train_classes]
        if empty:
            raise BenchmarkError(f"{where}: class {empty[0]!r} has no training rows")
    if len(train_classes) < 2:
        raise BenchmarkError(
            f"{where}: the training split has a single class {sorted(train_classes, key=str)}"
        )
    for s in ("val", "test"):
        unseen = [i for i in np.flatnonzero(masks[s]) if y[i] not in train_classes]
        if unseen:
            i = unseen[0]
            raise BenchmarkError(f"{where}: {names[i]} in {s} has label {y[i]!r}, which no training row has")
    ordered = np.array(sorted(train_classes, key=lambda c: (str(type(c)), c)), dtype=object)
    lookup = {c: k for k, c in enumerate(ordered.tolist())}
    codes = np.array([lookup[v] for v in y.tolist()], dtype=np.int64)
    return Encoded(ordered, codes, split, masks)


@dataclass(frozen=True)
class Manifest:
    """Which embedding rows form the dataset, with their label, split and (optionally) slide."""

    tile_index: np.ndarray
    label: np.ndarray
    split: np.ndarray
    slide_id: np.ndarray | None = None
    path: Path | None = None
    fold: np.ndarray | None = None  # int [N]: cross-validation fold of each row (None: one split)

    def __len__(self) -> int:
        return len(self.tile_index)

    def folds(self) -> list[tuple[int | None, Manifest]]:
        """(fold, its rows as a manifest without folds) per fold in ascending order; [(None, self)] when the
        manifest has no `fold` column."""
        if self.fold is None:
            return [(None, self)]
        out = []
        for f in np.unique(self.fold):
            rows = self.fold == f
            slide_id = None if self.slide_id is None else self.slide_id[rows]
            out.append(
                (
                    int(f),
                    Manifest(self.tile_index[rows], self.label[rows], self.split[rows], slide_id, self.path),
                )
            )
        return out

    def select(self, embeddings: np.ndarray) -> np.ndarray:
        """The manifest's rows of an [N, D] embedding array, in manifest order."""
        n = len(embeddings)
        too_big = np.flatnonzero(self.tile_index >= n)
        if too_big.size:
            i = too_big[0]
            raise BenchmarkError(
                f"{self.path or 'manifest'}: row {i} points at tile_index {self.tile_index[i]}, "
                f"but the embeddings have {n} rows"
            )
        return np.asarray(embeddings[self.tile_index])


def load_manifest(path: str | Path, n_tiles: int | None = None, classes: Sequence | None = None) -> Manifest:
    """Read and validate a manifest CSV (or Parquet): tile_index, label, split[, slide_id][, fold].

    Labels and slide ids are read as strings. Rows are named by their CSV line in errors. With a `fold`
    column (integer ≥ 0) the manifest holds k cross-validation folds, each a complete manifest of its own
    (a tile once per fold at most, its own splits and labels, every fold validated as a manifest is):
    `run` scores every fold and the scores are the mean over folds and runs (e.g. the demo probe,
    `demo.tasks.make_latent_probe`). Raises BenchmarkError naming the path and line of a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"manifest {path} does not exist")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        offset = 0
    else:
        df = pd.read_csv(path, dtype={"label": str, "split": str, "slide_id": str}, keep_default_na=False)
        offset = 2  # header line + 1-based lines
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise BenchmarkError(f"manifest {path} lacks column {missing[0]!r} (needs {list(MANIFEST_COLUMNS)})")
    if df.empty:
        raise BenchmarkError(f"manifest {path} has no rows")
    where = f"manifest {path}"
    names = [f"line {i + offset}" if offset else f"row {i}" for i in range(len(df))]
    index = pd.to_numeric(df["tile_index"], errors="coerce")
    bad = np.flatnonzero(index.isna().to_numpy() | (index.to_numpy() % 1 != 0) | (index.to_numpy() < 0))
    if bad.size:
        i = bad[0]
        raise BenchmarkError(
            f"{where}: {names[i]} has tile_index {df['tile_index'].iloc[i]!r}, not an integer ≥ 0"
        )
    tile_index = index.to_numpy().astype(np.int64)
    fold = None
    if "fold" in df.columns:
        values = pd.to_numeric(df["fold"], errors="coerce")
        bad = np.flatnonzero(
            values.isna().to_numpy() | (values.to_numpy() % 1 != 0) | (values.to_numpy() < 0)
        )
        if bad.size:
            i = bad[0]
            raise BenchmarkError(f"{where}: {names[i]} has fold {df['fold'].iloc[i]!r}, not an integer ≥ 0")
        fold = values.to_numpy().astype(np.int64)
    keys = pd.DataFrame({"fold": 0 if fold is None else fold, "tile_index": tile_index})
    dup = np.flatnonzero(keys.duplicated().to_numpy())  # a tile once per fold
    if dup.size:
        in_fold = "" if fold is None else f" in fold {fold[dup[0]]}"
        raise BenchmarkError(f"{where}: {names[dup[0]]} repeats tile_index {tile_index[dup[0]]}{in_fold}")
    if n_tiles is not None and tile_index.max() >= n_tiles:
        i = int(np.argmax(tile_index))
        raise BenchmarkError(
            f"{where}: {names[i]} has tile_index {tile_index[i]} but there are {n_tiles} tiles"
        )
    label = df["label"].astype(object).to_numpy()
    split = df["split"].astype(object).to_numpy()
    slide_id = None
    if "slide_id" in df.columns:
        slide_id = df["slide_id"].astype(object).to_numpy()
        empty = [i for i, s in enumerate(slide_id) if _is_missing(s)]
        if empty:
            raise BenchmarkError(f"{where}: {names[empty[0]]} has no slide_id")
    manifest = Manifest(tile_index, label, split, slide_id, path, fold)
    for f, part in manifest.folds():
        rows = np.arange(len(df)) if fold is None else np.flatnonzero(fold == f)
        at = where if f is None else f"{where}, fold {f}"
        validate_split(part.label, part.split, classes=classes, where=at, row_names=[names[i] for i in rows])
        if part.slide_id is not None:
            _slide_groups(part.label, part.split, part.slide_id, at)
    return manifest


# ----------------------------------------------------------------------------------------- metrics


def auroc(codes: np.ndarray, proba: np.ndarray) -> float:
    """Binary: AUROC of the positive class; multiclass: one-vs-rest, macro over the classes present."""
    codes = np.asarray(codes)
    proba = np.asarray(proba, dtype=np.float64)
    present = np.unique(codes)
    if len(present) < 2:
        warnings.warn("AUROC undefined: the evaluated split has a single class", RuntimeWarning, stacklevel=2)
        return float("nan")
    if proba.shape[1] == 2:
        return float(roc_auc_score(codes == 1, proba[:, 1]))
    return float(np.mean([roc_auc_score(codes == c, proba[:, c]) for c in present]))


def classification_metrics(codes: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, weighted F1 and AUROC of class probabilities [n, K] against integer codes."""
    codes = np.asarray(codes)
    pred = np.asarray(proba).argmax(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bacc = balanced_accuracy_score(codes, pred)
    f1 = f1_score(codes, pred, average="weighted", labels=np.unique(codes), zero_division=0)
    return {"balanced_accuracy": float(bacc), "f1_weighted": float(f1), "auroc": auroc(codes, proba)}


def _balanced_accuracy(codes: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(codes, pred))


# ----------------------------------------------------------------------------------------- linear probe


@dataclass
class LinearProbeFit:
    head: nn.Linear
    n_classes: int
    best_step: int
    best_val: float
    steps_run: int
    lrs: list[float] = field(default_factory=list)  # the learning rate of each epoch run

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.head(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        return _logits_to_proba(logits, self.n_classes)


def _logits_to_proba(logits: torch.Tensor, n_classes: int) -> np.ndarray:
    if n_classes == 2:
        p = torch.sigmoid(logits[:, 0]).double().numpy()
        return np.stack([1.0 - p, p], 1)
    return torch.softmax(logits.double(), 1).numpy()


def _loss(n_classes: int):
    if n_classes == 2:
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, target: bce(logits[:, 0], target.float())
    return nn.CrossEntropyLoss()


def _monitored(monitor: str, codes: np.ndarray, pred: np.ndarray) -> float:
    if monitor == "accuracy":
        return float(np.mean(np.asarray(codes) == pred))
    return _balanced_accuracy(codes, pred)


def train_linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    n_classes: int,
    seed: int,
    config: LinearProbeConfig | None = None,
    generator: torch.Generator | None = None,
) -> LinearProbeFit:
    """Train EVA's linear head on integer codes; keep the state with the best monitored validation metric.

    x_train [n, D], y_train [n] integer codes in [0, n_classes). Randomness (the head's init, then the
    batch order) comes from `generator` when given, which it advances (EVA's one stream over its runs),
    else from a generator seeded with `seed`; the global torch RNG is left as it was. The learning rate is
    `lr · low_lr_factor` for the first `low_lr_epochs` epochs, then `lr` (torch `ConstantLR`, stepped per
    epoch as EVA's default scheduler); `LinearProbeFit.lrs` records each epoch's rate.
    """
    cfg = config or LinearProbeConfig()
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch_threads(cfg.threads):
        return _train_linear_probe(x_train, y_train, x_val, y_val, n_classes, gen, cfg)


def _train_linear_probe(x_train, y_train, x_val, y_val, n_classes: int, gen, cfg: LinearProbeConfig):
    x = torch.as_tensor(np.asarray(x_train, dtype=np.float32))
    t = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    n, dim = x.shape
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())  # nn.Linear draws its init from the global RNG
        head = nn.Linear(dim, 1 if n_classes == 2 else n_classes)
        gen.set_state(torch.get_rng_state())
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr)
    sched = None
    if cfg.low_lr_epochs > 0:
        sched = torch.optim.lr_scheduler.ConstantLR(
            opt, factor=cfg.low_lr_factor, total_iters=cfg.low_lr_epochs
        )
    loss_fn = _loss(n_classes)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    eval_every = cfg.eval_every or steps_per_epoch
    has_val = x_val is not None and len(x_val) > 0
    best, best_state, best_step, bad, step = -math.inf, None, 0, 0, 0
    lrs: list[float] = []
    stop = False
    while step < cfg.max_steps and not stop:
        lrs.append(float(opt.param_groups[0]["lr"]))
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = loss_fn(head(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if has_val and (step % eval_every == 0 or step == cfg.max_steps):
                fit = LinearProbeFit(head, n_classes, step, best, step)
                score = _monitored(cfg.monitor, y_val, fit.predict_proba(x_val).argmax(1))
                if score > best:  # strictly better, as Lightning's EarlyStopping/ModelCheckpoint (mode=max)
                    best, best_step, bad = score, step, 0
                    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                else:
                    bad += 1
                    stop = cfg.patience is not None and bad >= cfg.patience
            if step >= cfg.max_steps or stop:
                break
        if sched is not None:
            sched.step()  # end of the epoch (Lightning's default `interval: epoch`)
    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_step = step
    return LinearProbeFit(head, n_classes, best_step, best, step, lrs)


# ----------------------------------------------------------------------------------------- k-NN


def _l2_normalize(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return nn.functional.normalize(t, dim=1)


def knn_proba(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_query: np.ndarray,
    n_classes: int,
    ks: Sequence[int],
    temperature: float = 0.07,
    block_size: int = 1024,
) -> dict[int, np.ndarray]:
    """DINO's weighted k-NN: for each k, class votes Σ exp(sim / T) over the k nearest, normalised to 1.

    Cosine similarity on L2-normalised features; queries and the training bank are processed in blocks of
    `block_size`, keeping a running top-k, so memory is O(block² + block · k). k larger than the bank is
    clipped to the bank's size.
    """
    bank = _l2_normalize(x_train)
    labels = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    query = _l2_normalize(x_query)
    k_max = min(max(ks), len(bank))
    out = {k: np.zeros((len(query), n_classes)) for k in ks}
    for qs in range(0, len(query), block_size):
        q = query[qs : qs + block_size]
        top_sim = torch.empty((len(q), 0))
        top_idx = torch.empty((len(q), 0), dtype=torch.int64)
        for bs in range(0, len(bank), block_size):
            sim = q @ bank[bs : bs + block_size].T
            idx = torch.arange(bs, bs + sim.shape[1]).expand(len(q), -1)
            top_sim, pos = torch.cat([top_sim, sim], 1).topk(
                min(k_max, top_sim.shape[1] + sim.shape[1]), dim=1
            )
            top_idx = torch.cat([top_idx, idx], 1).gather(1, pos)
        # exp((s - s_max) / T): the same normalised votes as DINO's exp(s / T), without overflow
        weight = ((top_sim - top_sim[:, :1]) / temperature).double().exp()
        votes = nn.functional.one_hot(labels[top_idx], n_classes).double() * weight[..., None]
        cumulative = votes.cumsum(1)
        for k in ks:
            v = cumulative[:, min(k, k_max) - 1]
            out[k][qs : qs + len(q)] = (v / v.sum(1, keepdim=True)).numpy()
    return out


# ------------------------------------------------------------------------------------- logistic regression


def fit_logreg(x: np.ndarray, codes: np.ndarray, config: LogRegConfig | None = None):
    """UNI's logistic regression: L-BFGS, C = D·K/100 (λ = 100/(D·K)); returns a predict_proba callable."""
    cfg = config or LogRegConfig()
    x = np.asarray(x, dtype=np.float64)
    n_classes = len(np.unique(codes))
    scaler = StandardScaler().fit(x) if cfg.standardize else None
    c = x.shape[1] * n_classes / 100.0
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=cfg.max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(scaler.transform(x) if scaler else x, codes)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.info("logistic regression stopped at max_iter=%d before converging (as UNI allows)", cfg.max_iter)

    def predict_proba(q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        return clf.predict_proba(scaler.transform(q) if scaler else q)

    predict_proba.classifier = clf  # type: ignore[attr-defined]
    predict_proba.C = c  # type: ignore[attr-defined]
    return predict_proba


# ----------------------------------------------------------------------------------------- patch-level runner


def _eval_split(enc: Encoded, where: str) -> str:
    if enc.masks["test"].any():
        return "test"
    if enc.masks["val"].any():
        log.warning("%s: no test split; reporting on the validation split (as EVA does for CRC, BACH)", where)
        return "val"
    raise BenchmarkError(f"{where}: neither a test nor a validation split to evaluate on")


def _rows(task: str, method: str, seed: int, metrics: dict[str, float]) -> list[tuple]:
    return [(task, method, seed, name, float(value)) for name, value in metrics.items()]


def run_probe(
    x: np.ndarray,
    y: Sequence,
    split: Sequence[str],
    task: str,
    methods: Sequence[str] = ("linear", "knn", "logreg"),
    linear: LinearProbeConfig | None = None,
    knn: KnnConfig | None = None,
    logreg: LogRegConfig | None = None,
) -> pd.DataFrame:
    """Score frozen tile embeddings with the chosen probes; tidy rows (task, method, seed, metric, value).

    Models are fitted on train, selected on val (early stopping, k), and scored on test (on val when there
    is no test split). k-NN adds a row with metric "k", the k chosen on validation.
    """
    x = np.asarray(x)
    if x.ndim != 2 or len(x) != len(y):
        raise BenchmarkError(f"task {task}: X has shape {x.shape}, expected [{len(y)}, D]")
    if not np.isfinite(x).all():
        raise BenchmarkError(f"task {task}: the embeddings hold NaN or inf")
    unknown = [m for m in methods if m not in ("linear", "knn", "logreg")]
    if unknown:
        raise BenchmarkError(f"task {task}: unknown probe method {unknown[0]!r} (linear, knn, logreg)")
    enc = validate_split(y, split, where=f"task {task}")
    ev = _eval_split(enc, f"task {task}")
    tr, va, te = enc.masks["train"], enc.masks["val"], enc.masks[ev]
    k_classes = enc.n_classes
    chance = chance_metrics(enc.codes[te])
    rows: list[tuple] = []

    if "linear" in methods:
        cfg = linear or LinearProbeConfig()
        # EVA seeds once for all its runs; per_run reseeds each run with its seed
        stream = torch.Generator().manual_seed(cfg.seed) if cfg.seeding == "once" else None
        for seed in cfg.seeds:
            fit = train_linear_probe(
                x[tr], enc.codes[tr], x[va], enc.codes[va], k_classes, seed, cfg, generator=stream
            )
            log.info(
                "%s linear seed %d: best val bacc %.4f at step %d of %d",
                task,
                seed,
                fit.best_val,
                fit.best_step,
                fit.steps_run,
            )
            rows += _rows(
                task,
                "linear",
                seed,
                {**classification_metrics(enc.codes[te], fit.predict_proba(x[te])), **chance},
            )

    if "knn" in methods:
        cfg_k = knn or KnnConfig()
        ks = sorted(set(cfg_k.ks))
        if va.any():
            on_val = knn_proba(
                x[tr], enc.codes[tr], x[va], k_classes, ks, cfg_k.temperature, cfg_k.block_size
            )
            scores = {k: _balanced_accuracy(enc.codes[va], p.argmax(1)) for k, p in on_val.items()}
            best_k = max(ks, key=lambda k: (scores[k], -k))
        else:
            best_k = cfg_k.default_k
            log.warning("task %s: no validation split to choose k; using k = %d", task, best_k)
        wanted = ks if cfg_k.report_all_k else [best_k]
        on_eval = knn_proba(
            x[tr], enc.codes[tr], x[te], k_classes, wanted, cfg_k.temperature, cfg_k.block_size
        )
        rows += _rows(
            task, "knn", 0, {**classification_metrics(enc.codes[te], on_eval[best_k]), **chance, "k": best_k}
        )
        if cfg_k.report_all_k:
            for k in ks:
                rows += _rows(task, f"knn_k{k}", 0, classification_metrics(enc.codes[te], on_eval[k]))

    if "logreg" in methods:
        cfg_l = logreg or LogRegConfig()
        fit_rows = tr | va if (cfg_l.combine_trainval and ev == "test") else tr
        predict = fit_logreg(x[fit_rows], enc.codes[fit_rows], cfg_l)
        rows += _rows(task, "logreg", 0, {**classification_metrics(enc.codes[te], predict(x[te])), **chance})

    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1, 0 for a single run; EVA's statistics.stdev) over seeds."""
    grouped = rows.groupby(["task", "method", "metric"], sort=True)["value"]
    out = grouped.agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0, n="count")
    return out.reset_index()


# ----------------------------------------------------------------------------------------- ABMIL


class GatedAttention(nn.Module):
    """Ilse et al.'s gated attention: w · (tanh(V h) ⊙ sigmoid(U h)) → one logit per instance."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.c = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h))


class ABMIL(nn.Module):
    """Attention-MIL on a padded batch of bags [B, N, D] with a validity mask [B, N] → logits [B, out]."""

    def __init__(
        self,
        dim: int,
        n_out: int,
        projected_dim: int | None = 128,
        hidden_attention: int = 128,
        hidden_mlp: Sequence[int] = (128, 64),
    ):
        super().__init__()
        self.projector = nn.Linear(dim, projected_dim) if projected_dim else nn.Identity()
        width = projected_dim or dim
        self.attention = GatedAttention(width, hidden_attention)
        layers: list[nn.Module] = []
        for size in hidden_mlp:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.classifier = nn.Sequential(*layers, nn.Linear(width, n_out))

    def forward(self, bags: torch.Tensor, mask: torch.Tensor, return_attention: bool = False):
        h = self.projector(bags)
        logits = self.attention(h).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        pooled = torch.einsum("bn,bnd->bd", weights, h)
        out = self.classifier(pooled)
        return (out, weights) if return_attention else out


def _pad(bags: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(b) for b in bags)
    dim = bags[0].shape[1]
    x = torch.zeros((len(bags), longest, dim))
    mask = torch.zeros((len(bags), longest), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = torch.as_tensor(np.asarray(b, dtype=np.float32))
        mask[i, : len(b)] = True
    return x, mask


def abmil_proba(model: ABMIL, bags: Sequence[np.ndarray], n_classes: int, batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(bags), batch_size):
            x, mask = _pad(bags[s : s + batch_size])
            out.append(_logits_to_proba(model(x, mask), n_classes))
    return np.concatenate(out)


def train_abmil(
    bags_train: Sequence[np.ndarray],
    y_train: np.ndarray,
    bags_val: Sequence[np.ndarray],
    y_val: np.ndarray,
    n_classes: int,
    seed: int,
    config: AbmilConfig | None = None,
    generator: torch.Generator | None = None,
) -> ABMIL:
    """Train EVA's ABMIL head on integer slide codes; keep the epoch with the best monitored validation metric.

    Bags are [n_i, D] arrays (tiles of one slide; lengths may differ, batches are padded and masked).
    AdamW(lr, weight_decay), lr × low_lr_factor for the first low_lr_epochs epochs (ConstantLR stepped per
    epoch), one validation per epoch, early stopping after `patience` epochs without a strict improvement,
    the best state restored (EVA: Lightning EarlyStopping + ModelCheckpoint(mode max), checkpoint best).
    Randomness (the head's init, then the batch order) comes from `generator` when given, which it advances
    (EVA's one stream over its runs), else from a generator seeded with `seed`; the global torch RNG is left
    as it was.
    """
    cfg = config or AbmilConfig()
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    with torch_threads(cfg.threads):
        return _train_abmil(bags_train, y_train, bags_val, y_val, n_classes, seed, cfg, gen)


def _train_abmil(bags_train, y_train, bags_val, y_val, n_classes, seed, cfg: AbmilConfig, gen) -> ABMIL:
    dim = bags_train[0].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())  # the layers draw their init from the global RNG
        model = ABMIL(
            dim, 1 if n_classes == 2 else n_classes, cfg.projected_dim, cfg.hidden_attention, cfg.hidden_mlp
        )
        gen.set_state(torch.get_rng_state())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.low_lr_epochs > 0:
        sched = torch.optim.lr_scheduler.ConstantLR(
            opt, factor=cfg.low_lr_factor, total_iters=cfg.low_lr_epochs
        )
    loss_fn = _loss(n_classes)
    targets = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    # padded once (EVA pads every bag to its tile cap); each batch is cut to its longest bag
    x_all, mask_all = _pad(bags_train)
    lengths = mask_all.sum(1)
    val = _pad(bags_val) if len(bags_val) else None
    best, best_state, bad = -math.inf, None, 0
    for epoch in range(cfg.max_epochs):
        model.train()
        order = torch.randperm(len(bags_train), generator=gen)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            longest = int(lengths[idx].max())
            loss = loss_fn(model(x_all[idx, :longest], mask_all[idx, :longest]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()  # end of the epoch (Lightning's default `interval: epoch`)
        if val is not None:
            model.eval()
            with torch.no_grad():
                pred = _logits_to_proba(model(*val), n_classes).argmax(1)
            score = _monitored(cfg.monitor, y_val, pred)
            if score > best:  # strictly better, as Lightning's EarlyStopping/ModelCheckpoint (mode=max)
                best, bad = score, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if cfg.patience is not None and bad >= cfg.patience:
                    log.info("ABMIL seed %d: early stop at epoch %d (best val %.4f)", seed, epoch + 1, best)
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def subsample_bag(bag: np.ndarray, max_tiles: int | None, seed: int = 42) -> np.ndarray:
    """At most `max_tiles` rows of a bag [n, D]: a uniform subset drawn with `numpy.random.default_rng(seed)`,
    in the bag's order; the bag itself when it is small enough or `max_tiles` is None.

    EVA's `ForegroundGridSampler(max_samples)` (`eva/vision/data/wsi/patching/samplers/foreground_grid.py`)
    shuffles the slide's grid with `default_rng(42)` and keeps the first `max_samples` foreground tiles, i.e.
    a uniform subset of the foreground tiles, fixed for all runs; ours is the same in distribution, not the
    same tiles (our tiler's grid and foreground test are not EVA's).
    """
    if max_tiles is None or len(bag) <= max_tiles:
        return bag
    keep = np.sort(np.random.default_rng(seed).permutation(len(bag))[:max_tiles])
    return bag[keep]


def score_bags(
    bags: Sequence[np.ndarray],
    y: Sequence,
    split: Sequence[str],
    task: str,
    config: AbmilConfig | None = None,
    names: Sequence | None = None,
) -> pd.DataFrame:
    """ABMIL runs on bags of tile embeddings: bags[i] [n_i, D] with slide label y[i] and split[i]; tidy rows
    (task, "abmil", seed, metric, value) per run, scored on test (on val when there is no test split).

    Each bag is first cut to `max_tiles` (`subsample_bag`, once, as EVA samples its tiles once). Runs
    follow `config.seeding` (EVA: once). Raises BenchmarkError for bags of different widths, an empty bag,
    non-finite embeddings, or the label / split problems of `validate_split` (naming the bag).
    """
    cfg = config or AbmilConfig()
    where = f"task {task}"
    names = list(names) if names is not None else [f"bag {i}" for i in range(len(bags))]
    if not (len(bags) == len(y) == len(split) == len(names)):
        raise BenchmarkError(f"{where}: {len(bags)} bags, {len(y)} labels, {len(split)} splits")
    bags = [np.asarray(b, dtype=np.float32) for b in bags]
    for name, bag in zip(names, bags, strict=True):
        if bag.ndim != 2 or len(bag) == 0 or bag.shape[1] != bags[0].shape[1]:
            raise BenchmarkError(
                f"{where}: slide {name!r} has a bag of shape {bag.shape}, expected [n ≥ 1, D]"
            )
        if not np.isfinite(bag).all():
            raise BenchmarkError(f"{where}: the embeddings of slide {name!r} hold NaN or inf")
    enc = validate_split(y, split, where=where, row_names=[f"slide {n!r}" for n in names])
    bags = [subsample_bag(b, cfg.max_tiles, cfg.tile_seed) for b in bags]
    pick = {name: np.flatnonzero(enc.masks[name]) for name in SPLITS}
    ev = _eval_split(enc, where)
    chance = chance_metrics(enc.codes[pick[ev]])
    stream = torch.Generator().manual_seed(cfg.seed) if cfg.seeding == "once" else None
    rows: list[tuple] = []
    for seed in cfg.seeds:
        model = train_abmil(
            [bags[i] for i in pick["train"]],
            enc.codes[pick["train"]],
            [bags[i] for i in pick["val"]],
            enc.codes[pick["val"]],
            enc.n_classes,
            seed,
            cfg,
            generator=stream,
        )
        proba = abmil_proba(model, [bags[i] for i in pick[ev]], enc.n_classes, cfg.batch_size)
        rows += _rows(task, "abmil", seed, {**classification_metrics(enc.codes[pick[ev]], proba), **chance})
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _slide_groups(y: np.ndarray, split: np.ndarray, slide_ids: np.ndarray, where: str) -> dict:
    """slide → (row indices, label, split); a slide whose tiles disagree on label or split is an error."""
    groups: dict = {}
    for i, sid in enumerate(slide_ids.tolist()):
        groups.setdefault(sid, []).append(i)
    out = {}
    for sid, rows in groups.items():
        labels = {y[i] for i in rows}
        splits = {split[i] for i in rows}
        if len(labels) > 1:
            raise BenchmarkError(
                f"{where}: slide {sid!r} has tiles with different labels {sorted(map(str, labels))}"
            )
        if len(splits) > 1:
            raise BenchmarkError(f"{where}: slide {sid!r} has tiles in different splits {sorted(splits)}")
        out[sid] = (np.asarray(rows), labels.pop(), splits.pop())
    return out


def run_abmil(
    x: np.ndarray,
    y: Sequence,
    split: Sequence[str],
    slide_ids: Sequence,
    task: str,
    config: AbmilConfig | None = None,
) -> pd.DataFrame:
    """Slide-level ABMIL on bags of tile embeddings (tiles grouped by slide id); tidy rows per run
    (`score_bags`). Raises BenchmarkError when a slide's tiles disagree on label or split."""
    x = np.asarray(x)
    y = np.asarray(y, dtype=object)
    split = np.asarray(split, dtype=object)
    slide_ids = np.asarray(slide_ids, dtype=object)
    where = f"task {task}"
    if x.ndim != 2 or not (len(x) == len(y) == len(split) == len(slide_ids)):
        raise BenchmarkError(
            f"{where}: X {x.shape}, {len(y)} labels, {len(split)} splits, {len(slide_ids)} slide ids"
        )
    groups = _slide_groups(y, split, slide_ids, where)
    slides = list(groups)
    return score_bags(
        [x[groups[s][0]] for s in slides],
        [groups[s][1] for s in slides],
        [groups[s][2] for s in slides],
        task,
        config,
        names=slides,
    )


# ----------------------------------------------------------------------------------------- one model, all tasks


def run(
    tasks: Mapping[str, Mapping[str, Any]],
    embedding_stores: Sequence[str | Path],
    out: str | Path,
    *,
    model: str,
    methods: Sequence[str] = ("linear", "knn", "logreg"),
    linear: Mapping[str, Any] | None = None,
    knn_ks: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Score one model on every probe task and write the tidy rows to Parquet `out`, with provenance.

    `tasks[name]` holds `manifest` (a CSV, see `load_manifest`) and `level` ("tile" or "slide");
    `embedding_stores[i]` is the model's embedding store of the i-th task's dataset, rows in tile-store
    order. Tile-level tasks run `methods` (`run_probe`); slide-level tasks run ABMIL on each slide's tiles
    (`run_abmil`, with the linear probe's seeds). `linear` overrides `LinearProbeConfig` fields, `knn_ks`
    the k-NN candidates. A task may name its EVA settings (`eva`: bach, crc, mhist or pcam; `EVA_LINEAR`),
    which then replace `linear` for it, and override single settings (`linear`, a mapping of fields). A
    manifest with cross-validation folds (`load_manifest`) is scored fold by fold, its rows concatenated, so
    a task's summary is the mean over folds and runs. Returns the rows (task, method, seed, metric, value)
    of every task. Raises BenchmarkError when the lists differ in length, a manifest does not fit its
    embeddings, or a slide-level task's manifest lacks a `slide_id` column.
    """
    from histodistill.bench import write_scores
    from histodistill.embed import EmbeddingStore
    from histodistill.provenance import provenance

    if len(tasks) != len(embedding_stores):
        raise BenchmarkError(f"{len(tasks)} probe task(s) but {len(embedding_stores)} embedding store(s)")
    linear_cfg = linear_config(linear)
    knn = KnnConfig(ks=tuple(knn_ks)) if knn_ks is not None else KnnConfig()
    frames = []
    for (name, task), emb_path in zip(tasks.items(), embedding_stores, strict=True):
        embeddings = EmbeddingStore(emb_path).embeddings
        full = load_manifest(task["manifest"], n_tiles=len(embeddings))
        if task["level"] == "slide" and full.slide_id is None:
            raise BenchmarkError(
                f"probe task {name}: level slide needs a slide_id column in {task['manifest']}"
            )
        task_frames = []
        for fold, manifest in full.folds():  # cross-validation folds: rows of every fold, mean over them
            if fold is not None:
                log.info("probe task %s: fold %d", name, fold)
            x = manifest.select(embeddings)
            if task["level"] == "slide":
                abmil = replace(AbmilConfig(), seeds=linear_cfg.seeds)
                task_frames.append(
                    run_abmil(x, manifest.label, manifest.split, manifest.slide_id, name, abmil)
                )
            else:
                task_cfg = linear_config(linear_cfg, task.get("eva"), task.get("linear"))
                task_frames.append(
                    run_probe(x, manifest.label, manifest.split, name, methods, linear=task_cfg, knn=knn)
                )
        frames.append(fold_mean_chance_se(task_frames))
    rows = pd.concat(frames, ignore_index=True)
    params = {"tasks": dict(tasks), "methods": list(methods), "linear": dict(linear or {}), "knn_ks": knn_ks}
    write_scores(rows, out, provenance(params, benchmark="probe", model=model))
    return rows


def fold_mean_chance_se(folds: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One task's rows of k cross-validation folds (each `run_probe` / `run_abmil` rows: task, method, seed,
    metric, value) concatenated, with every null standard error (`CHANCE_SE` rows) replaced by that of the
    mean over the folds, which is what the summary reports: sqrt(Σ_f se_f²) / k per method. The folds' test
    sets are disjoint, so their balanced accuracies are independent under the null; a single fold's own
    standard error would overstate the mean's by about √k. One fold: its rows unchanged."""
    if len(folds) == 1:
        return folds[0]
    per_fold = [f[f["metric"] == CHANCE_SE].groupby("method")["value"].first() for f in folds]
    se = np.sqrt(sum(s.pow(2) for s in per_fold)) / len(folds)
    out = pd.concat(folds, ignore_index=True)
    hit = out["metric"] == CHANCE_SE
    out.loc[hit, "value"] = out.loc[hit, "method"].map(se).to_numpy(dtype=float)
    return out


# ----------------------------------------------------------------------------------------- report

METHOD_ORDER = ("linear", "knn", "logreg", "abmil")


def _methods(summary: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(summary["method"])) if "method" in summary.columns else []
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Per method, the balanced accuracy averaged over tasks (only for a model that has every task)."""
    cols = {}
    for method in _methods(summary):
        rows = summary[(summary["method"] == method) & (summary["metric"] == "balanced_accuracy")]
        cols[f"probe_balanced_accuracy_{method}"] = complete_mean(rows, "mean", models) if len(rows) else {}
    return by_model(cols, models)


def _errors(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Per method, the null standard error of the headline (balanced accuracy averaged over tasks): each
    task's recorded `CHANCE_SE` (for k folds, that of the mean over folds: `fold_mean_chance_se`), combined
    over tasks by `complete_mean_se`. NaN for tasks scored before the chance rows existed."""
    cols = {}
    for method in _methods(summary):
        rows = summary[(summary["method"] == method) & (summary["metric"] == CHANCE_SE)]
        cols[f"probe_balanced_accuracy_{method}"] = (
            complete_mean_se(rows, "mean", models) if len(rows) else {}
        )
    return by_model(cols, models)


def probe_flags(summary: pd.DataFrame, models: Sequence[str]) -> dict[str, str]:
    """Models whose probes are at chance on every task: for each task, even the best method's mean
    balanced accuracy is `at_chance` (against that task's recorded chance level and null standard error).

    Tasks scored without the chance rows (files written before they existed) are not judged; a model with
    no judged task is not flagged. Returns {model: reason}.
    """
    out: dict[str, str] = {}
    if summary.empty or not {CHANCE, CHANCE_SE} <= set(summary["metric"]):
        return out
    for model, part in summary.groupby("model", sort=False):
        judged = []  # (task, best mean balanced accuracy, chance, null SE)
        for task, rows in part.groupby("task", sort=True):
            means = rows.pivot_table(index="method", columns="metric", values="mean", aggfunc="first")
            if not {"balanced_accuracy", CHANCE, CHANCE_SE} <= set(means.columns):
                continue
            means = means[~means.index.str.startswith("knn_k")]  # every k is not a method of its own
            judged.append(
                (
                    task,
                    float(means["balanced_accuracy"].max()),
                    float(means[CHANCE].max()),
                    float(means[CHANCE_SE].max()),
                )
            )
        if judged and all(at_chance(best, chance, se) for _, best, chance, se in judged):
            task, best, chance, se = judged[0]
            out[model] = (
                f"probes at chance on all {len(judged)} task(s) (e.g. {task}: best balanced accuracy "
                f"{at_chance_reason(best, chance, se)})"
            )
    return out


def _figures(summary: pd.DataFrame, fig_dir: Path, colors: Mapping[str, str]) -> list[Figure]:
    from histodistill.report import figures

    if "metric" not in summary.columns or not (summary["metric"] == "balanced_accuracy").any():
        return []
    methods = [m for m in _methods(summary) if not m.startswith("knn_k")]  # not every k
    png = figures.probe_bars(summary, colors, methods=methods)
    figures.write_png(png, fig_dir / "probe_balanced_accuracy.png")
    caption = "Probes: per task and method, balanced accuracy (error bars: std over seeds)."
    return [Figure(png, "probe_balanced_accuracy.png", caption)]


def _section(summary: pd.DataFrame, models: Sequence[str], figs: Sequence[Figure]) -> str:
    from histodistill.report import html as page

    if summary.empty:
        return page.note("No probe scores.")
    models = list(models)  # every model, so one absent from this benchmark shows as a column of "–"
    body = "".join(page.figure(f.png, f.name, f.caption) for f in figs)
    body += page.note(
        "Mean ± sample std over seeds (one run for deterministic methods), on the test split "
        "(on validation where a task has none)."
    )
    order = {m: i for i, m in enumerate(_methods(summary))}
    for metric in (*METRICS, "k"):
        rows = summary[summary["metric"] == metric]
        if rows.empty:
            continue
        rows = rows.assign(_m=rows["method"].map(order)).sort_values(["task", "_m"], kind="stable")
        if metric == "k":
            title, cell = "k chosen on validation (k-NN)", lambda r: page.fmt(r["mean"], 0)
        else:
            title, cell = metric.replace("_", " "), lambda r: page.fmt_pm(r["mean"], r["std"])
        body += f"<h3>{page.esc(title)}</h3>" + page.wide_table(rows, ["task", "method"], models, cell)
    return body


def eva_scores(summary: pd.DataFrame) -> pd.DataFrame:
    """The EVA leaderboard's numbers of this benchmark: per model and task, the linear probe's mean balanced
    accuracy (EVA's patch tasks; `histodistill.bench.eva` keeps the tasks named as EVA's)."""
    rows = summary[(summary["method"] == "linear") & (summary["metric"] == "balanced_accuracy")]
    return rows[["model", "task"]].assign(value=rows["mean"].to_numpy())


def _label(method: str) -> str:
    return f"probe bal. acc. ({method}, mean over tasks)"


BENCHMARK = Benchmark(
    name="probe",
    title="Classification probes",
    order=30,
    columns=frozenset(ROW_COLUMNS),
    summarize=summarize,
    headline=_headline,
    figures=_figures,
    section=_section,
    labels=lambda column: _label(column.removeprefix("probe_balanced_accuracy_")),
    flags=probe_flags,
    errors=_errors,
    eva_scores=eva_scores,
)
