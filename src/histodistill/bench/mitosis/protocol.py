"""The whole mitosis benchmark for one model: splits, linear probe on the `embed` rule's embeddings of the
patch store, LoRA on patches read from the slides, one result file (`run`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.data import AnnotatedSlides, read_dataset
from histodistill.bench.mitosis.linear import run_linear_protocol
from histodistill.bench.mitosis.lora import LoraFinetuneConfig, run_lora_protocol
from histodistill.bench.mitosis.patches import PatchReader
from histodistill.bench.mitosis.results import write_results
from histodistill.bench.mitosis.splits import (
    FRACTIONS,
    PAPER_SEEDS,
    SPLIT_MODES,
    Split,
    annotation_seeded_splits,
    cross_domain_splits,
    scaling_splits,
)
from histodistill.models import load_model
from histodistill.models.ref import ModelRef
from histodistill.provenance import provenance

log = logging.getLogger(__name__)

METHODS = ("linear", "lora")
DATA_KEYS = ("enabled", "demo", "samples", "annotations")  # config keys that name data, not settings


@dataclass(frozen=True)
class MitosisConfig:
    """The benchmark's settings (config `benchmarks.mitosis`; defaults: the paper's protocol).

    Patches are `patch_px` at `mpp` µm/px; `methods` ⊆ ("linear", "lora"); the scaling protocol keeps
    `fractions` of the training data over `n_val_splits` runs with a fixed `test_fraction` of the cases
    held out and `val_fraction` of the rest validating; `cross_domain` adds `cross_domain_runs` runs of the
    single-source protocol (when the annotations have more than one domain). `split` chooses the scaling
    protocol's test split: "case" (a fixed case-level split, the default: no case is in both training and
    test) or "annotation_seeded" (the authors': an annotation-level test draw per seed of `split_seeds`,
    fitted on 80% of each training draw; `n_val_splits` is then not used; see `splits`).
    """

    mpp: float = 0.25
    patch_px: int = 224
    methods: tuple[str, ...] = METHODS
    fractions: tuple[float, ...] = FRACTIONS
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    n_val_splits: int = 5
    cross_domain: bool = True
    cross_domain_runs: int = 5
    split: str = "case"
    split_seeds: tuple[int, ...] = PAPER_SEEDS
    lora: LoraFinetuneConfig = field(default_factory=LoraFinetuneConfig)

    def __post_init__(self):
        if self.split not in SPLIT_MODES:
            raise BenchmarkError(f"benchmarks.mitosis.split {self.split!r} is not one of {SPLIT_MODES}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> MitosisConfig:
        """From the `benchmarks.mitosis` config section (its data keys, DATA_KEYS, are skipped).

        Raises BenchmarkError for an unknown key, here or under `lora`.
        """
        settings = {k: v for k, v in section.items() if k not in DATA_KEYS}
        lora = dict(settings.pop("lora", None) or {})
        for keys, target in ((settings, cls), (lora, LoraFinetuneConfig)):
            unknown = sorted(set(keys) - {f.name for f in dataclasses.fields(target)})
            if unknown:
                raise BenchmarkError(
                    f"benchmarks.mitosis: unknown setting(s) {unknown} for {target.__name__}"
                )
        for key in ("methods", "fractions", "split_seeds"):
            if key in settings:
                settings[key] = tuple(settings[key])
        if "betas" in lora:
            lora["betas"] = tuple(lora["betas"])
        return cls(**settings, lora=LoraFinetuneConfig(**lora))


def settings_params(settings: Any) -> dict[str, Any]:
    """A settings dataclass (MitosisConfig, LoraFinetuneConfig, …) as JSON-able params for provenance."""
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


def protocol_splits(annotations: pd.DataFrame, config: MitosisConfig, seed: int = 0) -> list[Split]:
    """The scaling splits (`config.split`), then (with `config.cross_domain` and ≥ 2 domains) the
    cross-domain ones. The annotation-seeded splits use `config.split_seeds`, not `seed`."""
    if config.split == "annotation_seeded":
        splits = annotation_seeded_splits(
            annotations, config.fractions, config.test_fraction, config.split_seeds
        )
    else:
        splits = scaling_splits(
            annotations,
            config.fractions,
            config.test_fraction,
            config.n_val_splits,
            config.val_fraction,
            seed,
        )
    if config.cross_domain and annotations["domain"].nunique() > 1:
        splits += cross_domain_splits(
            annotations, config.test_fraction, config.val_fraction, config.cross_domain_runs, seed
        )
    return splits


def run(
    model: str,
    samples: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    config: MitosisConfig | None = None,
    embeddings: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Score one model on the mitosis benchmark; write the tidy rows (ROW_COLUMNS) to `out` and return them.

    `model` is the benchmark's name for it (a registry name, or `student-<run>` for a distilled student);
    `samples` (TSV) and `annotations` (CSV) are the data (`data.read_dataset`). The linear probe reads
    `embeddings`: the embedding store of the patch store (`patches.pack_patch_store`, dataset `mitosis`
    of the `embed` rule), row i = annotation i. LoRA loads the model (`weights`: its checkpoint; a
    student's is required) and reads patches from the slides. `seed` drives the splits, the model's random
    init where it has one, and LoRA (`config.lora.seed` is replaced by it). Provenance: the settings, the
    data paths, the seed and the embeddings' config hash.

    Raises BenchmarkError for an unknown method, missing `embeddings` with the linear probe, embeddings of
    another patch store, or a student without `weights`; and whatever the data, splits, model or slides
    raise.
    """
    config = config or MitosisConfig()
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown or not config.methods:
        raise BenchmarkError(f"mitosis methods must be a non-empty subset of {list(METHODS)}; got {unknown}")
    data = read_dataset(samples, annotations)
    splits = protocol_splits(data.annotations, config, seed)
    frames, extra = [], {}
    if "linear" in config.methods:
        if embeddings is None:
            raise BenchmarkError(
                f"{model}: the linear probe needs the embeddings of the mitosis patch store (dataset 'mitosis')"
            )
        features, extra["embeddings_config_hash"] = _read_embeddings(embeddings, len(data.annotations))
        frames.append(run_linear_protocol(features, data.annotations, splits, model))
    if "lora" in config.methods:
        frames.append(_run_lora(model, data, splits, config, weights, seed))
    rows = pd.concat(frames, ignore_index=True)
    params = {**settings_params(config), "samples": str(samples), "annotations": str(annotations)}
    write_results(rows, out, provenance(params, benchmark="mitosis", model=model, seed=seed, **extra))
    return rows


