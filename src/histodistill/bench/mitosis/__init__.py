"""Mitotic-figure classification benchmark (Ammeling et al. 2025, "Benchmarking Foundation Models for
Mitotic Figure Classification", arXiv:2508.04441): linear probing vs LoRA, data scaling, cross-domain.

Checked against the authors' code (DeepMicroscopy/FoundationModelComparison: `linear_probing.py`,
`src/linear_probe.py`, `src/logistic_regression.py`, `src/classifier.py`, `src/dataset.py`,
`train_classifier.py`, `train_classifier_tumor_specific.py`). Where the issue and their code differ, the
issue wins and the difference is named in the module concerned.

**Data** (`data`). Point annotations, one row per figure: `slide_id, x, y, label, domain, case` (x, y in
level-0 px of the slide; label `mitotic_figure` or `hard_negative`; domain = tumour type or scanner; case =
patient or specimen, the unit that never crosses train and test). Layouts of the published sets:

- MIDOG 2022 training set (5 labelled domains: human breast carcinoma, canine lung carcinoma, canine
  lymphoma, canine cutaneous mast cell tumour, human neuroendocrine tumour); the authors' table
  `MIDOG2022_training_tiff.csv` has `x, y, label (1/0), filename, slide, split, tumortype`: slide_id =
  filename stem, case = `slide`, domain = `tumortype`, label 1 → mitotic_figure, 0 → hard_negative.
- CCMCT (Bertram et al. 2019, 32 WSIs of canine cutaneous mast cell tumour, one domain): the authors'
  `MITOS_WSI_CCMCT_ODAEL_binary_labels.csv`; slide = case, domain = "ccmct".

Labels are read case-insensitively; `1`/`0`, `mitosis`, `imposter`, `non-mitosis` are accepted aliases.

**Patches** (`patches`): 224 px at 0.25 µm/px centred on the point, read through `histodistill.slides`;
every annotation's patch is packed into a tile store (`pack_patch_store`) that the `embed` rule embeds as
dataset `mitosis`. Each model gets its own transform (`histodistill.models.transforms`).

**Methods**: the linear probe on those embeddings (`linear`: UNI's L-BFGS logistic regression) and LoRA
fine-tuning with a sampler of annotated and random patches (`lora`). **Protocols** (`splits`): data
scaling over nested training fractions with a fixed case-level test split (`split: case`, the default; or
the authors' `annotation_seeded`: an annotation-level test draw per seed, fitted on 80% of each training
draw, which lets one case's annotations sit in training and test), and single-source cross-domain.

**Output** (`results`, `figures`). Tidy rows `model, method, protocol, fraction, train_domain, test_domain,
run, metric, value` (metrics: balanced accuracy and weighted F1 at probability 0.5, AUROC; plus `n_train`),
summaries as mean ± sample std (ddof = 1) over runs, Parquet with provenance; the figures are the report's
(`histodistill.report.mitosis_figures`). `run` (in
`protocol`) is the whole benchmark for one model.
"""

from histodistill.bench.mitosis.data import (
    ANNOTATION_COLUMNS,
    HARD_NEGATIVE,
    MITOTIC_FIGURE,
    read_annotations,
    read_dataset,
)
from histodistill.bench.mitosis.lora import LoraFinetuneConfig, SamplerConfig
from histodistill.bench.mitosis.patches import pack_patch_store
from histodistill.bench.mitosis.protocol import MitosisConfig, run
from histodistill.bench.mitosis.report import BENCHMARK
from histodistill.bench.mitosis.results import (
    METRICS,
    ROW_COLUMNS,
    cross_domain_matrix,
    read_results,
    summarize,
    write_results,
)
from histodistill.bench.mitosis.splits import ALL, CROSS_DOMAIN, FRACTIONS, SCALING

__all__ = [
    "BENCHMARK",
    "ALL",
    "ANNOTATION_COLUMNS",
    "CROSS_DOMAIN",
    "FRACTIONS",
    "HARD_NEGATIVE",
    "METRICS",
    "MITOTIC_FIGURE",
    "ROW_COLUMNS",
    "SCALING",
    "LoraFinetuneConfig",
    "MitosisConfig",
    "SamplerConfig",
    "cross_domain_matrix",
    "pack_patch_store",
    "read_annotations",
    "read_dataset",
    "read_results",
    "run",
    "summarize",
    "write_results",
]
