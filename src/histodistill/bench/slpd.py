"""Slide-level benchmark of SLPD region pretraining (`score_slpd`): k-fold CV of slide classifiers on region
embeddings, one ablation row per pretraining variant, and the patch-level baseline.

Protocol (SLPD, Yu, Lin & Xu 2023, Sec. 3: weakly supervised slide classification with 10-fold CV, and k-NN on
the mean region embedding):
- each variant's region encoder (`slide.pretrain`: DINO only, + L_intra, + L_inter, full SLPD) embeds every
  region of the region store (the whole G × G grid, CLS token);
- **knn**: the L2-normalised mean region embedding of each slide, scikit-learn's `KNeighborsClassifier`
  (cosine distance, `knn_k` neighbours, distance-weighted votes);
- **abmil**: the repository's gated-attention ABMIL (`bench.probe.ABMIL`, Ilse et al. 2018) on each slide's
  bag of region embeddings, `epochs` epochs, no early stopping (no validation split inside a fold);
- **transformer**: a small ViT-WSI-like aggregator, a learned CLS token over the projected region embeddings
  through `torch.nn.TransformerEncoder` (pre-norm, padding masked), linear head on the CLS token;
- **patch baseline** (variant `patch`): the same classifiers on the *tile* embeddings of each slide (the
  present tokens of its regions), no region encoder.
Folds: scikit-learn's `StratifiedKFold(folds, shuffle=True, random_state=seed)` over slides. Metrics per fold:
accuracy and AUC (binary: the positive class's probability; multiclass: one-vs-rest macro). Rows are tidy:
task, variant, method, fold, metric, value. The report shows mean ± std (ddof 1) over folds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from histodistill.bench import BenchmarkError
from histodistill.bench.registry import Benchmark, by_model
from histodistill.devices import torch_threads

log = logging.getLogger(__name__)
ROW_COLUMNS = ["task", "variant", "method", "fold", "metric", "value"]
VARIANTS = ("dino", "dino_intra", "dino_inter", "slpd")
VARIANT_LABELS = {
    "patch": "patch-level (tiles, no region encoder)",
    "dino": "DINO only",
    "dino_intra": "DINO + intra",
    "dino_inter": "DINO + inter",
    "slpd": "full SLPD",
}


@dataclass(frozen=True)
class SlideEvalConfig:
    """Settings of `score_slpd` (config section `slpd.eval`)."""

    folds: int = 10
    methods: tuple[str, ...] = ("knn", "abmil", "transformer")
    knn_k: int = 5
    epochs: int = 50
    lr: float = 1e-3
    batch_size: int = 32
    transformer_dim: int = 128
    transformer_layers: int = 2
    transformer_heads: int = 4
    seed: int = 0
    threads: int | None = 1
    patch_methods: tuple[str, ...] = field(default=("knn", "abmil"))


# ----------------------------------------------------------------------------------------- aggregators


class TransformerMIL(nn.Module):
    """CLS-token transformer over a padded bag [B, N, D] with a validity mask [B, N] → logits [B, out]."""

    def __init__(self, dim: int, n_out: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, bags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(len(bags), -1, -1), self.proj(bags)], dim=1)
        pad = torch.cat([torch.zeros(len(bags), 1, dtype=torch.bool), ~mask], dim=1)
        return self.head(self.norm(self.encoder(x, src_key_padding_mask=pad)[:, 0]))


def _proba(logits: torch.Tensor, n_classes: int) -> np.ndarray:
    if n_classes == 2:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1).numpy()
    return torch.softmax(logits, dim=1).numpy()


def _fit_bags(make, bags, y, n_classes: int, cfg: SlideEvalConfig, seed: int):
    """Train a bag model (ABMIL or TransformerMIL) for cfg.epochs (AdamW, cosine), return it in eval mode."""
    from histodistill.bench.probe import _pad

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    target = torch.as_tensor(np.asarray(y, np.int64))
    loss_fn = nn.BCEWithLogitsLoss() if n_classes == 2 else nn.CrossEntropyLoss()
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(bags), generator=gen).tolist()
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            x, m = _pad([bags[i] for i in idx])
            out = model(x, m)
            loss = loss_fn(out[:, 0], target[idx].float()) if n_classes == 2 else loss_fn(out, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def _predict_bags(model, bags, n_classes: int, batch_size: int) -> np.ndarray:
    from histodistill.bench.probe import _pad

    out = []
    with torch.no_grad():
        for s in range(0, len(bags), batch_size):
            x, m = _pad(bags[s : s + batch_size])
            out.append(_proba(model(x, m), n_classes))
    return np.concatenate(out)


def _metrics(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    acc = float(accuracy_score(y, proba.argmax(1)))
    present = np.unique(y)
    if len(present) < 2:
        auc = math.nan
    elif n_classes == 2:
        auc = float(roc_auc_score(y, proba[:, 1]))
    else:
        auc = float(
            roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(n_classes)))
        )
    return {"accuracy": acc, "auc": auc}


def evaluate_bags(
    bags: Sequence[np.ndarray], labels: Sequence, task: str, variant: str, config: SlideEvalConfig | None = None,
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """k-fold CV of slide classifiers on bags (one [n_i, D] array per slide) → tidy rows (ROW_COLUMNS).

    `methods`: any of knn (mean embedding), abmil, transformer (default `config.methods`). Raises
    BenchmarkError for fewer slides of a class than folds, or an unknown method.
    """
    cfg = config or SlideEvalConfig()
    methods = tuple(methods or cfg.methods)
    if unknown := set(methods) - {"knn", "abmil", "transformer"}:
        raise BenchmarkError(f"slide benchmark: unknown method(s) {sorted(unknown)}")
    classes, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    counts = np.bincount(y)
    if len(classes) < 2 or counts.min() < cfg.folds:
        raise BenchmarkError(
            f"task {task}: {cfg.folds}-fold CV needs ≥ {cfg.folds} slides of each of ≥ 2 classes; "
            f"classes {dict(zip(classes.tolist(), counts.tolist(), strict=True))}: lower slpd.eval.folds"
        )
    n_classes = len(classes)
    bags = [np.asarray(b, np.float32) for b in bags]
    means = np.stack([b.mean(0) for b in bags])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    rows = []
    folds = StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed)
    with torch_threads(cfg.threads):
        for fold, (train, test) in enumerate(folds.split(means, y)):
            for method in methods:
                if method == "knn":
                    knn = KNeighborsClassifier(
                        min(cfg.knn_k, len(train)), weights="distance", metric="cosine"
                    )
                    proba = knn.fit(means[train], y[train]).predict_proba(means[test])
                else:
                    dim = bags[0].shape[1]
                    n_out = 1 if n_classes == 2 else n_classes
                    if method == "abmil":
                        from histodistill.bench.probe import ABMIL

                        def make(dim=dim, n_out=n_out):
                            return ABMIL(dim, n_out)
                    else:

                        def make(dim=dim, n_out=n_out):
                            return TransformerMIL(
                                dim, n_out, cfg.transformer_dim, cfg.transformer_layers, cfg.transformer_heads
                            )

                    model = _fit_bags(
                        make, [bags[i] for i in train], y[train], n_classes, cfg, cfg.seed + fold
                    )
                    proba = _predict_bags(model, [bags[i] for i in test], n_classes, cfg.batch_size)
                for metric, value in _metrics(y[test], proba, n_classes).items():
                    rows.append((task, variant, method, fold, metric, value))
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def run(
    region_store: str | Path,
    encoders: Mapping[str, str | Path],
    labels: str | Path,
    out: str | Path,
    *,
    model: str,
    task: str = "slide",
    config: SlideEvalConfig | Mapping | None = None,
) -> pd.DataFrame:
    """Score one model: every variant's region encoder (`encoders[variant]`: a `region_encoder.pt`) and the
    patch-level baseline, on the slides of `labels` (CSV: slide_id, label) in `region_store`; tidy rows to
    Parquet `out` with provenance. Raises BenchmarkError for a labelled slide without regions. The store is
    streamed (regions embedded 256 at a time); memory holds the region embeddings and the patch baseline's
    bags (every labelled slide's present tile embeddings: that baseline's own input)."""
    from histodistill.bench import write_scores
    from histodistill.provenance import provenance
    from histodistill.slide.pretrain import embed_regions, load_region_encoder
    from histodistill.slide.regions import RegionStore

    cfg = config if isinstance(config, SlideEvalConfig) else SlideEvalConfig(**_tuples(dict(config or {})))
    store = RegionStore(region_store)  # streamed: regions are read per slide or per batch of 256
    table = pd.read_csv(labels, dtype={"slide_id": str})
    slide_pos = {s: i for i, s in enumerate(store.slides)}
    region_rows = dict(enumerate(store.slide_rows()))
    missing = [s for s in table["slide_id"] if s not in slide_pos or not len(region_rows[slide_pos[s]])]
    if missing:
        raise BenchmarkError(f"{labels}: slide(s) without regions in {region_store}: {missing[:5]}")
    picks = [region_rows[slide_pos[s]] for s in table["slide_id"]]
    frames = []
    tiles = [t[m] for t, m in map(store.read, picks)]  # present tiles of each slide's regions (the bags)
    frames.append(evaluate_bags(tiles, table["label"], task, "patch", cfg, cfg.patch_methods))
    for variant, path in encoders.items():
        emb = embed_regions(load_region_encoder(path), store.root["tokens"], store.root["mask"])
        frames.append(evaluate_bags([emb[r] for r in picks], table["label"], task, variant, cfg))
        log.info("%s %s: %s", model, variant, _brief(frames[-1]))
    rows = pd.concat(frames, ignore_index=True)
    meta = provenance({"config": asdict(cfg), "encoders": sorted(encoders)}, model=model, labels=str(labels))
    write_scores(rows, out, meta)
    return rows


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _brief(rows: pd.DataFrame) -> str:
    s = rows.groupby(["method", "metric"])["value"].mean()
    return ", ".join(f"{m} {k} {v:.3f}" for (m, k), v in s.items())


# ----------------------------------------------------------------------------------------- report


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof 1) over folds per task, variant, method and metric, with the fold count."""
    g = rows.groupby(["task", "variant", "method", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0, n_folds="count")
    return out.reset_index()


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    cols = {}
    for variant in ("slpd", "dino"):
        pick = summary[
            (summary["variant"] == variant) & (summary["method"] == "knn") & (summary["metric"] == "accuracy")
        ]
        cols[f"slpd_{variant}_knn_accuracy"] = {r["model"]: r["mean"] for r in pick.to_dict("records")}
    return by_model(cols, models)


def _errors(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """The standard error of each headline (k-NN accuracy, mean over the k cross-validation folds, whose test
    slides are disjoint): sample std over folds / √k (NaN for one fold)."""
    cols = {}
    for variant in ("slpd", "dino"):
        pick = summary[
            (summary["variant"] == variant) & (summary["method"] == "knn") & (summary["metric"] == "accuracy")
        ]
        cols[f"slpd_{variant}_knn_accuracy"] = {
            r["model"]: r["std"] / np.sqrt(r["n_folds"]) if r["n_folds"] > 1 else np.nan
            for r in pick.to_dict("records")
        }
    return by_model(cols, models)


def _section(summary: pd.DataFrame, models: Sequence[str], figs) -> str:
    from histodistill.report import html as page

    if summary.empty:
        return page.note("No slide-level scores.")
    body = page.note(
        "SLPD ablation: slide classification by k-fold cross-validation over slides (stratified); cells: "
        "mean ± std (ddof 1) over folds. knn: cosine k-NN on each slide's mean region embedding; abmil: "
        "gated-attention MIL on region embeddings; transformer: a CLS-token transformer aggregator. The "
        "patch-level row uses tile embeddings without a region encoder."
    )
    frame = summary.assign(variant=summary["variant"].map(lambda v: VARIANT_LABELS.get(v, v)))
    body += page.wide_table(
        frame,
        ["task", "variant", "method", "metric"],
        list(models),
        lambda r: page.fmt_pm(r["mean"], r["std"]),
    )
    return body


BENCHMARK = Benchmark(
    name="slpd",
    title="Slide-level pretraining (SLPD ablation)",
    order=50,
    columns=frozenset(ROW_COLUMNS),
    summarize=summarize,
    headline=_headline,
    errors=_errors,
    section=_section,
    labels={
        "slpd_slpd_knn_accuracy": "slide k-NN accuracy, full SLPD",
        "slpd_dino_knn_accuracy": "slide k-NN accuracy, DINO only",
    },
)
