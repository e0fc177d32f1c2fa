"""A trained demo teacher: the tiny teacher learns tissue content from the demo generator's ground truth.

A random network as the demo's teacher makes "the student approaches the teacher" unmeasurable, so the
`demo_teacher` rule trains it first, on CPU in a few minutes.

What it sees: `n_slides` synthetic slides rendered by `render_tissue_maps` with their own seeds
(`seed_for("demo-teacher:{i}", seed)`, never a demo-cohort, PLISM or mitosis slide, so no benchmark tile
or split is ever seen), at the demo's slide size and µm/px. Each training item is one tissue crop (≥
`min_tissue` tissue, as the tiling keeps) at the tiles' scale (`tile_px` px at `tile_mpp` µm/px, ±
`scale_jitter`, a random quarter turn and flip), rendered twice with independently drawn stainings
(`restain`: haematoxylin and eosin amounts, stain hue) and scanners (`scan`: colour gain, gamma, blur,
JPEG quality), the ranges of `DemoTeacherConfig`, which cover the PLISM and mitosis demo domains; with
probability `reference_p` a rendering keeps the generator's own staining, unscanned, as the demo cohort's.

What it learns, from the generator's latent maps (stain-independent, so every rendering of a crop has the
same targets):
- a class: the crop's tercile of nuclear area fraction (of the generator's nuclear mask, not of dark
  pixels), cuts from the training crops (`CLASSES`, cross-entropy on the CLS token);
- global content: tissue, fat and nuclear area fractions, mean haematoxylin and eosin concentration
  (standardised over the training crops; mean squared error from the CLS token);
- local content: nuclear, tissue and fat fractions of every 14 px patch (the 16 × 16 patch grid,
  standardised; mean squared error from the patch tokens);
- stain and scanner invariance: InfoNCE between the two renderings of each crop (CLS cosine similarity,
  temperature 0.1, the other crops of the batch as negatives; weight 0.5), as PLISM asks of matched tiles.

All heads are linear and are dropped: the saved safetensors hold the backbone only, which
`models.load_model(name, weights=PATH)` loads (`models.<name>.weights` in the config).

Held-out check (`eval_crops` crops of another slide, `seed_for("demo-teacher-eval", seed)`, two renderings
each): a logistic-regression probe of the nuclear class on frozen CLS embeddings (fit on half the
crops, scored on the other half) and stain-pair retrieval (top-1: a crop's nearest rendering among the
other renderings is its own), at step 0 (the registry's random init this training starts from) and every
`eval_every` steps.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy.ndimage import uniform_filter
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from histodistill.atomic import atomic_path
from histodistill.demo.slides import (
    SITE_RANGES,
    DemoSlideConfig,
    TissueMaps,
    compose_rgb,
    random_scanner,
    random_staining,
    render_tissue_maps,
    restain,
    seed_for,
)
from histodistill.demo.slides import scan as scan_rgb
from histodistill.devices import torch_threads
from histodistill.errors import HistodistillError
from histodistill.models import load_model
from histodistill.models.registry import file_digest
from histodistill.provenance import provenance, write_parquet

log = logging.getLogger(__name__)

CLASSES = ("sparse_nuclei", "medium_nuclei", "dense_nuclei")
GLOBAL_TARGETS = ("tissue", "fat", "nuclei", "hema", "eosin")
DENSE_TARGETS = ("nuclei", "tissue", "fat")
META_KEY = "histodistill"  # safetensors metadata key of the provenance (JSON)


@dataclass(frozen=True)
class DemoTeacherConfig:
    """Settings of `train_demo_teacher` (the rule takes `demo.teacher.*` and the demo's slide geometry).

    `batch_size` counts images: batch_size // 2 crops, each rendered twice. Stain ranges are factors on
    the haematoxylin / eosin amounts and ± degrees of stain-vector hue; scanner ranges are ± colour gain
    per channel, gamma, blur (µm, Gaussian σ) and JPEG quality.
    """

    steps: int = 200
    batch_size: int = 24
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    n_slides: int = 2
    width_px: int = 4096
    height_px: int = 3072
    mpp: float = 0.25
    tile_px: int = 224
    tile_mpp: float = 0.5
    min_tissue: float = 0.5
    scale_jitter: float = 0.1
    hema: tuple[float, float] = SITE_RANGES.hema
    eosin: tuple[float, float] = SITE_RANGES.eosin
    hue_deg: float = SITE_RANGES.hue_deg
    gain: float = SITE_RANGES.gain
    gamma: tuple[float, float] = SITE_RANGES.gamma
    blur_um: tuple[float, float] = SITE_RANGES.blur_um
    jpeg: tuple[int, int] = SITE_RANGES.jpeg
    reference_p: float = 0.25
    contrast_weight: float = 0.5
    contrast_temp: float = 0.1
    dense_weight: float = 1.0
    eval_crops: int = 64
    eval_every: int = 30
    threads: int = 1
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 4 or self.batch_size % 2:
            raise HistodistillError(f"demo teacher: batch_size must be even and ≥ 4, not {self.batch_size}")
        if self.steps < 1 or self.n_slides < 1 or self.eval_crops < 8:
            raise HistodistillError("demo teacher: steps and n_slides must be ≥ 1 and eval_crops ≥ 8")


@dataclass
class RenderedSlide:
    """A training or held-out slide: its pixels and the generator's ground truth, at level 0."""

    rgb: np.ndarray  # uint8 [H, W, 3], the canonical staining
    maps: np.ndarray  # float32 [3, H, W]: nuclei (in tissue body), tissue, fat (`DENSE_TARGETS`)
    hema: np.ndarray  # float32 [H, W]
    eosin: np.ndarray
    positions: np.ndarray  # int [K, 2] top-left corners (y, x) of windows with enough tissue


def _prepare_slide(maps: TissueMaps, window: int, min_tissue: float, stride: int = 32) -> RenderedSlide:
    """The rendered slide, its target maps, and where a `window`-px crop holds ≥ `min_tissue` tissue."""
    tissue = maps.tissue.astype(np.float32)
    fraction = uniform_filter(tissue[::stride, ::stride], size=max(1, window // stride), mode="constant")
    # uniform_filter centres its window: shift back to top-left corners, keep windows inside the slide
    half = max(1, window // stride) // 2
    ys, xs = np.nonzero(fraction >= min_tissue)
    ys, xs = (ys - half) * stride, (xs - half) * stride
    h, w = tissue.shape
    inside = (ys >= 0) & (xs >= 0) & (ys + window <= h) & (xs + window <= w)
    fat = (maps.tissue & maps.fat).astype(np.float32)
    stack = np.stack([maps.nuclei * maps.body, tissue, fat]).astype(np.float32)
    return RenderedSlide(
        compose_rgb(maps), stack, maps.hema, maps.eosin, np.stack([ys[inside], xs[inside]], 1)
    )


def render_slides(cfg: DemoTeacherConfig, names: list[str], seed: int) -> list[RenderedSlide]:
    """Render one slide per name (seed `seed_for(name, seed)`, the demo's size and µm/px) with its targets.

    Raises HistodistillError when a slide has no crop window with `cfg.min_tissue` tissue.
    """
    spec = DemoSlideConfig(cfg.width_px, cfg.height_px, mpp=cfg.mpp)
    window = round(cfg.tile_px * cfg.tile_mpp / cfg.mpp * (1 + cfg.scale_jitter))
    slides = []
    for name in names:
        slide = _prepare_slide(render_tissue_maps(spec, seed_for(name, seed)), window, cfg.min_tissue)
        if len(slide.positions) == 0:
            raise HistodistillError(
                f"demo teacher: slide '{name}' has no {window} px window with ≥ {cfg.min_tissue:.0%} tissue; "
                "use larger demo slides (demo.width_px, demo.height_px)"
            )
        slides.append(slide)
    return slides


class CropPairs(Dataset):
    """Item k → two renderings of one tissue crop and its generator targets, a function of (seed, k) only.

    Returns views uint8 [V, tile_px, tile_px, 3] (V = `views`, 2 for training; the first view is the same
    for any V), global targets float32 [5] (raw, `GLOBAL_TARGETS`), dense targets float32 [3, g, g]
    (`DENSE_TARGETS`, g = `grid`, tile_px // patch for training; `grid` 0: an empty [3, 0, 0], not computed).
    """

    def __init__(
        self,
        slides: list[RenderedSlide],
        cfg: DemoTeacherConfig,
        seed: int,
        stream: int,
        grid: int,
        render=True,
        views: int = 2,
    ):
        self.slides, self.cfg, self.seed, self.stream, self.grid = slides, cfg, seed, stream, grid
        self.render = render  # False: targets only (views are an empty array)
        self.views = views

    def __len__(self) -> int:  # indexable without end; the sampler decides how many
        return 2**62

    def _staining(self, rng: np.random.Generator) -> dict:
        return random_staining(rng, self.cfg)

    def _scanner(self, rng: np.random.Generator) -> dict:
        return random_scanner(rng, self.cfg, self.cfg.tile_mpp)

    def _render(self, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One rendering: the generator's own staining, unscanned (probability `reference_p`, as the demo
        cohort's slides are), or a random staining and scanner."""
        staining, scanner = self._staining(rng), self._scanner(rng)  # drawn always: a fixed rng stream
        if rng.random() < self.cfg.reference_p:
            return tile
        return scan_rgb(restain(tile, staining), scanner)

    def __getitem__(self, k: int):
        c = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.stream, int(k)]))
        slide = self.slides[int(rng.integers(len(self.slides)))]
        y, x = slide.positions[int(rng.integers(len(slide.positions)))]
        base = c.tile_px * c.tile_mpp / c.mpp
        size = round(base * rng.uniform(1 - c.scale_jitter, 1 + c.scale_jitter))
        window = round(base * (1 + c.scale_jitter))
        y, x = y + int(rng.integers(0, window - size + 1)), x + int(rng.integers(0, window - size + 1))
        box = (slice(y, y + size), slice(x, x + size))
        tile = np.asarray(
            Image.fromarray(slide.rgb[box]).resize((c.tile_px, c.tile_px), Image.Resampling.BOX)
        )
        maps = slide.maps[(slice(None), *box)]
        dense = np.zeros((3, 0, 0), np.float32)
        if self.grid:
            dense = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps))[None], self.grid)[
                0
            ].numpy()
        turns, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        tile, dense = np.rot90(tile, turns, (0, 1)), np.rot90(dense, turns, (1, 2))
        if flip:
            tile, dense = tile[:, ::-1], dense[:, :, ::-1]
        nuclei, tissue, fat = (float(m) for m in maps.mean(axis=(1, 2)))  # numpy: 20× torch's strided mean
        targets = np.array([tissue, fat, nuclei, slide.hema[box].mean(), slide.eosin[box].mean()], np.float32)
        tile, dense = np.ascontiguousarray(tile), np.ascontiguousarray(dense, np.float32)
        if not self.render:
            return np.zeros(0, np.uint8), targets, dense
        views = np.stack([self._render(tile, rng) for _ in range(self.views)])
        return views, targets, dense


