"""ScoreNet ROI classification (Stegmüller et al., "ScoreNet: Learning Non-Uniform Attention and Augmentation
for Transformer-Based Histopathological Image Classification", WACV 2023) with a registry model — the
distilled student — as the fine local encoder, and ScoreMix.

Checked against the authors' code (stegmuel/ScoreNet) and, for the selection operator, Cordonnier et al.
2021 ("Differentiable Patch Selection for Image Recognition"). Each module names its deliberate deviations:

- `topk`: the perturbed sorted top-K (forward E[Y(x + σZ)], backward E[Y Zᵀ]/σ with a control variate),
  and the straight-through selection used in training (hard at test time);
- `model`: the scorer ViT (CPVT position encoding, mean global token, relevance = its last-block attention),
  the local encoder (any registry model, frozen by default, or LoRA; or the paper's own ViT), the mixer,
  `ScoreNet`; the paper's sizes are the defaults (1.79M parameters with the paper's local ViT);
- `scoremix`: ScoreMix and the CutMix / no-mix baselines;
- `data`: the ROI manifest (`path, label, split`), the BRACS and BACH layouts, the demo's synthetic ROIs;
- `protocol`: training (AdamW, cosine), weighted F1, top-K hit rate, masking probe, FLOP counts; `run`;
- `report`: the report's section and leaderboard columns (`BENCHMARK`).

Rule `score_scorenet` (config `benchmarks.scorenet`) writes `benchmarks/scorenet/{model}.parquet`; the
cost benchmark in time and memory is `benchmarks/scorenet.py`.
"""

from histodistill.bench.scorenet.data import ScoreNetDemoConfig, make_demo_rois, read_manifest, roi_manifest
from histodistill.bench.scorenet.model import ScoreNet, ScoreNetModelConfig
from histodistill.bench.scorenet.protocol import ROW_COLUMNS, ScoreNetConfig, run
from histodistill.bench.scorenet.report import BENCHMARK
from histodistill.bench.scorenet.scoremix import cutmix, scoremix
from histodistill.bench.scorenet.topk import hard_sorted_topk, perturbed_sorted_topk, straight_through_topk

__all__ = [
    "BENCHMARK",
    "ROW_COLUMNS",
    "ScoreNet",
    "ScoreNetConfig",
    "ScoreNetDemoConfig",
    "ScoreNetModelConfig",
    "cutmix",
    "hard_sorted_topk",
    "make_demo_rois",
    "perturbed_sorted_topk",
    "read_manifest",
    "roi_manifest",
    "run",
    "scoremix",
    "straight_through_topk",
]
