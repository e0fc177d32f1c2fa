"""EVA's semantic segmentation on frozen patch tokens (CoNSeP, MoNuSAC; a synthetic demo task), scored by Dice.

Reference: kaiko-ai/eva 0.4.5 (commit 73b61a797bfda8daf232f6abea2bc87ac614589c, "bump version to 0.4.5", of
2026-04-29; the same configs as tag 0.4.5), `configs/vision/pathology/offline/segmentation/{consep,monusac}.yaml`
and the code they name; MONAI 1.5.0 (Project-MONAI/MONAI, commit d388d1c6; EVA requires monai ≥ 1.3.2),
`monai/losses/dice.py`, `monai/metrics/meandice.py`, `monai/metrics/utils.py`, which EVA wraps. Re-implemented to the same numbers:

- **Features.** The encoder's last-layer patch tokens with the CLS and register tokens removed, laid out as
  the square patch grid [B, D, h, w] (EVA `ExtractPatchFeatures`: `tokens[:, 1 + registers:]`, permuted and
  reshaped; `tokens_to_grid`), computed once per dataset and cached (EVA's `SegmentationEmbeddingsWriter`
  predict step; here the `embed` rule with pooling `patch_tokens`), then the decoder trains on the cache.
- **Decoder** `ConvDecoderMS` (EVA `decoders/segmentation/semantic/common.py`, after DINOv2's `+ms`):
  nearest 2× upsampling, 3×3 conv D → 64, nearest 2× upsampling, 3×3 conv 64 → classes, then the logits are
  bilinearly interpolated to the mask size (`Decoder2D._upscale`, align_corners False). A patch-14 model
  (224 px → 16 × 16 tokens → 64 × 64 logits) and a patch-16 model (14 × 14 → 56 × 56) both end at the mask's
  224 × 224: the token grid is never resized, only the logits (EVA's handling).
- **Loss** EVA `DiceLoss(softmax=True, batch=True[, ignore_index])` = MONAI `DiceLoss` (background included,
  smooth_nr = smooth_dr = 1e-5, intersection and sums over batch and pixels per class, mean over classes);
  `ignore_index` (MoNuSAC's "Ambiguous", 5) sets the logits of those pixels to 0 and their target to 0
  (EVA `_apply_ignore_index`), as EVA does (`dice_loss`).
- **Optimiser** `torch.optim.AdamW(lr 0.002)` (torch's other defaults: weight decay 0.01); the scheduler is
  `SemanticSegmentationModule`'s default `ConstantLR` (factor 1/3, 5 iterations) stepped per epoch (Lightning's
  default interval): lr/3 for the first 5 epochs. `max_steps` 2000, batch size 64, shuffled.
- **Validation and selection.** After every epoch the decoder is scored on the validation split with the
  monitored metric `val/MonaiDiceScore`; early stopping (min_delta 0, mode max; patience 200 checks for
  CoNSeP, 100 for MoNuSAC) and the best checkpoint (`checkpoint_type: best`), which is the one reported.
  Five runs (`n_runs`), seeded once (`seed_everything(42)`) and run one after the other.
- **Dice** (`monai_dice`, `mean_dice`): `val/MonaiDiceScore` is `MulticlassSegmentationMetrics`'
  `MonaiDiceScore(include_background=False, ignore_empty=True)` on argmax predictions: per image and per
  class except background (class 0), Dice = 2|P∩T| / (|P| + |T|), NaN where the image's target lacks the
  class; MONAI's "mean" reduction averages each image's non-NaN classes, then the images that have any (a
  per-image macro average). With `ignore_index` the target's ignored pixels count for no class, while the
  prediction there still counts (EVA `apply_ignore_index`, which masks on the prediction's ignore channel,
  never set by a decoder without that class), and the ignored class is dropped. The per-class scores EVA also
  logs (`ClasswiseWrapper` of `MonaiDiceScore(include_background=True, reduction="none")`: per class, the
  mean over images with that class) are reported as `dice_<class>`.
- **Data** (`SEGMENTATION_TASKS`): CoNSeP (Graham et al. 2019) `Train/Images/*.png`, `Train/Labels/*.mat`
  (`type_map`), `Test/…` alike; EVA's train split is `Train` (27 images), its validation split `Test` (14);
  each 1000 × 1000 image (0.25 µm/px) is cut into a grid of 250 × 250 patches (`GridSampler`, no overlap:
  16 per image), resized to 224 (bilinear image, nearest mask; `ResizeAndCrop`); classes 3, 4 → epithelial
  (3) and 5, 6, 7 → spindle-shaped (4): background, other, inflammatory, epithelial, spindle-shaped.
  MoNuSAC (Verma et al. 2021) `MoNuSAC_images_and_annotations/**/*.tif` (+ `.xml`, 209 images; train) and
  `MoNuSAC Testing Data and Annotations/**/*.tif` (85; EVA validates on this test split), each whole image
  resized (shorter side 224) and centre-cropped to 224; classes background, epithelial, lymphocyte,
  neutrophil, macrophage, ambiguous (any other region name → ambiguous, ignored: `ignore_index` 5; the
  decoder has 5 outputs).

Deliberate deviations: (1) the tokens are the encoder's *normed* last-layer output (what `embed` gives every
model, and what EVA's HuggingFace-backed encoders give); EVA's timm-backed encoders give timm's
`forward_intermediates` output of the last block *before* the final norm. (2) The input normalisation is the
model's own transform (`histodistill.models`), not EVA's ImageNet mean/std default (which its leaderboard
overrides per model with NORMALIZE_MEAN/STD). (3) Randomness: one torch generator seeded with `seed` (42)
drives the decoder's init and the batch order of all runs, EVA's structure but not its bit stream. (4) The
patches are packed once at 224 px (uint8, as every tile store) and the model's transform normalises them;
EVA resizes and normalises on the fly, in float. (5) EVA's MoNuSAC config sets no `lr_multiplier_encoder`
and CoNSeP's sets 0.0: both mean a frozen encoder here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from histodistill.bench import BenchmarkError
from histodistill.bench.registry import Benchmark, Figure, by_model, complete_mean, with_mean_over_tasks
from histodistill.devices import torch_threads

log = logging.getLogger(__name__)

EVA_REFERENCE = "kaiko-ai/eva 0.4.5, commit 73b61a797bfda8daf232f6abea2bc87ac614589c"
ROW_COLUMNS = ("task", "run", "metric", "value")


@dataclass(frozen=True)
class SegmentationConfig:
    """EVA's offline segmentation settings (module docstring; defaults: EVA's CoNSeP config).

    `patience` counts epochs (validations) without a strictly better Dice (None: never stop); the lr is
    `lr · low_lr_factor` for the first `low_lr_epochs` epochs; `n_runs` runs from one generator seeded with
    `seed`; `threads` torch threads while training (None leaves torch's setting).
    """

    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.01
    patience: int | None = 200
    low_lr_factor: float = 1 / 3
    low_lr_epochs: int = 5
    n_runs: int = 5
    seed: int = 42
    threads: int | None = None

    def __post_init__(self):
        if not 0 < self.low_lr_factor <= 1:
            raise BenchmarkError(f"segmentation: low_lr_factor {self.low_lr_factor} is not in (0, 1]")
        if self.max_steps < 1 or self.batch_size < 1 or self.n_runs < 1:
            raise BenchmarkError("segmentation: max_steps, batch_size and n_runs must be ≥ 1")


@dataclass(frozen=True)
class SegmentationTask:
    """One EVA segmentation task: class names (index order, 0 background), the ignored class (or None), the
    split names EVA trains and validates on, and its early-stopping patience."""

    classes: tuple[str, ...]
    ignore_index: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    patience: int = 200

    @property
    def n_outputs(self) -> int:
        """The decoder's outputs: every class but an ignored last one (EVA: `num_classes` of the decoder)."""
        if self.ignore_index is not None and self.ignore_index == len(self.classes) - 1:
            return len(self.classes) - 1
        return len(self.classes)


# EVA 0.4.5 `configs/vision/pathology/offline/segmentation/{consep,monusac}.yaml`.
SEGMENTATION_TASKS: dict[str, SegmentationTask] = {
    "consep": SegmentationTask(
        ("background", "other", "inflammatory", "epithelial", "spindle-shaped"), None, "train", "val", 200
    ),
    "monusac": SegmentationTask(
        ("background", "epithelial", "lymphocyte", "neutrophil", "macrophage", "ambiguous"),
        5,
        "train",
        "test",
        100,
    ),
}


# ------------------------------------------------------------------------------------------- decoder


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens [B, P, D] (prefix tokens already removed) → the patch grid [B, D, h, w], h = w = √P
    (EVA `ExtractPatchFeatures`). Raises BenchmarkError when P is not a square."""
    b, p, d = tokens.shape
    side = math.isqrt(p)
    if side * side != p:
        raise BenchmarkError(f"segmentation: {p} patch tokens are not a square grid (registers left in?)")
    return tokens.permute(0, 2, 1).reshape(b, d, side, side)


class ConvDecoderMS(nn.Module):
    """EVA's `ConvDecoderMS`: [B, D, h, w] → logits [B, classes, *to_size] (module docstring)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(in_features, 64, kernel_size=(3, 3), padding=(1, 1)),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(64, num_classes, kernel_size=(3, 3), padding=(1, 1)),
        )

    def forward(self, grid: torch.Tensor, to_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.layers(grid), to_size, mode="bilinear")