def _read_embeddings(path: str | os.PathLike, n: int) -> tuple[np.ndarray, str]:
    """Features [n, D] of an embedding store made from the patch store, and the store's config hash."""
    from histodistill.embed import EmbeddingStore

    store = EmbeddingStore(path)
    tile_id = store.index()["tile_id"]
    if not np.array_equal(tile_id, np.arange(n)):
        raise BenchmarkError(
            f"embeddings {path} hold {len(tile_id)} rows that are not the {n} annotations in order; "
            "embed the mitosis patch store of these annotations"
        )
    return store.embeddings, store.attrs["provenance"]["config_hash"]


def _run_lora(
    model: str,
    data: AnnotatedSlides,
    splits: list[Split],
    config: MitosisConfig,
    weights: str | os.PathLike | None,
    seed: int,
) -> pd.DataFrame:
    ref = ModelRef.parse(model)  # `student-<run>` in file names, `student:<run>` in the registry
    name = ref.id
    if ref.is_student and weights is None:
        raise BenchmarkError(f"{model}: give the student's checkpoint (weights=…/student.safetensors)")
    loaded = load_model(name, weights, seed=seed)
    lora = dataclasses.replace(config.lora, seed=seed)
    with PatchReader(data.paths, data.mpps, patch_px=config.patch_px, mpp=config.mpp) as reader:
        return run_lora_protocol(loaded, data.annotations, splits, reader, model, lora)
