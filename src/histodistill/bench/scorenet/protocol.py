"""The ScoreNet benchmark for one local encoder: train ScoreNet (and the scorer-only baseline) on the ROI
manifest, evaluate on its test split, count the cost; one tidy result file (`run`).

Training (the issue's protocol; the paper's where the issue is silent): AdamW, a per-step cosine schedule
from `lr` to 0, cross-entropy against the (mixed) soft labels; with probability `mix_prob` a batch is mixed
by `mix` (`scoremix`, guided by the scorer's current relevance, or the ablation baselines `cutmix`, `none`).
Batches hold ROIs of one region grid (ROIs are bucketed by grid), since a mixed pair must share it. With a
`val` split the epoch of the best validation weighted F1 is kept, otherwise the last.

Deliberate deviations from the reference trainer (`scorenet_trainer_fast.py`): AdamW (the issue) rather than
SGD with momentum 0.9 and the linear-scaling rule; the mixed labels enter the loss (the reference computes
the mixed inputs and then trains on the unmixed labels, `loss = criterion(outputs, labels)`); mixup is not
among the choices (the paper compares ScoreMix, CutMix and none).

Rows (ROW_COLUMNS): for each `variant` (`scorenet`: the model with `mix`; `scorer_only`: the scorer's global
token alone, the paper's "glorified low-resolution ViT" check; `scorenet_<mix>` for each of
`ablation_mixes`) and seed: `weighted_f1`, `accuracy`, `f1:<class>` (test split); for ScoreNet variants also
`masked_accuracy` (test accuracy with `mask_fraction` of the selected regions blanked, the paper's Table 7
probe; `model.n_masked` rounds the count half up), `masked_share` (the share actually blanked, mean over
the test ROIs: 1.0 at K ≤ 2 for 75%) and, where the manifest has the decisive boxes, `topk_hit_rate` (share of test ROIs whose K selected
regions include one that overlaps the box) and `topk_hit_chance` (its expectation under a uniform choice of
K of the N regions). Cost rows (variant `cost`, seed −1, one per `cost_sides` ROI side in `roi_px`):
`gflops_scorenet` (scorer on the thumbnail + local encoder on K regions + mixer) and `gflops_all_regions`
(the local encoder on all N regions), counted by `torch.utils.flop_counter` (multiply–adds × 2), and
`n_regions`, `k`. Selection rows (variant `selection`, the first seed's ScoreNet, the first N_SHOWN test
ROIs, `roi` = the ROI's manifest row): `relevance:<r>` (the scorer's score of region r), `selected:<r>` (1
for the K selected), `decisive:<r>` (1 for the regions overlapping the decisive box), `grid_h`, `grid_w`.
`roi` is −1 in every other row.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from histodistill.bench import BenchmarkError
from histodistill.bench.scorenet.data import BOX, read_manifest
from histodistill.bench.scorenet.model import (
    LocalEncoder,
    PaperLocalViT,
    ScoreNet,
    ScoreNetModelConfig,
    n_masked,
)
from histodistill.bench.scorenet.scoremix import MIXES, cutmix, no_mix, scoremix

log = logging.getLogger(__name__)

ROW_COLUMNS = ("model", "variant", "seed", "roi_px", "roi", "metric", "value")
N_SHOWN = 4  # test ROIs whose relevance and selection are recorded for the report's figure
DATA_KEYS = ("enabled", "demo", "manifest")  # config keys that name data, not settings
PAPER_ENCODER = "paper_vit"  # `local_encoder` value: the paper's own ViT instead of the benchmarked model


@dataclass(frozen=True)
class ScoreNetConfig:
    """The benchmark's settings (config `benchmarks.scorenet`; model sizes under `model`).

    epochs, batch_size, lr, weight_decay: AdamW with a cosine schedule; mix ∈ MIXES and mix_prob (reference:
    0.5), alpha: Beta(α, α) of the mixing weight; ablation_mixes: extra ScoreNet variants with another mix;
    seeds: one training run per seed (mean ± std in the report); mask_fraction: the masking probe;
    finetune ("frozen" | "lora"), lora_rank, pooling: the local encoder (`model.LocalEncoder`); cost_sides:
    ROI sides (px) of the cost rows; device, threads: where it runs.
    """

    model: ScoreNetModelConfig = field(default_factory=ScoreNetModelConfig)
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    mix: str = "scoremix"
    mix_prob: float = 0.5
    alpha: float = 1.0
    ablation_mixes: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    mask_fraction: float = 0.75
    finetune: str = "frozen"
    lora_rank: int = 16
    pooling: str | None = None
    cost_sides: tuple[int, ...] = (1536, 4096)
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        for mix in (self.mix, *self.ablation_mixes):
            if mix not in MIXES:
                raise BenchmarkError(f"benchmarks.scorenet: mix {mix!r} is not one of {MIXES}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ScoreNetConfig:
        """From the `benchmarks.scorenet` section (data keys skipped). BenchmarkError for an unknown key."""
        settings = {k: v for k, v in section.items() if k not in DATA_KEYS}
        model = dict(settings.pop("model", None) or {})
        for keys, target in ((settings, cls), (model, ScoreNetModelConfig)):
            unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(target)})
            if unknown:
                raise BenchmarkError(
                    f"benchmarks.scorenet: unknown setting(s) {unknown} for {target.__name__}"
                )
        for key in ("ablation_mixes", "seeds", "cost_sides"):
            if key in settings:
                settings[key] = tuple(settings[key])
        return cls(**settings, model=ScoreNetModelConfig(**model))


@dataclass
class Rois:
    """ROIs cropped to whole regions: images (uint8 [3, H, W] tensors), labels (class index), boxes
    ([y0, x0, y1, x1] or None), splits; classes (sorted names)."""

    images: list[torch.Tensor]
    labels: np.ndarray
    boxes: list[tuple[int, int, int, int] | None]
    splits: np.ndarray
    classes: list[str]

    def where(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def load_rois(manifest: str | os.PathLike, region_px: int) -> Rois:
    """Read every ROI of the manifest (`data.read_manifest`) and crop it to whole `region_px` regions.
    BenchmarkError naming the image for an ROI smaller than one region."""
    from histodistill.images import read_image_rgb

    frame = read_manifest(manifest)
    classes = sorted(frame["label"].unique())
    images = []
    for path in frame["path"]:
        rgb = read_image_rgb(path)
        h, w = (rgb.shape[0] // region_px) * region_px, (rgb.shape[1] // region_px) * region_px
        if h == 0 or w == 0:
            raise BenchmarkError(
                f"ROI {path} ({rgb.shape[0]}×{rgb.shape[1]} px) is smaller than one {region_px} px region"
            )
        images.append(torch.from_numpy(np.array(rgb[:h, :w])).permute(2, 0, 1).contiguous())
    has_box = set(BOX) <= set(frame.columns)
    boxes = [
        tuple(int(v) for v in row) if has_box and not pd.isna(row).any() else None
        for row in (frame[list(BOX)].to_numpy() if has_box else [None] * len(frame))
    ]
    labels = frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return Rois(images, labels, boxes, frame["split"].to_numpy(), classes)


def _batches(rois: Rois, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of `indices`, each of ROIs with one shape."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in rng.permutation(indices):
        buckets.setdefault(tuple(rois.images[i].shape[1:]), []).append(int(i))
    batches = [
        np.array(b[j : j + batch_size]) for b in buckets.values() for j in range(0, len(b), batch_size)
    ]
    return [batches[i] for i in rng.permutation(len(batches))]


def _stack(rois: Rois, batch: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.stack([rois.images[i] for i in batch]).to(device).float() / 255.0


def build_model(loaded, config: ScoreNetConfig, n_classes: int, scorer_only: bool = False) -> ScoreNet:
    """ScoreNet on the loaded registry model (or the paper's ViT when `loaded` is None)."""
    model_config = dataclasses.replace(config.model, scorer_only=scorer_only)
    if scorer_only:
        local = None
    elif loaded is None:
        local = PaperLocalViT(model_config)
    else:
        local = LocalEncoder(loaded, config.pooling, config.finetune, config.lora_rank)
    return ScoreNet(model_config, local, n_classes)


@dataclass
class RoiCache:
    """What a frozen local encoder makes constant, computed once per run and reused by every step, seed and
    variant: each ROI's thumbnail ([3, n_h·P_l, n_w·P_l], float) and the encoder's embeddings of all its
    regions ([N, E]; `ScoreNet.forward(region_embeddings=…, thumbnails=…)`)."""

    thumbnails: list[torch.Tensor]
    embeddings: list[torch.Tensor]

    def batch(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self.thumbnails[i] for i in batch]), torch.stack(
            [self.embeddings[i] for i in batch]
        )