class _Heads(nn.Module):
    """Linear heads on the final-norm tokens: class and global content from CLS, local content per patch."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.Linear(dim, len(CLASSES))
        self.glob = nn.Linear(dim, len(GLOBAL_TARGETS))
        self.dense = nn.Linear(dim, len(DENSE_TARGETS))


def _normalize(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float [B, 3, H, W], normalised with the model's transform."""
    x = views.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _info_nce(a: torch.Tensor, b: torch.Tensor, temp: float) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows of a, b [N, D] (cosine similarity / temp; the pair is the positive)."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temp
    labels = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _embed_views(model: nn.Module, views: torch.Tensor, mean, std, batch: int = 32) -> np.ndarray:
    """CLS embeddings (final norm) of uint8 [N, H, W, 3] views → float32 [N, D]."""
    model.eval()
    with torch.inference_mode():
        out = [
            model.forward_features(_normalize(views[i : i + batch], mean, std))[:, 0]
            for i in range(0, len(views), batch)
        ]
    return torch.cat(out).numpy()


def _evaluate(
    model: nn.Module, heads: _Heads, data: dict, mean, std, classes: np.ndarray
) -> dict[str, float]:
    """Held-out metrics: frozen-CLS probe accuracy, stain-pair top-1 retrieval, class-head accuracy."""
    views = data["views"]  # [N, 2, H, W, 3]
    n = len(views)
    emb = _embed_views(model, views.flatten(0, 1), mean, std).reshape(n, 2, -1)
    half = n // 2
    probe_acc = float("nan")  # a probe needs two classes among the crops it is fit on
    if len(np.unique(classes[:half])) > 1:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(emb[:half].reshape(2 * half, -1), np.repeat(classes[:half], 2))
        probe_acc = float(probe.score(emb[half:].reshape(-1, emb.shape[-1]), np.repeat(classes[half:], 2)))
    a = emb[:, 0] / np.linalg.norm(emb[:, 0], axis=1, keepdims=True)
    b = emb[:, 1] / np.linalg.norm(emb[:, 1], axis=1, keepdims=True)
    sim = a @ b.T
    pair_top1 = float(0.5 * ((sim.argmax(1) == np.arange(n)).mean() + (sim.argmax(0) == np.arange(n)).mean()))
    with torch.inference_mode():
        logits = heads.cls(torch.from_numpy(emb.reshape(2 * n, -1)))
    head_acc = float((logits.argmax(1).numpy() == np.repeat(classes, 2)).mean())
    return {"eval_probe_accuracy": probe_acc, "eval_pair_top1": pair_top1, "eval_head_accuracy": head_acc}