# ------------------------------------------------------------------------------------- loss and Dice


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """EVA's `DiceLoss(softmax=True, batch=True, ignore_index)`: logits [B, C, H, W], integer target [B, H, W].

    Ignored pixels get logits 0 and target 0 (EVA `_apply_ignore_index`); then MONAI's Dice loss with the
    background: per class c, 1 − (2 Σ p·t + 1e-5) / (Σ p + Σ t + 1e-5) over batch and pixels, mean over c.
    """
    if ignore_index is not None:
        keep = target != ignore_index
        target = target * keep
        logits = logits * keep.unsqueeze(1)
    probs = torch.softmax(logits, dim=1)
    target = target.long()
    n_classes = logits.shape[1]
    # Σ p·t per class: each pixel's probability of its own class, summed by class (no one-hot tensor)
    own = probs.gather(1, target.unsqueeze(1)).flatten()
    tp = torch.zeros(n_classes, dtype=probs.dtype).index_add_(0, target.flatten(), own)
    t_sum = torch.bincount(target.flatten(), minlength=n_classes).to(probs.dtype)
    denominator = probs.sum((0, 2, 3)) + t_sum
    return (1 - (2 * tp + 1e-5) / (denominator + 1e-5)).mean()


def monai_dice(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    include_background: bool = False,
) -> np.ndarray:
    """Per-image, per-class Dice as EVA's `MonaiDiceScore` (ignore_empty=True) computes it: float64 [N, K].

    pred, target: integer labels [N, H, W] (pred: the argmax). Classes 0 … num_classes − 1, less the
    background (0) unless `include_background` (or unless `ignore_index` is 0, as EVA), less `ignore_index`;
    column k is the k-th class kept. Entry = 2|P∩T| / (|P| + |T|) for that image and class; NaN where the
    image's target has none of the class. With `ignore_index`, target pixels of that class count for no
    class and prediction pixels count as predicted (EVA `apply_ignore_index` masks by the prediction's
    ignore channel; pixels predicted as the ignored class are dropped from the target too).
    """
    pred, target = np.asarray(pred).astype(np.int64), np.asarray(target).astype(np.int64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise BenchmarkError(f"Dice: predictions {pred.shape} and targets {target.shape} differ")
    for what, labels in (("predictions", pred), ("targets", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise BenchmarkError(f"Dice: {what} hold labels outside 0–{num_classes - 1}")
    n, k = len(pred), num_classes
    # per image the confusion counts [N, predicted, target], one bincount for all images
    codes = (np.arange(n)[:, None] * k + pred.reshape(n, -1)) * k + target.reshape(n, -1)
    confusion = np.bincount(codes.ravel(), minlength=n * k * k).reshape(n, k, k).astype(np.float64)
    keep = list(range(k))
    if ignore_index is not None:
        confusion[:, ignore_index, :] = 0  # pixels predicted as the ignored class leave the target
        keep.remove(ignore_index)
    if not (include_background or ignore_index == 0):
        keep = [c for c in keep if c != 0]
    inter = np.diagonal(confusion, axis1=1, axis2=2)[:, keep]
    t_sum = confusion.sum(1)[:, keep]  # the ignored class's target pixels are in no kept column
    p_sum = confusion.sum(2)[:, keep]  # rows of kept classes: every pixel predicted as one, ignored or not
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(t_sum > 0, 2 * inter / (t_sum + p_sum), np.nan)


def mean_dice(per_image: np.ndarray) -> float:
    """MONAI's "mean" reduction of [N, K] Dice with NaNs: each image's mean over its non-NaN classes, then the
    mean over images that have any (0.0 when none has any, as MONAI)."""
    per_image = np.asarray(per_image, np.float64)
    counts = (~np.isnan(per_image)).sum(1)
    image_means = np.nansum(per_image, 1)[counts > 0] / counts[counts > 0]
    return float(image_means.mean()) if len(image_means) else 0.0


def classwise_dice(per_image: np.ndarray) -> np.ndarray:
    """EVA's per-class scores (`ClasswiseWrapper` of `MonaiDiceScore(reduction="none")`): [N, K] → [K], the
    mean over images of each class's non-NaN entries (NaN for a class no image has)."""
    per_image = np.asarray(per_image, np.float64)
    counts = (~np.isnan(per_image)).sum(0)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.nansum(per_image, 0) / np.maximum(counts, 1), np.nan)


# ------------------------------------------------------------------------------------------- training


@dataclass
class DecoderFit:
    """A trained decoder: the best state's step and validation Dice, steps run, and each epoch's lr."""

    decoder: ConvDecoderMS
    best_step: int
    best_dice: float
    steps: int
    lrs: list[float] = field(default_factory=list)

    @torch.no_grad()
    def predict(
        self, tokens: np.ndarray | torch.Tensor, size: tuple[int, int], batch_size: int = 64
    ) -> np.ndarray:
        """Argmax labels int64 [N, *size] of patch tokens [N, P, D]."""
        self.decoder.eval()
        x = torch.as_tensor(np.asarray(tokens, np.float32))
        out = [
            self.decoder(tokens_to_grid(x[s : s + batch_size]), size).argmax(1)
            for s in range(0, len(x), batch_size)
        ]
        self.decoder.train()
        return torch.cat(out).numpy() if out else np.zeros((0, *size), np.int64)


def train_decoder(
    tokens_train: np.ndarray,
    masks_train: np.ndarray,
    tokens_val: np.ndarray | None,
    masks_val: np.ndarray | None,
    task: SegmentationTask,
    config: SegmentationConfig | None = None,
    generator: torch.Generator | None = None,
) -> DecoderFit:
    """Train EVA's decoder on cached patch tokens; keep the state with the best validation Dice.

    tokens [N, P, D] float (P a square), masks uint8/int [N, H, W] with labels in [0, len(task.classes)).
    Randomness (the decoder's init, then the batch order) comes from `generator` (advanced; EVA's one stream
    over its runs), else from one seeded with `config.seed`; the global torch RNG is left as it was. Validates
    after each epoch (`mean_dice`), stops after `patience` epochs without a strictly better score.
    """
    cfg = config or SegmentationConfig(patience=task.patience)
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    with torch_threads(cfg.threads):
        return _train(tokens_train, masks_train, tokens_val, masks_val, task, cfg, gen)


def _train(tokens_train, masks_train, tokens_val, masks_val, task, cfg, gen) -> DecoderFit:
    x = torch.as_tensor(np.asarray(tokens_train, np.float32))
    y = torch.as_tensor(np.asarray(masks_train)).long()
    if len(x) != len(y) or len(x) == 0:
        raise BenchmarkError(f"segmentation: {len(x)} training token sets but {len(y)} masks")
    size = tuple(y.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())  # nn layers draw their init from the global RNG
        decoder = ConvDecoderMS(x.shape[-1], task.n_outputs)
        gen.set_state(torch.get_rng_state())
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.low_lr_epochs > 0:
        sched = torch.optim.lr_scheduler.ConstantLR(
            opt, factor=cfg.low_lr_factor, total_iters=cfg.low_lr_epochs
        )
    has_val = tokens_val is not None and len(tokens_val) > 0
    fit = DecoderFit(decoder, 0, -math.inf, 0)
    best_state, bad, step, stop, n = None, 0, 0, False, len(x)
    while step < cfg.max_steps and not stop:
        fit.lrs.append(float(opt.param_groups[0]["lr"]))
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss = dice_loss(decoder(tokens_to_grid(x[idx]), size), y[idx], task.ignore_index)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= cfg.max_steps:
                break
        if has_val:  # end of the epoch (or the last step): Lightning validates, then early-stops
            score = mean_dice(
                monai_dice(fit.predict(tokens_val, size), masks_val, len(task.classes), task.ignore_index)
            )
            if score > fit.best_dice:  # strictly better (min_delta 0, mode max)
                fit.best_dice, fit.best_step, bad = score, step, 0
                best_state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
            else:
                bad += 1
                stop = cfg.patience is not None and bad >= cfg.patience
        if sched is not None:
            sched.step()  # Lightning's default `interval: epoch`
    fit.steps = step
    if best_state is not None:
        decoder.load_state_dict(best_state)
    else:
        fit.best_step = step
    return fit


def score_task(
    name: str,
    task: SegmentationTask,
    tokens: np.ndarray,
    masks: np.ndarray,
    splits: np.ndarray,
    config: SegmentationConfig | None = None,
) -> pd.DataFrame:
    """EVA's protocol on one task: `n_runs` decoders (one generator seeded once), each scored on the
    validation split with its best state. tokens [N, P, D], masks [N, H, W], splits [N] (split names).

    Rows (task, run, metric, value): `dice` (EVA's `MonaiDiceScore`, the headline), `dice_<class>` for every
    class (EVA's classwise log, background included, the ignored class not), `best_step`. Raises
    BenchmarkError when a split is empty.
    """
    cfg = config or SegmentationConfig(patience=task.patience)
    splits = np.asarray(splits).astype(str)
    train, val = splits == task.train_split, splits == task.val_split
    if not train.any() or not val.any():
        raise BenchmarkError(
            f"segmentation task {name}: needs rows in split {task.train_split!r} and {task.val_split!r}; "
            f"it has {sorted(set(splits))}"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    kept = [c for i, c in enumerate(task.classes) if i != task.ignore_index]
    for run in range(cfg.n_runs):
        fit = train_decoder(tokens[train], masks[train], tokens[val], masks[val], task, cfg, gen)
        pred = fit.predict(tokens[val], tuple(masks.shape[1:]))
        n_classes = len(task.classes)
        dice = mean_dice(monai_dice(pred, masks[val], n_classes, task.ignore_index))
        per_class = classwise_dice(monai_dice(pred, masks[val], n_classes, task.ignore_index, True))
        rows.append({"task": name, "run": run, "metric": "dice", "value": dice})
        rows += [
            {"task": name, "run": run, "metric": f"dice_{c}", "value": float(v)}
            for c, v in zip(kept, per_class, strict=True)
        ]
        rows.append({"task": name, "run": run, "metric": "best_step", "value": float(fit.best_step)})
        log.info(
            "segmentation %s run %d: Dice %.4f (best step %d of %d)",
            name,
            run,
            dice,
            fit.best_step,
            fit.steps,
        )
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


# ----------------------------------------------------------------------------------------- task stores
#
# A segmentation store is a tile store (`histodistill.tilestore`: `tiles` [N, S, S, 3], index, attrs) that
# the `embed` rule embeds (pooling `patch_tokens`), plus `masks` uint8 [N, S, S] (class indices) and attrs
# `classes`, `ignore_index`; its row manifest (CSV: tile_index, split, source) gives each row's split.


def write_segmentation_store(
    out_store: str | Path,
    out_manifest: str | Path,
    items,
    n: int,
    classes: Sequence[str],
    ignore_index: int | None = None,
    tile_px: int = 224,
    mpp: float | None = None,
    settings: Mapping | None = None,
    chunk_tiles: int = 64,
) -> int:
    """Write a segmentation store from `items`: n tuples (tile uint8 [S, S, 3], mask uint8 [S, S], split,
    source), streamed in chunks of `chunk_tiles`; atomically. Returns n. Raises BenchmarkError when an item
    has the wrong shape or a label outside the classes, or there are not n items."""
    import zarr

    from histodistill.atomic import atomic_path
    from histodistill.provenance import provenance
    from histodistill.tilestore import create_tiles_array, write_index

    splits, sources = [], []
    with atomic_path(out_store) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        tiles = create_tiles_array(root, (n,), tile_px, chunk_tiles)
        masks = root.create_array(
            "masks", shape=(n, tile_px, tile_px), chunks=(1, tile_px, tile_px), dtype="uint8"
        )
        write_index(
            root,
            {
                "slide_index": np.zeros(n, np.int32),
                "tile_id": np.arange(n, dtype=np.int64),
                "x0": np.zeros(n, np.int64),
                "y0": np.zeros(n, np.int64),
                "level": np.zeros(n, np.int32),
                "tissue_frac": np.full(n, np.nan, np.float32),
            },
        )
        tile_buf = np.empty((chunk_tiles, tile_px, tile_px, 3), np.uint8)
        mask_buf = np.empty((chunk_tiles, tile_px, tile_px), np.uint8)
        count = 0
        for tile, mask, split, source in items:
            if tile.shape != (tile_px, tile_px, 3) or mask.shape != (tile_px, tile_px):
                raise BenchmarkError(f"segmentation store: {source} gives {tile.shape} / {mask.shape}")
            if mask.max(initial=0) >= len(classes):
                raise BenchmarkError(f"segmentation store: {source} has label {mask.max()} ≥ {len(classes)}")
            if count >= n:
                raise BenchmarkError(f"segmentation store: more than the {n} items announced")
            k = count % chunk_tiles
            tile_buf[k], mask_buf[k] = tile, mask
            splits.append(split)
            sources.append(source)
            count += 1
            if k == chunk_tiles - 1 or count == n:
                tiles[count - k - 1 : count] = tile_buf[: k + 1]
                masks[count - k - 1 : count] = mask_buf[: k + 1]
        if count != n:
            raise BenchmarkError(f"segmentation store: {count} items, {n} announced")
        root.attrs.update(
            {
                "tile_px": tile_px,
                "mpp": mpp,
                "n_tiles": n,
                "classes": list(classes),
                "ignore_index": ignore_index,
                "slides": [
                    {"slide_id": "images", "path": str(out_store), "slide_mpp": mpp, "mpp_source": "task"}
                ],
                "provenance": provenance({"tile_px": tile_px, **dict(settings or {})}),
            }
        )
    frame = pd.DataFrame({"tile_index": np.arange(n), "split": splits, "source": sources})
    with atomic_path(out_manifest) as tmp:
        frame.to_csv(tmp, index=False)
    return n


def read_segmentation_store(store: str | Path, manifest: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(masks uint8 [N, S, S], splits [N] str, attrs) of a segmentation store and its row manifest.
    Raises BenchmarkError when either is missing or they disagree in length."""
    import zarr

    store, manifest = Path(store), Path(manifest)
    if not (store / "zarr.json").is_file() or not manifest.is_file():
        raise BenchmarkError(f"segmentation task: {store} or {manifest} is missing (rule segmentation_store)")
    root = zarr.open_group(store, mode="r")
    if "masks" not in root:
        raise BenchmarkError(f"{store} is a tile store without masks, not a segmentation store")
    masks = root["masks"][:]
    frame = pd.read_csv(manifest, dtype={"split": str})
    if len(frame) != len(masks):
        raise BenchmarkError(f"{manifest} has {len(frame)} rows, {store} {len(masks)} masks")
    return masks, frame["split"].to_numpy(str), dict(root.attrs)


def _resize_pair(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """EVA `ResizeAndCrop`: shorter side → `side` (image bilinear with antialias as torchvision's v2.Resize,
    mask nearest), then the centre `side` × `side` crop."""
    from torchvision.transforms.v2 import functional as TF

    img = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)
    lab = torch.as_tensor(np.ascontiguousarray(mask))[None]
    img = TF.center_crop(TF.resize(img, side, antialias=True), side)
    lab = TF.center_crop(TF.resize(lab, side, interpolation=TF.InterpolationMode.NEAREST), side)
    return img.permute(1, 2, 0).numpy(), lab[0].numpy().astype(np.uint8)


def consep_items(root: str | Path, tile_px: int = 224, patch: int = 250):
    """CoNSeP in its published layout → (n, items) for `write_segmentation_store` (module docstring: EVA's
    250 px grid, splits train = Train, val = Test, classes merged as HoVer-Net). Raises BenchmarkError when a
    folder or an image's label file is missing."""
    from scipy.io import loadmat

    from histodistill.images import read_image_rgb

    root = Path(root)
    images = []
    for split, folder in (("train", "Train"), ("val", "Test")):
        found = sorted((root / folder / "Images").glob("*.png"))
        if not found:
            raise BenchmarkError(
                f"CoNSeP: no {root / folder / 'Images'}/*.png (published layout: Train/, Test/)"
            )
        images += [(split, p, root / folder / "Labels" / f"{p.stem}.mat") for p in found]
    missing = [str(m) for _, _, m in images if not m.is_file()]
    if missing:
        raise BenchmarkError(f"CoNSeP: label file(s) missing: {missing[:3]} ({len(missing)} in all)")
    grids = []
    for _, path, _ in images:
        from PIL import Image

        w, h = Image.open(path).size
        grids.append([(x, y) for y in range(0, h - patch + 1, patch) for x in range(0, w - patch + 1, patch)])

    def items():
        for (split, path, label_path), grid in zip(images, grids, strict=True):
            rgb = read_image_rgb(path)
            labels = np.asarray(loadmat(label_path)["type_map"]).astype(np.int64)
            labels = np.where(labels == 4, 3, labels)
            labels = np.where(labels > 4, 4, labels).astype(np.uint8)
            for x, y in grid:
                tile, mask = _resize_pair(
                    rgb[y : y + patch, x : x + patch], labels[y : y + patch, x : x + patch], tile_px
                )
                yield tile, mask, split, f"{path.name}:{x},{y}"

    return sum(map(len, grids)), items()


def monusac_items(root: str | Path, tile_px: int = 224):
    """MoNuSAC in its published layout → (n, items) for `write_segmentation_store` (module docstring: whole
    images, EVA's train and test splits, region names → classes, any other name → ambiguous). Raises
    BenchmarkError when a split folder is absent or an image has no annotation file."""
    from xml.etree import ElementTree

    from skimage import draw

    from histodistill.images import read_image_rgb

    # EVA's MoNuSAC.classes, capitalised as the XML's region names
    index = {
        "Background": 0,
        "Epithelial": 1,
        "Lymphocyte": 2,
        "Neutrophil": 3,
        "Macrophage": 4,
        "Ambiguous": 5,
    }
    root = Path(root)
    images = []
    for split, folder in (
        ("train", "MoNuSAC_images_and_annotations"),
        ("test", "MoNuSAC Testing Data and Annotations"),
    ):
        found = sorted((root / folder).rglob("*.tif"))
        if not found:
            raise BenchmarkError(f"MoNuSAC: no {root / folder}/**/*.tif (published layout)")
        images += [(split, p) for p in found]
    missing = [str(p.with_suffix(".xml")) for _, p in images if not p.with_suffix(".xml").is_file()]
    if missing:
        raise BenchmarkError(f"MoNuSAC: annotation(s) missing: {missing[:3]} ({len(missing)} in all)")

    def items():
        for split, path in images:
            rgb = read_image_rgb(path)
            height, width = rgb.shape[:2]
            labels = np.zeros((height, width), np.uint8)
            tree = ElementTree.parse(path.with_suffix(".xml")).getroot()  # noqa: S314 (a local dataset file)
            for annotation in tree:  # as EVA's MoNuSAC._get_semantic_mask
                name = [item.attrib["Name"] for item in annotation[0]][0]
                label = index.get(name, index["Ambiguous"])
                for region in (item for child in annotation for item in child if item.tag == "Region"):
                    vertices = np.array([(v.attrib["X"], v.attrib["Y"]) for v in region[1]], dtype=float)
                    rows, cols = draw.polygon(vertices[:, 0], vertices[:, 1], (width, height))
                    labels[cols, rows] = label
            tile, mask = _resize_pair(rgb, labels, tile_px)
            yield tile, mask, split, path.name

    return len(images), items()


def pack_eva_task(task: Mapping, out_store: str | Path, out_manifest: str | Path, tile_px: int = 224) -> int:
    """An EVA dataset ({"eva": consep | monusac, "root": its folder}) → a segmentation store and its row
    manifest, with EVA's patches, splits and classes. Raises BenchmarkError for another `eva` or no root."""
    eva, root = task.get("eva"), task.get("root")
    if eva not in SEGMENTATION_TASKS or not root:
        raise BenchmarkError(
            f"segmentation task {dict(task)}: needs eva ({' | '.join(SEGMENTATION_TASKS)}) and root (its folder)"
        )
    n, items = consep_items(root, tile_px) if eva == "consep" else monusac_items(root, tile_px)
    spec = SEGMENTATION_TASKS[eva]
    settings = {"eva": eva, "root": str(root), "reference": EVA_REFERENCE}
    return write_segmentation_store(
        out_store, out_manifest, items, n, spec.classes, spec.ignore_index, tile_px, None, settings
    )


def make_demo_segmentation(
    tile_store: str | Path,
    masks_dir: str | Path,
    out_store: str | Path,
    out_manifest: str | Path,
    cohort: str = "demo",
    tiles_per_slide: int = 16,
) -> int:
    """The demo's segmentation task: the first `tiles_per_slide` tiles of each slide of a demo tile store with
    their labels from the mask store (`histodistill.masks`: `masks_dir/{cohort}/{slide}.tiff`); the last
    slide's tiles validate, the others train. Classes: `histodistill.demo.masks.DEMO_MASK_CLASSES`. Raises
    BenchmarkError with fewer than 2 slides."""
    from histodistill.demo.masks import DEMO_MASK_CLASSES
    from histodistill.masks import MaskSlide, mask_path
    from histodistill.slides import open_slide
    from histodistill.tilestore import TileStore

    store = TileStore(tile_store)
    index = store.index
    slides = store.attrs["slides"]
    if len(slides) < 2:
        raise BenchmarkError(
            f"demo segmentation: {tile_store} has {len(slides)} slide(s); needs 2 (train, val)"
        )
    tile_px, mpp = int(store.attrs["tile_px"]), float(store.attrs["mpp"])
    rows = [index[index["slide_index"] == i].head(tiles_per_slide) for i in range(len(slides))]

    def items():
        for i, (slide, part) in enumerate(zip(slides, rows, strict=True)):
            split = "val" if i == len(slides) - 1 else "train"
            with MaskSlide(mask_path(masks_dir, cohort, slide["slide_id"])) as mask:
                with open_slide(slide["path"]) as rgb:
                    if mask.level_dimensions[: rgb.level_count] != tuple(rgb.level_dimensions):
                        raise BenchmarkError(
                            f"mask slide {mask.path} has levels {mask.level_dimensions}, slide {slide['path']} "
                            f"{tuple(rgb.level_dimensions)}: remake the mask from the same demo settings"
                        )
                for row_number, row in part.iterrows():
                    ds = mask.level_downsamples[int(row["level"])]
                    read_px = round(tile_px * mpp / (slide["slide_mpp"] * ds))
                    labels = mask.tile({**row.to_dict(), "read_px": read_px}, tile_px)
                    yield (
                        store[int(row_number)],
                        labels,
                        split,
                        f"{slide['slide_id']}:{row['x0']},{row['y0']}",
                    )

    n = sum(map(len, rows))
    settings = {"tile_store": store.attrs["provenance"]["config_hash"], "tiles_per_slide": tiles_per_slide}
    return write_segmentation_store(
        out_store, out_manifest, items(), n, DEMO_MASK_CLASSES, None, tile_px, mpp, settings
    )


# ------------------------------------------------------------------------------------------------- run


def task_of(
    name: str, attrs: Mapping, eva: str | None = None, patience: int | None = None
) -> SegmentationTask:
    """The task definition of a store: EVA's (`SEGMENTATION_TASKS[eva]`) or one from the store's classes
    (train on `train`, validate on `val`); `patience` overrides. Raises BenchmarkError when EVA's classes
    and the store's differ."""
    if eva is not None:
        task = SEGMENTATION_TASKS[eva]
        if list(attrs.get("classes", task.classes)) != list(task.classes):
            raise BenchmarkError(
                f"segmentation task {name}: store classes {attrs['classes']} are not EVA's {eva}"
            )
    else:
        task = SegmentationTask(tuple(attrs["classes"]), attrs.get("ignore_index"))
    return task if patience is None else replace(task, patience=patience)


def run(
    tasks: Mapping[str, Mapping],
    stores: Sequence[str | Path],
    manifests: Sequence[str | Path],
    embedding_stores: Sequence[str | Path],
    out: str | Path,
    *,
    model: str,
    settings: Mapping | None = None,
    patience: int | None = None,
) -> pd.DataFrame:
    """Score one model on every segmentation task and write the tidy rows to Parquet `out`, with provenance.

    `tasks` {name: {"eva": consep|monusac|None, …}} in the order of `stores`, `manifests` and
    `embedding_stores` (the model's `patch_tokens` embeddings of each store). `settings` are
    `SegmentationConfig` fields but `patience`; `patience` (None: each task's own, EVA's for an `eva` task)
    applies to every task.
    Raises BenchmarkError when the lists differ in length or a store's embeddings are not patch tokens.
    """
    from histodistill.bench import write_scores
    from histodistill.embed import EmbeddingStore
    from histodistill.provenance import provenance

    names = list(tasks)
    if not len(names) == len(stores) == len(manifests) == len(embedding_stores):
        raise BenchmarkError("segmentation: tasks, stores, manifests and embeddings differ in number")
    settings = dict(settings or {})
    patience = settings.pop("patience", patience)
    frames, sources = [], {}
    for name, store, manifest, emb_path in zip(names, stores, manifests, embedding_stores, strict=True):
        masks, splits, attrs = read_segmentation_store(store, manifest)
        emb = EmbeddingStore(emb_path)
        tokens = emb.embeddings
        if tokens.ndim != 3 or len(tokens) != len(masks):
            raise BenchmarkError(
                f"segmentation task {name}: {emb_path} holds {tokens.shape}; needs patch tokens [{len(masks)}, P, D] "
                "(embed with pooling patch_tokens)"
            )
        spec = tasks[name] or {}
        task = task_of(name, attrs, spec.get("eva"), patience)
        cfg = SegmentationConfig(**{**settings, "patience": task.patience})
        frames.append(score_task(name, task, tokens, masks, splits, cfg))
        sources[name] = emb.attrs["provenance"]["config_hash"]
    rows = pd.concat(frames, ignore_index=True)
    meta = provenance(
        {"tasks": dict(tasks), **settings, "patience": patience, "eva": EVA_REFERENCE},
        benchmark="segmentation",
        model=model,
        embeddings_config_hash=sources,
        summary=summarize(rows).to_dict("records"),
    )
    write_scores(rows, out, meta)
    return rows


# ----------------------------------------------------------------------------------------------- report


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One model's rows → per task the mean and sample std (ddof 1, EVA's `statistics.stdev`; NaN for one
    run) over runs of the Dice, and the number of runs."""
    dice = rows[rows["metric"] == "dice"]
    if dice.empty:
        return pd.DataFrame(columns=["task", "dice_mean", "dice_std", "n_runs"])
    grouped = dice.groupby("task")["value"]
    out = pd.DataFrame(
        {
            "dice_mean": grouped.mean(),
            "dice_std": grouped.std(ddof=1),
            "n_runs": grouped.size().astype(int),
        }
    ).reset_index()
    return out


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    return by_model({"segmentation_dice_mean": complete_mean(summary, "dice_mean", models)}, models)


def _section(summary: pd.DataFrame, models: Sequence[str], figs: Sequence[Figure]) -> str:
    from histodistill.report import html as page

    if summary.empty:
        return page.note("No segmentation scores.")
    models = list(models)
    body = page.note(
        "EVA's segmentation protocol ("
        + EVA_REFERENCE
        + "): its ConvDecoderMS trained with Dice loss on each "
        "model's frozen patch tokens; cells: mean ± std over runs of the validation Dice of the best "
        "checkpoint (MONAI's Dice per image over the classes present, background excluded, averaged over "
        "images). The last row is the mean over tasks, given only for a model that has every task."
    )
    body += page.wide_table(
        with_mean_over_tasks(summary, "dice_mean", models),
        ["task"],
        models,
        lambda r: page.fmt_pm(r["dice_mean"], r.get("dice_std")),
    )
    return body


BENCHMARK = Benchmark(
    name="segmentation",
    title="EVA segmentation",
    order=35,
    columns=frozenset(ROW_COLUMNS),
    summarize=summarize,
    headline=_headline,
    section=_section,
    labels={"segmentation_dice_mean": "Segmentation Dice (mean over tasks)"},
)