def embed_all_regions(
    model: ScoreNet, rois: Rois, device: torch.device, batch_size: int = 8
) -> RoiCache | None:
    """The RoiCache of every ROI, or None when the local encoder trains (LoRA, the paper's ViT) or there is
    none (scorer_only)."""
    if model.local is None or any(p.requires_grad for p in model.local.parameters()):
        return None
    model.eval()
    thumbs: dict[int, torch.Tensor] = {}
    embeddings: dict[int, torch.Tensor] = {}
    for batch in _batches(rois, np.arange(len(rois.images)), batch_size, np.random.default_rng(0)):
        images = _stack(rois, batch, device)
        with torch.no_grad():
            small = model.thumbnail(images)[0]
        for i, t, e in zip(batch, small, model.embed_regions(images), strict=True):
            thumbs[int(i)], embeddings[int(i)] = t, e
    order = range(len(rois.images))
    return RoiCache([thumbs[i] for i in order], [embeddings[i] for i in order])


@torch.no_grad()
def train_region_embeddings(
    model: ScoreNet, rois: Rois, indices: np.ndarray, device: torch.device, cache: RoiCache | None = None
) -> torch.Tensor:
    """The local encoder's embeddings of every region of the ROIs `indices`, [Σ N_i, E] in that order (from `cache` when
    given; otherwise one pass of the encoder as it is now, e.g. a LoRA encoder before training): what
    `ScoreNet.standardize` is fitted on."""
    if cache is not None:
        return torch.cat([cache.embeddings[int(i)] for i in indices])
    model.eval()
    embedded = {}
    for batch in _batches(rois, np.asarray(indices), 8, np.random.default_rng(0)):
        embedded.update(zip(batch.tolist(), model.embed_regions(_stack(rois, batch, device)), strict=True))
    return torch.cat([embedded[int(i)] for i in indices])


