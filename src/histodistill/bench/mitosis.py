"""Mitotic-figure classification benchmark (Ammeling et al. 2025, "Benchmarking Foundation Models for
Mitotic Figure Classification", arXiv:2508.04441): linear probing vs LoRA, data scaling, cross-domain.

Checked against the authors' code (DeepMicroscopy/FoundationModelComparison: `linear_probing.py`,
`src/linear_probe.py`, `src/logistic_regression.py`, `src/classifier.py`, `src/dataset.py`,
`train_classifier.py`, `train_classifier_tumor_specific.py`). Where the issue and their code differ, the
issue wins and the difference is named here.

**Data.** Point annotations, one row per figure: `slide_id, x, y, label, domain, case` (x, y in level-0 px
of the slide; label `mitotic_figure` or `hard_negative`; domain = tumour type or scanner; case = patient or
specimen, the unit that never crosses train and test). Layouts of the published sets:

- MIDOG 2022 training set (5 labelled domains: human breast carcinoma, canine lung carcinoma, canine
  lymphoma, canine cutaneous mast cell tumour, human neuroendocrine tumour); the authors' table
  `MIDOG2022_training_tiff.csv` has `x, y, label (1/0), filename, slide, split, tumortype`: slide_id =
  filename stem, case = `slide`, domain = `tumortype`, label 1 → mitotic_figure, 0 → hard_negative.
- CCMCT (Bertram et al. 2019, 32 WSIs of canine cutaneous mast cell tumour, one domain): the authors'
  `MITOS_WSI_CCMCT_ODAEL_binary_labels.csv`; slide = case, domain = "ccmct".

Labels are read case-insensitively; `1`/`0`, `mitosis`, `imposter`, `non-mitosis` are accepted aliases.
Patches are `patch_px` (224) pixels at `mpp` (0.25 µm/px, the sets' native resolution) centred on the
point, read from the best pyramid level and resized (a slide up to 10% coarser than `mpp` is upsampled:
MIDOG's GT450 scans at 0.26 µm/px); pixels outside the slide are white. Each model gets its own transform.

**Linear probing.** Frozen features (the model's registered pooling: CLS, or CLS ⊕ mean patch token for
Virchow 2) → logistic regression, L-BFGS, 1000 iterations, C = D·K/100, fitted once on train + validation.
The default `implementation="torch"` is the authors' (= UNI's) own: a zero-initialised `nn.Linear(D, K)`,
mean cross-entropy + (1/C)·0.5·‖W‖₂ (the norm, not its square; bias unpenalised), one
`torch.optim.LBFGS(max_iter=1000, line_search_fn="strong_wolfe")` step, on unstandardised features.
`"sklearn"` uses sklearn's `LogisticRegression(C, lbfgs, max_iter)` (penalty 0.5·‖W‖² against the summed
loss), which is not numerically the same. Because train and validation are merged, the five Monte-Carlo
validation splits change nothing at 100% data: the linear probe's runs there are identical (std 0).

**LoRA (peft).** r = 16, alpha = 16, dropout 0.1 on every block's `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`
(and `mlp.fc1_g`/`fc1_x` for unpacked SwiGLU), nothing else: the authors' `target_modules=["qkv", "proj",
"fc1", "fc2"]` also matches the patch embedding's `patch_embed.proj` (peft matches name suffixes), which the
issue's "only the named layers" excludes. A trainable `nn.Linear(pooled_dim, 1)` head on the registered
pooling; BCE-with-logits; Adam (β 0.9/0.999), OneCycleLR(max_lr 1e-4) over 100 pseudo-epochs of 1,280
samples in batches of 16; the epoch with the lowest validation loss is kept. The authors' OneCycleLR keeps
torch's default `cycle_momentum=True`, which overwrites Adam's β1 (0.95 → 0.85 → 0.95); we keep β1 = 0.9 as
the issue states (`LoraSettings.cycle_momentum=True` reproduces their code).

**Sampler.** Each training draw is a mitotic figure (50%), a hard negative (25%) or a random tissue patch
(25%) away from every annotation; annotated patches are shifted by up to ±10% of the patch (the authors'
`offset_scale`), and a patch is positive when a mitotic figure of the split lies inside it (their
`get_label`). The authors pick a slide first and fall back to imposters when it has no mitosis; we pick
the kind first, so the 50/25/25 proportions hold exactly. The validation set is one fixed, seeded draw of
`val_samples` from the same sampler on the validation cases (their validation dataset is one draw too).
Test patches are the annotations themselves, centred, labelled by the annotation.

**Protocols.** Data scaling: one fixed test split of ~20% of the annotations by case (per domain), then
5 Monte-Carlo runs, each drawing ~20% of the remaining cases as validation; each run keeps the fractions
0.1 / 1 / 10 / 100% of its training and validation annotations, nested (a smaller fraction is a subset of a
larger one) and stratified by label with at least one annotation per label. The authors split annotations,
not cases, and redraw the test set per seed; the issue asks for a fixed case-level test split, which we do.
Cross-domain: for each domain, ~20% of its cases are held out (redrawn per run), ~20% of the rest validate,
and the model trained on the remainder is tested on the holdout (diagonal) and on every annotation of each
other domain, giving an N×N matrix per run.

**Output.** Tidy rows `model, method, protocol, fraction, train_domain, test_domain, run, metric, value`
(metrics: balanced accuracy and weighted F1 at probability 0.5, AUROC; plus `n_train`), summaries as
mean ± sample std (ddof = 1) over runs, Parquet with provenance, PNG figures.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.devices import autocast_dtype, pick_device, torch_threads
from histodistill.errors import SlideError
from histodistill.models.encoders import encode
from histodistill.models.registry import LoadedModel, ModelSpec
from histodistill.models.transforms import _MODES, ModelTransform
from histodistill.provenance import read_parquet, write_parquet
from histodistill.slides import best_level, open_slide, parse_mpp, read_rgb, read_scaled, resolve_mpp
from histodistill.tissue import MaskConfig, tissue_mask

log = logging.getLogger(__name__)

MITOTIC_FIGURE = "mitotic_figure"
HARD_NEGATIVE = "hard_negative"
TARGETS = {MITOTIC_FIGURE: 1, HARD_NEGATIVE: 0}
LABEL_ALIASES = {
    "mitotic_figure": MITOTIC_FIGURE,
    "mitotic figure": MITOTIC_FIGURE,
    "mitosis": MITOTIC_FIGURE,
    "1": MITOTIC_FIGURE,
    "hard_negative": HARD_NEGATIVE,
    "hard negative": HARD_NEGATIVE,
    "imposter": HARD_NEGATIVE,
    "non-mitosis": HARD_NEGATIVE,
    "0": HARD_NEGATIVE,
}
ANNOTATION_COLUMNS = ("slide_id", "x", "y", "label", "domain", "case")
ROW_COLUMNS = [
    "model",
    "method",
    "protocol",
    "fraction",
    "train_domain",
    "test_domain",
    "run",
    "metric",
    "value",
]
SUMMARY_KEYS = ["model", "method", "protocol", "fraction", "train_domain", "test_domain", "metric"]
METRICS = ("balanced_accuracy", "f1_weighted", "auroc")
SCALING, CROSS_DOMAIN = "scaling", "cross_domain"
ALL = "all"  # train_domain / test_domain of the scaling protocol (every domain pooled)
FRACTIONS = (0.001, 0.01, 0.1, 1.0)
UPSAMPLE_TOLERANCE = 0.10  # a slide at most 10% coarser than the target µm/px is upsampled, not refused
LORA_TARGET_PATTERN = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x))")


# ----------------------------------------------------------------------------------------- annotations


def read_annotations(path: str | os.PathLike, slide_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Read and validate a point-annotation CSV; rows in errors are named by their CSV line.

    Returns the columns of ANNOTATION_COLUMNS (labels canonical) plus `target` (1 = mitotic figure), with
    a fresh 0…N-1 index: splits refer to these row positions.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"annotation file {path} does not exist")
    text_cols = {c: str for c in ("slide_id", "label", "domain", "case")}
    try:
        df = pd.read_csv(path, dtype=text_cols, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"cannot parse annotation file {path}: {exc}") from exc
    return validate_annotations(df, where=f"annotations {path}", slide_ids=slide_ids, line_offset=2)


def validate_annotations(
    df: pd.DataFrame,
    where: str = "annotations",
    slide_ids: Sequence[str] | None = None,
    line_offset: int | None = None,
) -> pd.DataFrame:
    """Check an annotation table (columns, values, slide → case → domain consistency, duplicates).

    `line_offset` names rows as CSV lines (2 = header + 1-based); None names them `row i`.
    """
    missing = [c for c in ANNOTATION_COLUMNS if c not in df.columns]
    if missing:
        raise BenchmarkError(f"{where}: missing column(s) {missing}; needs {list(ANNOTATION_COLUMNS)}")
    if df.empty:
        raise BenchmarkError(f"{where}: no annotations")

    def name(i: int) -> str:
        return f"line {i + line_offset}" if line_offset is not None else f"row {i}"

    out = pd.DataFrame({c: df[c].astype(str).str.strip() for c in ("slide_id", "domain", "case")})
    for col in ("slide_id", "domain", "case"):
        blank = np.flatnonzero((out[col] == "").to_numpy() | df[col].isna().to_numpy())
        if blank.size:
            raise BenchmarkError(f"{where}: {name(blank[0])} has an empty {col}")
    for col in ("x", "y"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
        if bad.size:
            i = bad[0]
            raise BenchmarkError(
                f"{where}: {name(i)} (slide {out['slide_id'].iloc[i]!r}) has {col} = {str(df[col].iloc[i])!r}, "
                "not a pixel coordinate ≥ 0"
            )
        out[col] = values
    raw = df["label"].astype(str).str.strip()
    labels = raw.str.lower().map(LABEL_ALIASES)
    bad = np.flatnonzero(labels.isna().to_numpy())
    if bad.size:
        i = bad[0]
        raise BenchmarkError(
            f"{where}: {name(i)} (slide {out['slide_id'].iloc[i]!r}) has label {raw.iloc[i]!r}; expected "
            f"{MITOTIC_FIGURE!r} or {HARD_NEGATIVE!r} (aliases: {sorted(LABEL_ALIASES)})"
        )
    out["label"] = labels.to_numpy()
    out = out[list(ANNOTATION_COLUMNS)].reset_index(drop=True)
    out["target"] = out["label"].map(TARGETS).astype(np.int64)

    if slide_ids is not None:
        known = set(map(str, slide_ids))
        unknown = np.flatnonzero(~out["slide_id"].isin(known).to_numpy())
        if unknown.size:
            i = unknown[0]
            raise BenchmarkError(
                f"{where}: {name(i)} refers to slide {out['slide_id'].iloc[i]!r}, which is not in the "
                "sample sheet; add it there or drop its annotations"
            )
    for child, parent in (("slide_id", "case"), ("case", "domain")):
        n_parents = out.groupby(child)[parent].nunique()
        if (n_parents > 1).any():
            key = n_parents.index[np.argmax(n_parents.to_numpy() > 1)]
            found = sorted(out.loc[out[child] == key, parent].unique())
            raise BenchmarkError(f"{where}: {child} {key!r} belongs to more than one {parent}: {found}")
    dup = out.duplicated(["slide_id", "x", "y"], keep=False).to_numpy()
    if dup.any():
        first = np.flatnonzero(dup)[0]
        r = out.iloc[first]
        same = np.flatnonzero(
            dup
            & (out["slide_id"] == r.slide_id).to_numpy()
            & (out["x"] == r.x).to_numpy()
            & (out["y"] == r.y)
        )
        raise BenchmarkError(
            f"{where}: {name(same[0])} and {name(same[1])} annotate the same point ({r.x:g}, {r.y:g}) of "
            f"slide {r.slide_id!r}"
        )
    return out


def slides_from_sheet(sheet: pd.DataFrame) -> tuple[dict[str, str], dict[str, float | None]]:
    """Slide paths and MPP overrides from a sample sheet (as `histodistill.config.read_sample_sheet` gives)."""
    paths = {str(s): str(p) for s, p in zip(sheet["slide_id"], sheet["path"], strict=True)}
    raw = sheet["mpp"] if "mpp" in sheet.columns else [None] * len(sheet)
    mpps = {str(s): parse_mpp(v) for s, v in zip(sheet["slide_id"], raw, strict=True)}
    return paths, mpps


# ----------------------------------------------------------------------------------------- patches


@dataclass(frozen=True)
class _Geometry:
    level: int
    footprint0: float  # patch side in level-0 px
    read_px: int  # patch side at `level`
    width0: int
    height0: int
    mpp: float  # slide µm/px (level 0)


class PatchReader:
    """Reads patches centred on level-0 points at a target µm/px, each patch on its own (bounded memory).

    Slides are opened lazily and kept open (a handle costs little; pixels are never cached), so a
    sampler can read batches from many slides without reopening them. Use as a context manager.
    """

    def __init__(
        self,
        slides: Mapping[str, str | os.PathLike],
        slide_mpps: Mapping[str, float | None] | None = None,
        patch_px: int = 224,
        mpp: float = 0.25,
        mask_mpp: float = 4.0,
    ):
        self.slides = {str(k): Path(v) for k, v in slides.items()}
        self.slide_mpps = dict(slide_mpps or {})
        self.patch_px = int(patch_px)
        self.mpp = float(mpp)
        self.mask_mpp = float(mask_mpp)
        self._open: dict[str, Any] = {}
        self._geometry: dict[str, _Geometry] = {}
        self._tissue: dict[str, tuple[np.ndarray, float]] = {}

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()

    def _slide(self, slide_id: str):
        if slide_id not in self._open:
            if slide_id not in self.slides:
                raise BenchmarkError(f"slide {slide_id!r} is annotated but not in the sample sheet")
            self._open[slide_id] = open_slide(self.slides[slide_id])
        return self._open[slide_id]

    def geometry(self, slide_id: str) -> _Geometry:
        """Pyramid level, level-0 footprint and read size of a patch on this slide."""
        if slide_id not in self._geometry:
            slide = self._slide(slide_id)
            name = f"slide '{slide_id}' ({self.slides[slide_id]})"
            mpp = resolve_mpp(dict(slide.properties), self.slide_mpps.get(slide_id), slide_name=name).mean
            if mpp > self.mpp * (1 + UPSAMPLE_TOLERANCE):
                raise SlideError(
                    f"{name}: scanned at {mpp:g} µm/px, more than {UPSAMPLE_TOLERANCE:.0%} coarser than the "
                    f"benchmark's {self.mpp:g} µm/px; patches would be upsampled. Lower the resolution "
                    "(mitosis.mpp) or leave the slide out."
                )
            level = best_level(slide, mpp, self.mpp)
            footprint0 = self.patch_px * self.mpp / mpp
            read_px = max(1, round(footprint0 / slide.level_downsamples[level]))
            width0, height0 = slide.dimensions
            self._geometry[slide_id] = _Geometry(level, footprint0, read_px, width0, height0, mpp)
        return self._geometry[slide_id]

    def read(self, slide_id: str, points: np.ndarray) -> np.ndarray:
        """uint8 [n, patch_px, patch_px, 3] patches centred on level-0 points [n, 2] (x, y)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        g = self.geometry(slide_id)
        outside = np.flatnonzero(
            (points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] >= g.width0) | (points[:, 1] >= g.height0)
        )
        if outside.size:
            x, y = points[outside[0]]
            raise BenchmarkError(
                f"slide {slide_id!r}: point ({x:g}, {y:g}) lies outside the slide ({g.width0} x {g.height0} px)"
            )
        slide = self._slide(slide_id)
        out = np.empty((len(points), self.patch_px, self.patch_px, 3), np.uint8)
        for i, (x, y) in enumerate(points):
            x0, y0 = round(x - g.footprint0 / 2), round(y - g.footprint0 / 2)
            patch = read_rgb(slide, x0, y0, g.level, g.read_px, g.read_px)
            if g.read_px != self.patch_px:
                patch = np.asarray(
                    Image.fromarray(patch).resize((self.patch_px, self.patch_px), Image.Resampling.BILINEAR)
                )
            out[i] = patch
        return out

    def _tissue_pixels(self, slide_id: str) -> tuple[np.ndarray, float]:
        """Tissue pixel coordinates (row, col) of the slide's mask thumbnail and level-0 px per mask px."""
        if slide_id not in self._tissue:
            g = self.geometry(slide_id)
            mask_mpp = max(self.mask_mpp, g.mpp)
            thumb = read_scaled(self._slide(slide_id), g.mpp, mask_mpp)
            # The default clean-up sizes suit WSIs; on a small ROI (MIDOG, the demo) they would erase the
            # tissue, so objects/holes of 2% of the image area count too.
            area_um2 = g.width0 * g.height0 * g.mpp**2
            defaults = MaskConfig()
            params = MaskConfig(
                mask_mpp=mask_mpp,
                min_object_um2=min(defaults.min_object_um2, 0.02 * area_um2),
                min_hole_um2=min(defaults.min_hole_um2, 0.005 * area_um2),
            )
            mask = tissue_mask(thumb, params)
            if not mask.any():
                log.warning("slide %s: no tissue found; random patches come from the whole slide", slide_id)
                mask = np.ones_like(mask)
            self._tissue[slide_id] = (np.argwhere(mask), g.width0 / mask.shape[1])
        return self._tissue[slide_id]

    def random_points(
        self, slide_id: str, n: int, rng: np.random.Generator, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """`n` level-0 points in tissue whose patches lie inside the slide and contain no `exclude` point."""
        g = self.geometry(slide_id)
        pixels, px0 = self._tissue_pixels(slide_id)
        half = g.footprint0 / 2
        exclude = np.zeros((0, 2)) if exclude is None else np.asarray(exclude, np.float64).reshape(-1, 2)
        found: list[np.ndarray] = []
        have = 0
        for _ in range(50):
            pick = pixels[rng.integers(0, len(pixels), size=4 * max(n, 8))]
            cand = (pick[:, ::-1] + rng.random((len(pick), 2))) * px0  # (x, y) level 0
            ok = (cand[:, 0] >= half) & (cand[:, 0] < g.width0 - half)
            ok &= (cand[:, 1] >= half) & (cand[:, 1] < g.height0 - half)
            if len(exclude):
                cheb = np.abs(cand[:, None, :] - exclude[None, :, :]).max(-1)
                ok &= (cheb > half).all(1)
            found.append(cand[ok])
            have += int(ok.sum())
            if have >= n:
                return np.concatenate(found)[:n]
        raise BenchmarkError(
            f"slide {slide_id!r}: cannot place {n} random tissue patches away from its {len(exclude)} "
            "annotations; the slide is too small or crowded for random patches"
        )


def extract_patches(
    slide_path: str | os.PathLike,
    points: np.ndarray,
    patch_px: int = 224,
    mpp: float = 0.25,
    slide_mpp: float | None = None,
) -> np.ndarray:
    """uint8 [n, patch_px, patch_px, 3] patches of one slide centred on level-0 points [n, 2] (x, y).

    Reads each patch alone from the best level (never the whole slide), then resizes to `patch_px`.
    """
    slide_id = Path(slide_path).stem
    with PatchReader({slide_id: slide_path}, {slide_id: slide_mpp}, patch_px, mpp) as reader:
        return reader.read(slide_id, points)


def iter_annotation_patches(
    reader: PatchReader, annotations: pd.DataFrame, rows: np.ndarray, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row positions, centred patches) in batches, slide by slide (bounded memory)."""
    rows = np.asarray(rows, dtype=np.int64)
    slides = annotations["slide_id"].to_numpy()[rows]
    xy = annotations[["x", "y"]].to_numpy(dtype=np.float64)
    for slide_id in dict.fromkeys(slides.tolist()):
        mine = rows[slides == slide_id]
        for s in range(0, len(mine), batch_size):
            chunk = mine[s : s + batch_size]
            yield chunk, reader.read(slide_id, xy[chunk])


# ----------------------------------------------------------------------------------------- features


def _to_batch(transform: ModelTransform, patches: np.ndarray) -> torch.Tensor:
    """`ModelTransform` applied to a whole uint8 batch [B, H, W, 3] at once (same ops, batched: a per-image
    loop would cost more than a tiny model's forward pass)."""
    t = transform.t
    x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)
    mode = _MODES[t.interpolation]
    if t.resize is not None and min(x.shape[-2:]) != t.resize:
        x = TF.resize(x, [t.resize], interpolation=mode, antialias=True)
    elif t.resize is None and tuple(x.shape[-2:]) != (t.size, t.size):
        x = TF.resize(x, [t.size, t.size], interpolation=mode, antialias=True)
    x = TF.center_crop(x, [t.size, t.size])
    return (x.float() / 255.0 - transform.mean) / transform.std


def embed_annotations(
    loaded: LoadedModel,
    annotations: pd.DataFrame,
    reader: PatchReader,
    pooling: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
) -> np.ndarray:
    """Frozen features [N, D] of every annotation's centred patch, in annotation order."""
    spec = loaded.spec
    pooling = pooling or spec.default_pooling
    if pooling == "patch_tokens":
        raise BenchmarkError("linear probing needs one vector per patch: pooling 'cls' or 'cls_mean'")
    dev = pick_device(device)
    amp = autocast_dtype(dev, precision, spec.precision)
    model = loaded.model.to(dev).eval()
    transform = ModelTransform(spec.transform)
    out = np.zeros((len(annotations), spec.pooled_dim(pooling)), np.float32)
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for rows, patches in iter_annotation_patches(
            reader, annotations, np.arange(len(annotations)), batch_size
        ):
            x = _to_batch(transform, patches).to(dev)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                pooled = encode(model, x, spec.num_prefix_tokens, pooling)
            out[rows] = pooled.float().cpu().numpy()
            done += len(rows)
            log.debug(
                "%s: %d/%d patches (%.1f/s)", spec.name, done, len(out), done / (time.perf_counter() - t0)
            )
    return out


# ----------------------------------------------------------------------------------------- linear probe


def fit_logistic_regression(
    x: np.ndarray, y: np.ndarray, max_iter: int = 1000, implementation: str = "torch"
) -> Callable[[np.ndarray], np.ndarray]:
    """Logistic regression with C = D·K/100 and L-BFGS; returns predict_proba (see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    classes = np.unique(y)
    if len(classes) < 2 or not np.array_equal(classes, np.arange(len(classes))):
        raise BenchmarkError(
            f"logistic regression needs labels 0…K-1 with K ≥ 2; got classes {classes.tolist()}"
        )
    c = x.shape[1] * len(classes) / 100.0
    if implementation == "sklearn":
        from histodistill.bench.probe import LogRegConfig, fit_logreg

        return fit_logreg(x, y, LogRegConfig(max_iter=max_iter, standardize=False))
    if implementation != "torch":
        raise BenchmarkError(
            f"unknown logistic-regression implementation {implementation!r} (torch, sklearn)"
        )
    feats, labels = torch.from_numpy(x), torch.from_numpy(y)
    head = nn.Linear(x.shape[1], len(classes))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(head(feats), labels) + (1.0 / c) * 0.5 * head.weight.norm(p=2)
        loss.backward()
        return loss

    opt.step(closure)

    def predict_proba(q: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(head(torch.as_tensor(np.asarray(q, np.float32))).double(), 1).numpy()

    predict_proba.C = c  # type: ignore[attr-defined]
    predict_proba.head = head  # type: ignore[attr-defined]
    return predict_proba


# ----------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Row positions (into the annotation table) of one run: train, validation and named test sets."""

    protocol: str
    run: int
    train: np.ndarray
    val: np.ndarray
    tests: dict[str, np.ndarray]
    fraction: float = 1.0
    train_domain: str = ALL


def _pick_cases(
    cases: np.ndarray, sizes: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Shuffle cases and take the prefix whose rows come closest to `fraction`: ≥ 1 case, never all."""
    if len(cases) < 2:
        return cases[:0]
    order = rng.permutation(len(cases))
    cumulative = np.cumsum(sizes[order])
    k = int(np.argmin(np.abs(cumulative - fraction * sizes.sum()))) + 1
    return cases[order[: min(max(k, 1), len(cases) - 1)]]


def _case_table(annotations: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    sub = annotations.iloc[rows]
    return sub.groupby(["domain", "case"], sort=True).size().rename("n").reset_index()


def _split_cases(
    annotations: pd.DataFrame, rows: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows → (picked, rest), picking ~`fraction` of each domain's rows as whole cases."""
    table = _case_table(annotations, rows)
    picked: list[str] = []
    for _, group in table.groupby("domain", sort=True):
        picked += _pick_cases(group["case"].to_numpy(), group["n"].to_numpy(), fraction, rng).tolist()
    in_pick = annotations["case"].iloc[rows].isin(picked).to_numpy()
    return rows[in_pick], rows[~in_pick]


def _nested_order(targets: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A random order of each label's rows: prefixes give nested, label-stratified subsamples."""
    return {int(t): rng.permutation(rows[targets[rows] == t]) for t in np.unique(targets[rows])}


def _take(order: dict[int, np.ndarray], fraction: float) -> np.ndarray:
    parts = [o[: max(1, math.ceil(fraction * len(o) - 1e-9))] for o in order.values() if len(o)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _require_both_labels(annotations: pd.DataFrame, rows: np.ndarray, what: str) -> None:
    present = set(annotations["target"].to_numpy()[rows].tolist())
    if present != {0, 1}:
        lacking = [label for label, t in TARGETS.items() if t not in present]
        raise BenchmarkError(
            f"{what} has no {lacking[0]} annotation ({len(rows)} rows); more cases (or another seed) needed"
        )


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent generator per (seed, keys): adding a run or a domain never shifts the others' draws."""
    words = [int(seed)]
    for k in keys:
        words.append(
            k if isinstance(k, int) else int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little")
        )
    return np.random.default_rng(words)


def scaling_splits(
    annotations: pd.DataFrame,
    fractions: Sequence[float] = FRACTIONS,
    test_fraction: float = 0.2,
    n_val_splits: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[Split]:
    """The data-scaling protocol: a fixed case-level test split, Monte-Carlo validation splits, fractions.

    One Split per (run, fraction). Cases never cross train, validation and test; the test split is the
    same for every run and fraction; within a run, a smaller fraction's train/val rows are a subset of a
    larger fraction's (see the module docstring).
    """
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise BenchmarkError(f"scaling fractions must lie in (0, 1]; got {fractions}")
    if n_val_splits < 1:
        raise BenchmarkError(f"n_val_splits must be ≥ 1; got {n_val_splits}")
    targets = annotations["target"].to_numpy()
    every = np.arange(len(annotations))
    test, pool = _split_cases(annotations, every, test_fraction, _rng(seed, "test"))
    if not len(test):
        raise BenchmarkError("scaling split: no domain has two cases, so no case can be held out for testing")
    _require_both_labels(annotations, test, "the scaling test split")
    out: list[Split] = []
    for run in range(n_val_splits):
        rng = _rng(seed, "val", run)
        val, train = _split_cases(annotations, pool, val_fraction, rng)
        _require_both_labels(annotations, train, f"scaling run {run}: the training split")
        train_order, val_order = _nested_order(targets, train, rng), _nested_order(targets, val, rng)
        for fraction in fractions:
            out.append(
                Split(
                    SCALING,
                    run,
                    _take(train_order, fraction),
                    _take(val_order, fraction),
                    {ALL: test},
                    fraction,
                )
            )
    return out


def cross_domain_splits(
    annotations: pd.DataFrame,
    holdout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    n_runs: int = 5,
    seed: int = 0,
) -> list[Split]:
    """Single-source cross-domain splits: one Split per (run, training domain), tested on every domain.

    The training domain's test set is its case-level holdout; every other domain is tested in full.
    """
    domains = sorted(annotations["domain"].unique())
    if len(domains) < 2:
        raise BenchmarkError(f"cross-domain evaluation needs ≥ 2 domains; the annotations have {domains}")
    cases = annotations.groupby("domain")["case"].nunique()
    few = [d for d in domains if cases[d] < 3]
    if few:
        raise BenchmarkError(
            f"domain {few[0]!r} has {cases[few[0]]} case(s); cross-domain evaluation needs ≥ 3 per domain "
            "(holdout, validation, training)"
        )
    domain_of = annotations["domain"].to_numpy()
    out: list[Split] = []
    for run in range(n_runs):
        for domain in domains:
            rng = _rng(seed, "cross", run, domain)
            rows = np.flatnonzero(domain_of == domain)
            holdout, rest = _split_cases(annotations, rows, holdout_fraction, rng)
            val, train = _split_cases(annotations, rest, val_fraction, rng)
            _require_both_labels(annotations, train, f"cross-domain run {run}, domain {domain!r}: training")
            tests = {d: (holdout if d == domain else np.flatnonzero(domain_of == d)) for d in domains}
            out.append(Split(CROSS_DOMAIN, run, train, val, tests, 1.0, domain))
    return out


def splits_frame(splits: Sequence[Split]) -> pd.DataFrame:
    """Splits as a long table (protocol, run, fraction, train_domain, role, test_domain, row) for Parquet."""
    parts = []
    for s in splits:
        roles = [("train", "", s.train), ("val", "", s.val)] + [("test", d, r) for d, r in s.tests.items()]
        for role, test_domain, rows in roles:
            parts.append(
                pd.DataFrame(
                    {
                        "protocol": s.protocol,
                        "run": s.run,
                        "fraction": s.fraction,
                        "train_domain": s.train_domain,
                        "role": role,
                        "test_domain": test_domain,
                        "row": np.asarray(rows, np.int64),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def splits_from_frame(frame: pd.DataFrame) -> list[Split]:
    """The inverse of `splits_frame` (a split with an empty validation set keeps an empty array)."""
    out = []
    keys = ["protocol", "run", "fraction", "train_domain"]
    for (protocol, run, fraction, train_domain), g in frame.groupby(keys, sort=False):
        rows = {role: g.loc[g["role"] == role, "row"].to_numpy(np.int64) for role in ("train", "val")}
        tests = {
            d: t["row"].to_numpy(np.int64)
            for d, t in g[g["role"] == "test"].groupby("test_domain", sort=False)
        }
        out.append(
            Split(protocol, int(run), rows["train"], rows["val"], tests, float(fraction), train_domain)
        )
    return out


# ----------------------------------------------------------------------------------------- sampler


class PatchSource(Protocol):
    """Anything that draws labelled training patches: uint8 [n, H, W, 3] and float targets [n]."""

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SamplerConfig:
    p_mitotic_figure: float = 0.5
    p_hard_negative: float = 0.25
    p_random: float = 0.25
    offset_frac: float = 0.1  # shift of annotated patches, up to ± this fraction of the patch side

    def probabilities(self) -> np.ndarray:
        p = np.array([self.p_mitotic_figure, self.p_hard_negative, self.p_random], np.float64)
        if (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-9):
            raise BenchmarkError(f"sampler probabilities must be ≥ 0 and sum to 1; got {p.tolist()}")
        return p


class SlidePatchSampler:
    """Draws 50% mitotic figures, 25% hard negatives, 25% random tissue patches from one split's rows."""

    KINDS = (MITOTIC_FIGURE, HARD_NEGATIVE, "random")

    def __init__(
        self,
        annotations: pd.DataFrame,
        rows: np.ndarray,
        reader: PatchReader,
        config: SamplerConfig | None = None,
    ):
        self.config = config or SamplerConfig()
        self.p = self.config.probabilities()
        self.reader = reader
        self.table = annotations.iloc[np.asarray(rows, np.int64)].reset_index(drop=True)
        if self.table.empty:
            raise BenchmarkError("the sampler got no annotations")
        xy = self.table[["x", "y"]].to_numpy(np.float64)
        label = self.table["label"].to_numpy()
        slide = self.table["slide_id"].to_numpy()
        # per slide: every point (random patches avoid them) and the points of each label
        self.points = {
            s: {kind: xy[(slide == s) & (label == kind)] for kind in TARGETS} for s in np.unique(slide)
        }
        for s, by_kind in self.points.items():
            by_kind["all"] = xy[slide == s]
        self.slides_with = {
            kind: sorted(s for s, by_kind in self.points.items() if len(by_kind[kind])) for kind in TARGETS
        }
        self.slides_with["random"] = sorted(self.points)
        if not self.slides_with[MITOTIC_FIGURE] and self.p[0] > 0:
            raise BenchmarkError("the sampler's split has no mitotic figure to draw")

    def draw_points(self, n: int, rng: np.random.Generator) -> pd.DataFrame:
        """n draws: slide_id, x, y (level-0 patch centre), target and kind."""
        p = self.p.copy()
        if not self.slides_with[HARD_NEGATIVE]:  # no imposters in this split: their share goes to random
            p[2] += p[1]
            p[1] = 0.0
        kinds = rng.choice(3, size=n, p=p)
        rows = []
        for k in kinds:
            kind = self.KINDS[k]
            slide_id = self.slides_with[kind][rng.integers(len(self.slides_with[kind]))]
            mine = self.points[slide_id]
            if kind == "random":
                x, y = self.reader.random_points(slide_id, 1, rng, mine["all"])[0]
            else:
                cx, cy = mine[kind][rng.integers(len(mine[kind]))]
                shift = self.config.offset_frac * self.reader.geometry(slide_id).footprint0
                x, y = cx + rng.uniform(-shift, shift), cy + rng.uniform(-shift, shift)
            rows.append((slide_id, float(x), float(y), self._target(slide_id, x, y), kind))
        return pd.DataFrame(rows, columns=["slide_id", "x", "y", "target", "kind"])

    def _target(self, slide_id: str, x: float, y: float) -> int:
        """1 when a mitotic figure of the split lies inside the patch (the authors' get_label)."""
        mf = self.points[slide_id][MITOTIC_FIGURE]
        half = self.reader.geometry(slide_id).footprint0 / 2
        return int(len(mf) > 0 and bool((np.abs(mf - [x, y]).max(1) < half).any()))

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        points = self.draw_points(n, rng)
        images = np.empty((n, self.reader.patch_px, self.reader.patch_px, 3), np.uint8)
        for slide_id, g in points.groupby("slide_id", sort=False):
            slide = self.reader.geometry(slide_id)
            xy = g[["x", "y"]].to_numpy(dtype=np.float64, copy=True)
            xy[:, 0] = xy[:, 0].clip(0, slide.width0 - 1)
            xy[:, 1] = xy[:, 1].clip(0, slide.height0 - 1)
            images[g.index.to_numpy()] = self.reader.read(slide_id, xy)
        return images, points["target"].to_numpy(np.float32)


@dataclass
class ArrayPatchSource:
    """In-memory patches drawn uniformly with replacement (tests, or a pre-extracted training set)."""

    images: np.ndarray
    targets: np.ndarray

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.images), size=n)
        return self.images[idx], np.asarray(self.targets, np.float32)[idx]


# ----------------------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraSettings:
    """LoRA fine-tuning settings (defaults: the paper's); shrink epochs/samples for CPU tests."""

    rank: int = 16
    alpha: int = 16
    dropout: float = 0.1
    max_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    cycle_momentum: bool = False  # True: torch's OneCycleLR default, as the authors' code (cycles β1)
    batch_size: int = 16
    epochs: int = 100
    epoch_samples: int = 1280
    val_samples: int = 1280
    eval_batch_size: int = 64
    pooling: str | None = None  # None: the model's registered pooling
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    seed: int = 0


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of the Linear layers LoRA adapts: each block's attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (fc1_g/x)."""
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and LORA_TARGET_PATTERN.fullmatch(n)
    ]
    if not names:
        raise BenchmarkError(
            f"{type(model).__name__} has no blocks.N.attn.qkv/proj or mlp.fc1/fc2 Linear layers for LoRA"
        )
    return names


class MitosisClassifier(nn.Module):
    """Backbone (LoRA-wrapped, merged or plain) → registered pooling → Linear(pooled_dim, 1) → one logit."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec, pooling: str, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.pooling = pooling
        self.head = head

    def _vit(self) -> nn.Module:
        """The encoder itself (inside a PeftModel its Linear layers carry the adapters)."""
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover - peft is a dependency
            return self.backbone
        return self.backbone.base_model.model if isinstance(self.backbone, PeftModel) else self.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encode(self._vit(), x, self.spec.num_prefix_tokens, self.pooling)).squeeze(-1)


def build_lora_classifier(
    loaded: LoadedModel, settings: LoraSettings | None = None, seed: int = 0
) -> MitosisClassifier:
    """A copy of the frozen backbone with LoRA adapters on the target layers, plus a trainable binary head."""
    import peft

    cfg = settings or LoraSettings()
    pooling = cfg.pooling or loaded.spec.default_pooling
    if pooling == "patch_tokens":
        raise BenchmarkError("the LoRA head needs one vector per patch: pooling 'cls' or 'cls_mean'")
    backbone = copy.deepcopy(loaded.model).cpu()
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_modules(backbone),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(backbone, config)
        head = nn.Linear(loaded.spec.pooled_dim(pooling), 1)
    return MitosisClassifier(wrapped, loaded.spec, pooling, head)


def merge_lora(classifier: MitosisClassifier) -> MitosisClassifier:
    """A copy whose backbone has the adapters merged into its weights (a plain timm model again)."""
    merged = copy.deepcopy(classifier)
    merged.backbone = merged.backbone.merge_and_unload()
    return merged


@dataclass
class LoraFit:
    classifier: MitosisClassifier
    history: pd.DataFrame  # epoch, train_loss, val_loss, lr (of the epoch's last step)
    best_epoch: int
    best_val_loss: float


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def predict_logits(
    classifier: MitosisClassifier,
    images: np.ndarray,
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int = 64,
) -> np.ndarray:
    """Logits [n] of uint8 patches [n, H, W, 3] in eval mode."""
    transform = ModelTransform(classifier.spec.transform)
    classifier.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = _to_batch(transform, images[s : s + batch_size]).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out.append(classifier(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_lora(
    classifier: MitosisClassifier,
    train: PatchSource,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    settings: LoraSettings | None = None,
    seed: int = 0,
) -> LoraFit:
    """Adam + OneCycleLR + BCE over pseudo-epochs of sampler draws; keeps the epoch with the lowest val loss.

    Deterministic on CPU for a seed: draws come from a numpy generator, dropout from a forked torch RNG.
    """
    cfg = settings or LoraSettings()
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_lora(classifier, train, val_images, np.asarray(val_targets, np.float32), cfg, seed)


def _train_lora(
    classifier, train: PatchSource, val_images, val_targets, cfg: LoraSettings, seed: int
) -> LoraFit:
    dev = pick_device(cfg.device)
    amp = autocast_dtype(dev, cfg.precision, classifier.spec.precision)
    classifier.to(dev)
    transform = ModelTransform(classifier.spec.transform)
    params = [p for p in classifier.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.max_lr, betas=cfg.betas)
    steps = math.ceil(cfg.epoch_samples / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.max_lr, epochs=cfg.epochs, steps_per_epoch=steps, cycle_momentum=cfg.cycle_momentum
    )
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng([seed, 1])
    best, best_epoch, best_state = math.inf, -1, None
    history = []
    for epoch in range(cfg.epochs):
        classifier.train()
        total, seen = 0.0, 0
        for step in range(steps):
            n = min(cfg.batch_size, cfg.epoch_samples - step * cfg.batch_size)
            images, targets = train.draw(n, rng)
            x = _to_batch(transform, images).to(dev)
            t = torch.as_tensor(targets, dtype=torch.float32, device=dev)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                logits = classifier(x)
            loss = loss_fn(logits.float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr = opt.param_groups[0]["lr"]  # the rate this step used
            sched.step()
            total += float(loss.detach()) * n
            seen += n
        logits = predict_logits(classifier, val_images, dev, amp, cfg.eval_batch_size)
        val_loss = (
            float(loss_fn(torch.as_tensor(logits), torch.as_tensor(val_targets))) if len(logits) else math.nan
        )
        history.append((epoch, total / max(seen, 1), val_loss, lr))
        if len(logits) == 0:  # nothing to select on: the last epoch is the result
            best, best_epoch = val_loss, epoch
        elif val_loss < best:
            best, best_epoch, best_state = val_loss, epoch, _trainable_state(classifier)
        log.info("LoRA epoch %d/%d: train %.4f, val %.4f", epoch + 1, cfg.epochs, history[-1][1], val_loss)
    if best_state is not None:
        classifier.load_state_dict(best_state, strict=False)
    frame = pd.DataFrame(history, columns=["epoch", "train_loss", "val_loss", "lr"])
    return LoraFit(classifier.eval(), frame, best_epoch, best)


# ----------------------------------------------------------------------------------------- evaluation

PREDICTION_KEYS = ["model", "method", "protocol", "fraction", "train_domain", "test_domain", "run"]
PREDICTION_COLUMNS = [*PREDICTION_KEYS, "row", "target", "probability", "n_train"]


def _predictions(
    model: str, method: str, split: Split, test_domain: str, rows, targets, p1, n_train: int
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": model,
            "method": method,
            "protocol": split.protocol,
            "fraction": float(split.fraction),
            "train_domain": split.train_domain,
            "test_domain": test_domain,
            "run": int(split.run),
            "row": np.asarray(rows, np.int64),
            "target": np.asarray(targets, np.int64),
            "probability": np.asarray(p1, np.float64),
            "n_train": int(n_train),
        },
        columns=PREDICTION_COLUMNS,
    )


def score_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per-annotation probabilities → tidy metric rows (balanced accuracy, weighted F1, AUROC, n_train).

    Kept apart from prediction so a GPU job without scikit-learn (the torch env) can write predictions
    and the bench env scores them. A test set with one class gets AUROC NaN and a warning.
    """
    from histodistill.bench.probe import classification_metrics

    rows: list[tuple] = []
    for key, g in predictions.groupby(PREDICTION_KEYS, sort=False, dropna=False):
        codes = g["target"].to_numpy(np.int64)
        p1 = g["probability"].to_numpy(np.float64)
        if len(np.unique(codes)) < 2:
            log.warning("%s: the test set has %d annotation(s) of one class; AUROC is NaN", key, len(codes))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="AUROC undefined")
            warnings.filterwarnings("ignore", message="A single label was found")
            metrics = classification_metrics(codes, np.stack([1.0 - p1, p1], 1))
        metrics["n_train"] = float(g["n_train"].iloc[0])
        rows += [(*key, name, float(v)) for name, v in metrics.items()]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def predict_linear(
    features: np.ndarray,
    annotations: pd.DataFrame,
    split: Split,
    model: str,
    max_iter: int = 1000,
    implementation: str = "torch",
) -> pd.DataFrame:
    """Linear probing on one split: fit on train ∪ val, predict every test set (PREDICTION_COLUMNS)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(annotations):
        raise BenchmarkError(
            f"{model}: features have shape {features.shape}, expected [{len(annotations)}, D]"
        )
    if not np.isfinite(features).all():
        raise BenchmarkError(f"{model}: the features hold NaN or inf")
    targets = annotations["target"].to_numpy()
    fit_rows = np.union1d(split.train, split.val)
    predict = fit_logistic_regression(features[fit_rows], targets[fit_rows], max_iter, implementation)
    frames = []
    for test_domain, test in split.tests.items():
        p1 = predict(features[test])[:, 1] if len(test) else np.zeros(0)
        frames.append(
            _predictions(model, "linear_probe", split, test_domain, test, targets[test], p1, len(fit_rows))
        )
    return pd.concat(frames, ignore_index=True)


def run_linear_protocol(
    features: np.ndarray,
    annotations: pd.DataFrame,
    splits: Sequence[Split],
    model: str,
    max_iter: int = 1000,
    implementation: str = "torch",
) -> pd.DataFrame:
    """Linear probing over every split (scaling or cross-domain), scored: one tidy frame."""
    frames = [predict_linear(features, annotations, s, model, max_iter, implementation) for s in splits]
    return score_predictions(pd.concat(frames, ignore_index=True))


def predict_lora(
    loaded: LoadedModel,
    annotations: pd.DataFrame,
    split: Split,
    reader: PatchReader,
    model: str,
    settings: LoraSettings | None = None,
) -> tuple[pd.DataFrame, LoraFit]:
    """LoRA on one split: train with the sampler, keep the best validation epoch, predict every test set.

    The seed is `settings.seed + 1000·run`, so a run's result does not depend on which other runs or
    fractions are computed (Snakemake may run each split as its own job).
    """
    cfg = settings or LoraSettings()
    seed = cfg.seed + 1000 * split.run
    if not len(split.val):
        raise BenchmarkError(f"{model}: LoRA run {split.run} ({split.train_domain}) has no validation rows")
    train_source = SlidePatchSampler(annotations, split.train, reader, cfg.sampler)
    val_source = SlidePatchSampler(annotations, split.val, reader, cfg.sampler)
    val_images, val_targets = val_source.draw(cfg.val_samples, np.random.default_rng([seed, 2]))
    classifier = build_lora_classifier(loaded, cfg, seed)
    fit = train_lora(classifier, train_source, val_images, val_targets, cfg, seed)
    dev = pick_device(cfg.device)
    amp = autocast_dtype(dev, cfg.precision, loaded.spec.precision)
    targets = annotations["target"].to_numpy()
    frames = []
    with torch_threads(cfg.threads):
        for test_domain, test in split.tests.items():
            logits = np.zeros(len(test), np.float32)
            position = {int(r): i for i, r in enumerate(test)}
            for chunk, patches in iter_annotation_patches(reader, annotations, test, cfg.eval_batch_size):
                idx = [position[int(r)] for r in chunk]
                logits[idx] = predict_logits(fit.classifier, patches, dev, amp, cfg.eval_batch_size)
            p1 = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            frames.append(
                _predictions(model, "lora", split, test_domain, test, targets[test], p1, len(split.train))
            )
    fit.classifier.cpu()
    return pd.concat(frames, ignore_index=True), fit


def run_lora_protocol(
    loaded: LoadedModel,
    annotations: pd.DataFrame,
    splits: Sequence[Split],
    reader: PatchReader,
    model: str,
    settings: LoraSettings | None = None,
    score: bool = True,
) -> pd.DataFrame:
    """`predict_lora` over every split: scored tidy rows, or (score=False) the predictions themselves."""
    frames = []
    for s in splits:
        t0 = time.perf_counter()
        predictions, fit = predict_lora(loaded, annotations, s, reader, model, settings)
        log.info(
            "%s LoRA %s run %d (fraction %g, %s): best epoch %d, %.0f s",
            model,
            s.protocol,
            s.run,
            s.fraction,
            s.train_domain,
            fit.best_epoch,
            time.perf_counter() - t0,
        )
        frames.append(predictions)
    predictions = pd.concat(frames, ignore_index=True)
    return score_predictions(predictions) if score else predictions


# ----------------------------------------------------------------------------------------- summaries


def summarize_results(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sample std (ddof 1; 0 for a single run) and run count per model/method/protocol/setting/metric."""
    grouped = rows.groupby(SUMMARY_KEYS, sort=True, dropna=False)["value"]
    out = grouped.agg(
        mean="mean", std=lambda v: float(v.std(ddof=1)) if v.notna().sum() > 1 else 0.0, n="count"
    )
    return out.reset_index()


def cross_domain_matrix(rows: pd.DataFrame, model: str, method: str, metric: str = "auroc") -> pd.DataFrame:
    """N×N mean over runs: rows = training domain, columns = test domain (diagonal: in-domain holdout)."""
    sel = rows[
        (rows["protocol"] == CROSS_DOMAIN)
        & (rows["model"] == model)
        & (rows["method"] == method)
        & (rows["metric"] == metric)
    ]
    if sel.empty:
        raise BenchmarkError(f"no cross-domain {metric} rows for model {model!r}, method {method!r}")
    value = "mean" if "mean" in sel.columns else "value"
    domains = sorted(set(sel["train_domain"]) | set(sel["test_domain"]))
    matrix = sel.pivot_table(index="train_domain", columns="test_domain", values=value, aggfunc="mean")
    return matrix.reindex(index=domains, columns=domains)


# ----------------------------------------------------------------------------------------- output


def write_results(rows: pd.DataFrame, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Tidy rows → Parquet (atomic), with the provenance as JSON under schema metadata b"histodistill"."""
    write_parquet(rows, path, dict(meta))


def read_results(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """A result (or split) file written by `write_results`, and its provenance."""
    return read_parquet(path, "result file", BenchmarkError)


@contextlib.contextmanager
def _figure(path: str | os.PathLike, **kwargs) -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(**kwargs)
    try:
        yield fig
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_scaling(summary: pd.DataFrame, path: str | os.PathLike, metrics: Sequence[str] = METRICS) -> None:
    """Scaling curves: one panel per metric, one line (mean ± std band) per model and method."""
    sel = summary[summary["protocol"] == SCALING]
    if sel.empty:
        raise BenchmarkError("no scaling rows to plot")
    with _figure(path, figsize=(4.2 * len(metrics), 3.6)) as fig:
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics, strict=True):
            for (model, method), g in sel[sel["metric"] == metric].groupby(["model", "method"], sort=True):
                g = g.sort_values("fraction")
                pct = g["fraction"].to_numpy() * 100
                ax.plot(pct, g["mean"], marker="o", label=f"{model} · {method}")
                ax.fill_between(pct, g["mean"] - g["std"], g["mean"] + g["std"], alpha=0.2)
            ax.set_xscale("log")
            ax.set_xlabel("training data (%)")
            ax.set_title(metric.replace("_", " "))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test score (mean ± std over runs)")
        labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
        if labelled:  # a metric without rows draws no line
            labelled[-1].legend(fontsize=7, loc="lower right")


def plot_cross_domain(summary: pd.DataFrame, path: str | os.PathLike, metric: str = "auroc") -> None:
    """Cross-domain heat maps (training domain × test domain) of the mean metric, one per model and method."""
    sel = summary[(summary["protocol"] == CROSS_DOMAIN) & (summary["metric"] == metric)]
    if sel.empty:
        raise BenchmarkError(f"no cross-domain {metric} rows to plot")
    pairs = sorted(set(zip(sel["model"], sel["method"], strict=True)))
    n = len(sel["train_domain"].unique())
    with _figure(path, figsize=(max(3.5, 0.9 * n + 2) * len(pairs), max(3.2, 0.8 * n + 1.5))) as fig:
        axes = fig.subplots(1, len(pairs), squeeze=False)[0]
        for ax, (model, method) in zip(axes, pairs, strict=True):
            m = cross_domain_matrix(sel, model, method, metric)
            image = ax.imshow(
                m.to_numpy(dtype=float), vmin=0.5 if metric == "auroc" else 0.0, vmax=1.0, cmap="viridis"
            )
            for (i, j), v in np.ndenumerate(m.to_numpy(dtype=float)):
                ax.text(
                    j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7, color="w"
                )
            ax.set_xticks(range(len(m.columns)), m.columns, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(m.index)), m.index, fontsize=7)
            ax.set_xlabel("test domain")
            ax.set_ylabel("training domain")
            ax.set_title(f"{model} · {method} ({metric})", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)


def settings_params(settings: LoraSettings) -> dict[str, Any]:
    """LoRA settings as JSON-able params for provenance / Snakemake `params:`."""
    return json.loads(json.dumps(asdict(settings), default=str))