def _collect(dataset: CropPairs, n: int) -> dict[str, torch.Tensor]:
    items = [dataset[k] for k in range(n)]
    return {
        "views": torch.from_numpy(np.stack([i[0] for i in items])),
        "targets": torch.from_numpy(np.stack([i[1] for i in items])),
        "dense": torch.from_numpy(np.stack([i[2] for i in items])),
    }


def plot_training(frame: pd.DataFrame, out: str | Path) -> None:
    """Two panels: the losses per step (log scale), and the held-out probe accuracy, stain-pair retrieval
    and class-head accuracy (step 0 = the random init) with the training-batch accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = frame[frame["loss"].notna()]
    for col in ("loss", "loss_class", "loss_global", "loss_dense", "loss_contrast"):
        ax.plot(train["step"], train[col], label=col.removeprefix("loss_"), lw=1.2 if col == "loss" else 0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("demo teacher: training losses")
    ax.legend(fontsize=8)
    ax2.plot(
        train["step"],
        train["train_accuracy"].rolling(10, min_periods=1).mean(),
        color="0.6",
        label="train batch (class head, mean of 10)",
    )
    evals = frame[frame["eval_probe_accuracy"].notna()]
    for col, label in (
        ("eval_probe_accuracy", "held-out linear probe (frozen CLS)"),
        ("eval_pair_top1", "held-out stain-pair top-1"),
        ("eval_head_accuracy", "held-out class head"),
    ):
        ax2.plot(evals["step"], evals[col], marker="o", label=label)
    ax2.axhline(1 / len(CLASSES), color="0.8", ls="--", lw=0.8, label="chance (classes)")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("step (0 = random init)")
    ax2.set_ylabel("accuracy")
    ax2.set_title("nuclear class and stain robustness")
    ax2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def read_teacher_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance a `train_demo_teacher` checkpoint holds (settings, seed, metrics, versions)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(META_KEY)
    if raw is None:
        raise HistodistillError(f"{path} is not a demo teacher checkpoint (no '{META_KEY}' metadata)")
    return json.loads(raw)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def train_demo_teacher(
    out: str | Path,
    model_name: str = "h_optimus_0_tiny",
    cfg: DemoTeacherConfig = DemoTeacherConfig(),
    seed: int = 0,
    train_log: str | Path | None = None,
    plot: str | Path | None = None,
) -> dict[str, Any]:
    """Train `model_name` from its seeded random init on the demo generator (module docstring); write it.

    Writes `out` (safetensors: the backbone's state dict, loadable with `load_model(model_name, out)`;
    provenance, settings and metrics as JSON under metadata key "histodistill"), `train_log` (Parquet, one
    row per step: losses, learning rate, batch accuracy, seconds; held-out metrics at step 0 and every
    `eval_every` steps) and `plot` (PNG), each atomically. Deterministic: the same seed, settings and
    `cfg.threads` give identical weights (deterministic torch algorithms, fixed thread count, every crop a
    function of (seed, index)). Returns the metrics (wall and CPU times in seconds, held-out accuracies in
    [0, 1]; held-out metrics of the random init are `random_init_*`, of the trained model `trained_*`).
    Raises HistodistillError for bad settings or slides too small to hold a tissue crop.
    """
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    loaded = load_model(model_name, seed=seed)  # the registry's seeded random init: the baseline
    spec, model = loaded.spec, loaded.model
    mean, std = spec.transform.mean, spec.transform.std
    if spec.transform.size != cfg.tile_px:
        raise HistodistillError(
            f"demo teacher: tiles are {cfg.tile_px} px but '{model_name}' takes {spec.transform.size}"
        )
    grid = cfg.tile_px // spec.patch_size
    train_slides = render_slides(cfg, [f"demo-teacher:{i}" for i in range(cfg.n_slides)], seed)
    eval_slides = render_slides(cfg, ["demo-teacher-eval"], seed)
    train_set = CropPairs(train_slides, cfg, seed, stream=0, grid=grid)
    render_s = time.perf_counter() - start

    # Target statistics and class cuts from 256 training crops' latents (their own stream, no renderings).
    sample = _collect(CropPairs(train_slides, cfg, seed, stream=1, grid=grid, render=False), 256)
    t_mean, t_std = sample["targets"].mean(0), sample["targets"].std(0).clamp(min=1e-6)
    d_mean = sample["dense"].mean((0, 2, 3))
    d_std = sample["dense"].std((0, 2, 3)).clamp(min=1e-6)
    cuts = np.quantile(sample["targets"][:, 2].numpy(), [1 / 3, 2 / 3])
    evaluation = _collect(CropPairs(eval_slides, cfg, seed, stream=2, grid=grid), cfg.eval_crops)
    eval_classes = np.searchsorted(cuts, evaluation["targets"][:, 2].numpy(), side="right")

    with torch.random.fork_rng():
        torch.manual_seed(seed + 7907)
        heads = _Heads(spec.embed_dim)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.warmup_fraction, anneal_strategy="cos"
    )
    pairs = cfg.batch_size // 2
    loader = DataLoader(
        train_set,
        batch_size=pairs,
        sampler=range(cfg.steps * pairs),
        num_workers=cfg.num_workers,
        persistent_workers=False,
    )
    rows: list[dict[str, Any]] = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(cfg.threads):
            rows.append({"step": 0, **_evaluate(model, heads, evaluation, mean, std, eval_classes)})
            log.info("demo teacher, random init: %s", rows[-1])
            t0 = time.perf_counter()
            for step, (views, targets, dense) in enumerate(loader, start=1):
                model.train()
                x = _normalize(views.flatten(0, 1), mean, std)
                tokens = model.forward_features(x)
                cls, patches = tokens[:, 0], tokens[:, spec.num_prefix_tokens :]
                labels = torch.from_numpy(
                    np.searchsorted(cuts, targets[:, 2].numpy(), side="right")
                ).repeat_interleave(2)
                z = ((targets - t_mean) / t_std).repeat_interleave(2, dim=0)
                dense_z = (dense - d_mean.view(1, 3, 1, 1)) / d_std.view(1, 3, 1, 1)
                dense_z = dense_z.repeat_interleave(2, dim=0).flatten(2).transpose(1, 2)  # [2P, g·g, 3]
                logits = heads.cls(cls)
                losses = {
                    "loss_class": F.cross_entropy(logits, labels),
                    "loss_global": F.mse_loss(heads.glob(cls), z),
                    "loss_dense": F.mse_loss(heads.dense(patches), dense_z),
                    "loss_contrast": _info_nce(cls[0::2], cls[1::2], cfg.contrast_temp),
                }
                loss = (
                    losses["loss_class"]
                    + losses["loss_global"]
                    + cfg.dense_weight * losses["loss_dense"]
                    + cfg.contrast_weight * losses["loss_contrast"]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 3.0)
                optimizer.step()
                lr = schedule.get_last_lr()[0]
                schedule.step()
                row = {
                    "step": step,
                    "loss": float(loss.detach()),
                    **{k: float(v.detach()) for k, v in losses.items()},
                    "lr": lr,
                    "train_accuracy": float((logits.argmax(1) == labels).float().mean()),
                    "seconds": time.perf_counter() - t0,
                }
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    row.update(_evaluate(model, heads, evaluation, mean, std, eval_classes))
                    log.info(
                        "demo teacher step %d/%d: %s",
                        step,
                        cfg.steps,
                        {k: round(v, 4) for k, v in row.items()},
                    )
                rows.append(row)
            train_s = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(deterministic)

    frame = pd.DataFrame(rows)
    first, last = rows[0], rows[-1]
    metrics = {
        "render_seconds": render_s,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds() - cpu_start,  # this process and its finished crop-rendering workers
        "steps": cfg.steps,
        "images_seen": cfg.steps * cfg.batch_size,
        "final_loss": last["loss"],
        "class_cuts": cuts.tolist(),
        **{f"random_init_{k.removeprefix('eval_')}": first[k] for k in first if k.startswith("eval_")},
        **{f"trained_{k.removeprefix('eval_')}": last[k] for k in last if k.startswith("eval_")},
    }
    settings = {**asdict(cfg), "model": model_name, "seed": seed}
    meta = provenance(
        settings,
        generator="train_demo_teacher",
        model_id=model_name,
        arch=spec.arch,
        init=loaded.weights,
        classes=list(CLASSES),
        global_targets=list(GLOBAL_TARGETS),
        dense_targets=list(DENSE_TARGETS),
        target_mean=t_mean.tolist(),
        target_std=t_std.tolist(),
        dense_mean=d_mean.tolist(),
        dense_std=d_std.tolist(),
        metrics=metrics,
    )
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta, default=str)})
    metrics["weights_digest"] = file_digest(out)
    if train_log is not None:
        write_parquet(frame, train_log, {**meta, "weights_digest": metrics["weights_digest"]})
    if plot is not None:
        plot_training(frame, plot)
    log.info(
        "demo teacher %s: %d steps in %.0f s (+%.0f s rendering); held-out probe accuracy %.3f → %.3f, "
        "stain-pair top-1 %.3f → %.3f → %s",
        model_name,
        cfg.steps,
        train_s,
        render_s,
        metrics["random_init_probe_accuracy"],
        metrics["trained_probe_accuracy"],
        metrics["random_init_pair_top1"],
        metrics["trained_pair_top1"],
        out,
    )
    return metrics