def _inputs(rois: Rois, batch: np.ndarray, device: torch.device, cache: RoiCache | None) -> dict:
    """The model's inputs for a batch: the cached thumbnails and embeddings, else the images."""
    if cache is None:
        return {"images": _stack(rois, batch, device)}
    thumbnails, embeddings = cache.batch(batch)
    return {"images": None, "thumbnails": thumbnails, "region_embeddings": embeddings}


def train(
    model: ScoreNet,
    rois: Rois,
    config: ScoreNetConfig,
    mix: str,
    seed: int,
    device: torch.device,
    cache: RoiCache | None = None,
) -> ScoreNet:
    """Train `model` on the train split (module docstring); returns it in eval mode (best val epoch if any).
    A registry local encoder's embeddings are first standardized with the train split's statistics
    (`ScoreNet.standardize`, `model.ScoreNetModelConfig.embed_norm`).

    `cache` (`embed_all_regions`; a frozen local encoder): ScoreMix and no mixing move whole regions, so the
    batch is mixed on the cached thumbnails (regions of P_l px) and the cached embeddings follow
    `region_source` — the reference's way, which mixes the thumbnails separately; it differs from the
    thumbnail of the mixed ROI only within the antialiasing kernel's reach (≈ 2 thumbnail px) of the pasted
    box's border. CutMix, whose box cuts through regions, is applied to the ROI and re-embedded."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    if model.standardize is not None:
        model.standardize.fit(train_region_embeddings(model, rois, rois.where("train"), device, cache))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    train_idx, val_idx = rois.where("train"), rois.where("val")
    steps = config.epochs * len(_batches(rois, train_idx, config.batch_size, np.random.default_rng(0)))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    best, best_f1 = None, -1.0
    n_classes = len(rois.classes)
    for epoch in range(config.epochs):
        model.train()
        losses = []
        for batch in _batches(rois, train_idx, config.batch_size, rng):
            labels = torch.as_tensor(rois.labels[batch])
            batch_mix = mix if rng.random() < config.mix_prob else "none"
            if cache is not None and batch_mix != "cutmix":
                thumbnails, cached = cache.batch(batch)
                q = config.model.low_patch_px
                mixed = _mix(model, thumbnails, labels, n_classes, batch_mix, rng, config, region_px=q)
                embeddings = cached.flatten(0, 1)[mixed.region_source.to(device)]
                inputs = {"images": None, "thumbnails": mixed.images, "region_embeddings": embeddings}
            else:
                images = _stack(rois, batch, device)
                mixed = _mix(model, images, labels, n_classes, batch_mix, rng, config)
                inputs = {"images": mixed.images}
                if cache is not None:  # CutMix: embed the mixed ROIs' regions
                    inputs["region_embeddings"] = model.embed_regions(mixed.images)
            logits = model(**inputs, generator=generator).logits
            loss = -(mixed.targets.to(device) * F.log_softmax(logits.float(), -1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        log.info("epoch %d (%s): mean training loss %.4f", epoch, mix, float(np.mean(losses)))
        if len(val_idx):
            f1 = evaluate(model, rois, val_idx, device, cache)["weighted_f1"]
            if f1 > best_f1:
                best, best_f1 = copy.deepcopy(model.state_dict()), f1
            log.info("epoch %d: val weighted F1 %.3f", epoch, f1)
    if best is not None:
        model.load_state_dict(best)
    return model.eval()


def _mix(model: ScoreNet, images, labels, n_classes, mix, rng, config, region_px: int | None = None):
    """Mix a batch of ROIs (region_px: P_h), or of their thumbnails (region_px: P_l)."""
    p = region_px or config.model.region_px
    if mix == "none":
        return no_mix(images, labels, n_classes, (images.shape[-2] // p) * (images.shape[-1] // p))
    if mix == "cutmix":
        return cutmix(images, labels, n_classes, rng, config.alpha)
    with torch.no_grad():
        thumbs, grid = model.thumbnail(images) if region_px is None else (images, None)
        if grid is None:
            grid = (images.shape[-2] // p, images.shape[-1] // p)
        relevance = model.scorer(thumbs)[1].reshape(-1, *grid).cpu()
    return scoremix(images, labels, relevance, n_classes, rng, p, config.alpha)


@torch.no_grad()
def predict(
    model: ScoreNet,
    rois: Rois,
    indices: np.ndarray,
    device: torch.device,
    mask_fraction: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    cache: RoiCache | None = None,
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]]]:
    """Hard top-K predictions for `indices` (in that order; batched by ROI shape): (predicted class [n],
    selected region indices per ROI, grid per ROI). `cache`: as `train`'s."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    preds, selected, grids = {}, {}, {}
    for batch in _batches(rois, np.asarray(indices), batch_size, np.random.default_rng(0)):
        out = model(**_inputs(rois, batch, device, cache), mask_fraction=mask_fraction, generator=generator)
        for j, i in enumerate(batch):
            preds[i], selected[i], grids[i] = (
                int(out.logits[j].argmax()),
                out.indices[j].cpu().numpy(),
                out.grid,
            )
    order = [int(i) for i in indices]
    return np.array([preds[i] for i in order]), [selected[i] for i in order], [grids[i] for i in order]


