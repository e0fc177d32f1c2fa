"""LoRA fine-tuning (peft) of a backbone with a binary head, its training sampler, and prediction.

**LoRA.** r = 16, alpha = 16, dropout 0.1 on every block's `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2` (and
`mlp.fc1_g`/`fc1_x` for unpacked SwiGLU), nothing else: the authors' `target_modules=["qkv", "proj", "fc1",
"fc2"]` (DeepMicroscopy/FoundationModelComparison `src/classifier.py`) also matches the patch embedding's
`patch_embed.proj` (peft matches name suffixes), which the issue's "only the named layers" excludes. A
trainable `nn.Linear(pooled_dim, 1)` head on the registered pooling; BCE-with-logits; Adam (β 0.9/0.999),
OneCycleLR(max_lr 1e-4) over 100 pseudo-epochs of 1,280 samples in batches of 16; the epoch with the lowest
validation loss is kept. The authors' OneCycleLR keeps torch's default `cycle_momentum=True`, which
overwrites Adam's β1 (0.95 → 0.85 → 0.95); we keep β1 = 0.9 as the issue states
(`LoraFinetuneConfig.cycle_momentum=True` reproduces their code).

**Sampler** (their `src/dataset.py`). Each training draw is a mitotic figure (50%), a hard negative (25%) or
a random tissue patch (25%) away from every annotation; annotated patches are shifted by up to ±10% of the
patch (the authors' `offset_scale`), and a patch is positive when a mitotic figure of the split lies inside
it (their `get_label`). The authors pick a slide first and fall back to imposters when it has no mitosis;
we pick the kind first, so the 50/25/25 proportions hold exactly. The validation set is one fixed, seeded
draw of `val_samples` from the same sampler on the validation cases (their validation dataset is one draw
too). Test patches are the annotations themselves, centred, labelled by the annotation.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.data import HARD_NEGATIVE, MITOTIC_FIGURE, TARGETS
from histodistill.bench.mitosis.patches import PatchReader, iter_annotation_patches
from histodistill.bench.mitosis.results import prediction_frame, score_predictions
from histodistill.bench.mitosis.splits import Split
from histodistill.devices import autocast_dtype, pick_device, torch_threads
from histodistill.models.encoders import encode
from histodistill.models.registry import LoadedModel, ModelSpec
from histodistill.models.transforms import ModelTransform, transform_batch

log = logging.getLogger(__name__)

LORA_TARGET_PATTERN = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x))")


# ----------------------------------------------------------------------------------------- sampler


class PatchSource(Protocol):
    """Anything that draws labelled training patches: uint8 [n, H, W, 3] and float targets [n]."""

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SamplerConfig:
    """Shares of the three kinds of training draw (sum 1) and the shift of annotated patches."""

    p_mitotic_figure: float = 0.5
    p_hard_negative: float = 0.25
    p_random: float = 0.25
    offset_frac: float = 0.1  # shift of annotated patches, up to ± this fraction of the patch side

    def probabilities(self) -> np.ndarray:
        """[3] float64 (mitotic figure, hard negative, random); BenchmarkError unless ≥ 0 and summing to 1."""
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
        """`n` draws as uint8 patches [n, patch_px, patch_px, 3] and float32 targets [n] (0 or 1)."""
        points = self.draw_points(n, rng)
        images = np.empty((n, self.reader.patch_px, self.reader.patch_px, 3), np.uint8)
        for slide_id, g in points.groupby("slide_id", sort=False):
            slide = self.reader.geometry(slide_id)
            xy = g[["x", "y"]].to_numpy(dtype=np.float64, copy=True)
            xy[:, 0] = xy[:, 0].clip(0, slide.width0 - 1)
            xy[:, 1] = xy[:, 1].clip(0, slide.height0 - 1)
            images[g.index.to_numpy()] = self.reader.read(slide_id, xy)
        return images, points["target"].to_numpy(np.float32)


# ----------------------------------------------------------------------------------------- LoRA


@dataclass(frozen=True)
class LoraFinetuneConfig:
    """LoRA fine-tuning settings (defaults: the paper's, see the module docstring); shrink epochs and
    samples for CPU tests. `max_lr` is the OneCycleLR peak; `epochs` are pseudo-epochs of `epoch_samples`
    sampler draws; `val_samples` is the size of the fixed validation draw; `device`/`precision` as
    `histodistill.devices`; `threads` caps torch's CPU threads (None: unchanged)."""

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
        """Normalised images [B, 3, S, S] → logits [B]."""
        return self.head(encode(self._vit(), x, self.spec.num_prefix_tokens, self.pooling)).squeeze(-1)


def build_lora_classifier(
    loaded: LoadedModel, settings: LoraFinetuneConfig | None = None, seed: int = 0
) -> MitosisClassifier:
    """A copy of the frozen backbone with LoRA adapters on the target layers, plus a trainable binary head.

    The adapters and the head are initialised from `seed` (a forked torch RNG); `loaded.model` is left
    untouched. Raises BenchmarkError for pooling "patch_tokens" or a model without the target layers.
    """
    import peft

    cfg = settings or LoraFinetuneConfig()
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


def _merge_lora(classifier: MitosisClassifier) -> MitosisClassifier:
    """A copy whose backbone has the adapters merged into its weights (a plain timm model again)."""
    merged = copy.deepcopy(classifier)
    merged.backbone = merged.backbone.merge_and_unload()
    return merged


@dataclass
class LoraFit:
    """A trained classifier (the best validation epoch's weights, eval mode) and its training record."""

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
            x = transform_batch(transform, images[s : s + batch_size]).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out.append(classifier(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_lora(
    classifier: MitosisClassifier,
    train: PatchSource,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    settings: LoraFinetuneConfig | None = None,
    seed: int = 0,
) -> LoraFit:
    """Adam + OneCycleLR + BCE over pseudo-epochs of sampler draws; keeps the epoch with the lowest val loss.

    Deterministic on CPU for a seed: draws come from a numpy generator, dropout from a forked torch RNG.
    """
    cfg = settings or LoraFinetuneConfig()
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_lora(classifier, train, val_images, np.asarray(val_targets, np.float32), cfg, seed)


def _train_lora(
    classifier, train: PatchSource, val_images, val_targets, cfg: LoraFinetuneConfig, seed: int
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
            x = transform_batch(transform, images).to(dev)
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


def predict_lora(
    loaded: LoadedModel,
    annotations: pd.DataFrame,
    split: Split,
    reader: PatchReader,
    model: str,
    settings: LoraFinetuneConfig | None = None,
) -> tuple[pd.DataFrame, LoraFit]:
    """LoRA on one split: train with the sampler, keep the best validation epoch, predict every test set.

    The seed is `settings.seed + 1000·run`, so a run's result does not depend on which other runs or
    fractions are computed (Snakemake may run each split as its own job).
    """
    cfg = settings or LoraFinetuneConfig()
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
                prediction_frame(model, "lora", split, test_domain, test, targets[test], p1, len(split.train))
            )
    fit.classifier.cpu()
    return pd.concat(frames, ignore_index=True), fit


def run_lora_protocol(
    loaded: LoadedModel,
    annotations: pd.DataFrame,
    splits: Sequence[Split],
    reader: PatchReader,
    model: str,
    settings: LoraFinetuneConfig | None = None,
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