def evaluate(
    model: ScoreNet, rois: Rois, indices: np.ndarray, device: torch.device, cache=None
) -> dict[str, float]:
    """weighted_f1, accuracy and f1:<class> of `model` on `indices` (sklearn's weighted F1, as the paper)."""
    from sklearn.metrics import accuracy_score, f1_score

    preds, _, _ = predict(model, rois, indices, device, cache=cache)
    truth = rois.labels[indices]
    labels = list(range(len(rois.classes)))
    per_class = f1_score(truth, preds, labels=labels, average=None, zero_division=0)
    out = {
        "weighted_f1": float(f1_score(truth, preds, labels=labels, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(truth, preds)),
    }
    out.update({f"f1:{c}": float(v) for c, v in zip(rois.classes, per_class, strict=True)})
    return out


def topk_hits(
    selected: list[np.ndarray], grids: list[tuple[int, int]], boxes, region_px: int
) -> tuple[float, float]:
    """(hit rate, chance): the share of ROIs whose selected regions include one overlapping its box, and the
    mean probability of that under K regions drawn uniformly without replacement: 1 − C(N−m, K)/C(N, K)
    for m regions overlapping the box."""
    hits, chance = [], []
    for sel, (n_h, n_w), box in zip(selected, grids, boxes, strict=True):
        if box is None:
            continue
        y0, x0, y1, x1 = box
        overlapping = {
            r * n_w + c
            for r in range(n_h)
            for c in range(n_w)
            if r * region_px < y1
            and (r + 1) * region_px > y0
            and c * region_px < x1
            and (c + 1) * region_px > x0
        }
        n, k, m = n_h * n_w, len(sel), len(overlapping)
        hits.append(bool(overlapping & set(sel.tolist())))
        chance.append(1.0 - math.comb(n - m, k) / math.comb(n, k))
    return (float(np.mean(hits)), float(np.mean(chance))) if hits else (math.nan, math.nan)


@torch.no_grad()
def selection_rows(
    net: ScoreNet, rois: Rois, indices: np.ndarray, device: torch.device, model: str, seed: int, cache=None
) -> list:
    """The selection rows (module docstring) of the ROIs `indices`."""
    net.eval()
    rows = []
    p = net.config.region_px
    for i in indices:
        out = net(**_inputs(rois, np.array([i]), device, cache))
        n_h, n_w = out.grid
        chosen = set(out.indices[0].tolist())
        box = rois.boxes[i]
        values = {"grid_h": n_h, "grid_w": n_w}
        for r, score in enumerate(out.scores[0].tolist()):
            values[f"relevance:{r}"] = score
            values[f"selected:{r}"] = float(r in chosen)
            if box is not None:
                row, col = divmod(r, n_w)
                overlaps = (
                    row * p < box[2]
                    and (row + 1) * p > box[0]
                    and col * p < box[3]
                    and (col + 1) * p > box[1]
                )
                values[f"decisive:{r}"] = float(overlaps)
        rows += [(model, "selection", seed, -1, int(i), k, float(v)) for k, v in values.items()]
    return rows


def count_gflops(model: ScoreNet, side: int, device: torch.device) -> dict[str, float]:
    """FLOPs (G) of ScoreNet on a side × side ROI vs the local encoder on all its regions (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = model.config
    n_side = side // c.region_px
    n = n_side * n_side
    k = c.k_for(n)

    def flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    region = torch.rand(1, 3, c.region_px, c.region_px, device=device)
    thumb = torch.rand(1, 3, n_side * c.low_patch_px, n_side * c.low_patch_px, device=device)
    per_region = flops(lambda: model.local(region))
    scorer = flops(lambda: model.scorer(thumb))
    mixer = flops(lambda: model.mixer(torch.rand(1, k, c.embed_dim, device=device)))
    project = flops(lambda: model.project(torch.rand(k, model.local.embed_dim, device=device)))
    return {
        "gflops_scorenet": scorer + k * per_region + mixer + project,
        "gflops_all_regions": n * per_region,
        "n_regions": float(n),
        "k": float(k),
    }


def run(
    model: str,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: ScoreNetConfig | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    local_encoder: str | None = None,
) -> pd.DataFrame:
    """Score one model as ScoreNet's local encoder; write the tidy rows (ROW_COLUMNS) to `out` and return them.

    `model` is the benchmark's name for it (a registry name, or `student-<run>` with `weights` its
    checkpoint); `local_encoder=PAPER_ENCODER` trains the paper's own ViT instead (a reference point).
    Seeds are `config.seeds` offset by `seed`. Provenance: the settings, the manifest, the seed.
    Raises BenchmarkError for bad data or settings, ModelError for a model that cannot be loaded.
    """
    from histodistill.bench.mitosis.protocol import settings_params
    from histodistill.devices import pick_device, torch_threads
    from histodistill.models import load_model
    from histodistill.models.ref import ModelRef
    from histodistill.provenance import provenance, write_parquet

    config = config or ScoreNetConfig()
    device = pick_device(config.device)
    with torch_threads(config.threads):
        rois = load_rois(manifest, config.model.region_px)
        loaded = None
        if local_encoder != PAPER_ENCODER:
            ref = ModelRef.parse(model)
            if ref.is_student and weights is None:
                raise BenchmarkError(
                    f"{model}: give the student's checkpoint (weights=…/student.safetensors)"
                )
            loaded = load_model(ref.id if ref.is_student else model, weights, seed=seed)
        test = rois.where("test")
        cache = None
        if loaded is not None and config.finetune == "frozen":
            cache = embed_all_regions(build_model(loaded, config, len(rois.classes)).to(device), rois, device)
        rows = []
        variants = [("scorenet", config.mix, False), ("scorer_only", "none", True)]
        variants += [(f"scorenet_{m}", m, False) for m in config.ablation_mixes]
        for run_seed in (s + seed for s in config.seeds):
            for variant, mix, scorer_only in variants:
                torch.manual_seed(run_seed)
                net = build_model(loaded, config, len(rois.classes), scorer_only).to(device)
                net = train(net, rois, config, mix, run_seed, device, cache)
                metrics = evaluate(net, rois, test, device, cache)
                if not scorer_only:
                    _, selected, grids = predict(net, rois, test, device, cache=cache)
                    metrics["topk_hit_rate"], metrics["topk_hit_chance"] = topk_hits(
                        selected, grids, [rois.boxes[i] for i in test], config.model.region_px
                    )
                    preds, _, _ = predict(
                        net, rois, test, device, config.mask_fraction, run_seed, cache=cache
                    )
                    metrics["masked_accuracy"] = float((preds == rois.labels[test]).mean())
                    metrics["masked_share"] = float(
                        np.mean([n_masked(len(s), config.mask_fraction) / len(s) for s in selected])
                    )
                rows += [(model, variant, run_seed, -1, -1, k, v) for k, v in metrics.items()]
                if variant == "scorenet" and run_seed == config.seeds[0] + seed:
                    rows += selection_rows(net, rois, test[:N_SHOWN], device, model, run_seed, cache)
                log.info("%s %s seed %d: %s", model, variant, run_seed, metrics)
        net = build_model(loaded, config, len(rois.classes)).to(device).eval()
        for side in config.cost_sides:
            rows += [(model, "cost", -1, side, -1, k, v) for k, v in count_gflops(net, side, device).items()]
    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    params = {**settings_params(config), "manifest": str(manifest), "local_encoder": local_encoder}
    write_parquet(
        frame, out, provenance(params, benchmark="scorenet", model=model, seed=seed, classes=rois.classes)
    )
    return frame
