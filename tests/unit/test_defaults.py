"""One home for every default: each config default in the schema equals the library default it feeds.

The settings dataclasses (and, for a setting passed as an argument, the function parameter) hold the
defaults; `histodistill/schema.yaml` repeats them so that a config file without the key behaves like the
library. These tests walk every schema default and every field of every settings class, so a default that
changes in one place only, a new schema key or a new settings field fails here until it is mapped.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import histodistill
from histodistill.augment import AugmentConfig
from histodistill.bench.hest import score_task
from histodistill.bench.mitosis import LoraFinetuneConfig, MitosisConfig, SamplerConfig
from histodistill.bench.plism import score_plism, summarize_scores
from histodistill.bench.probe import AbmilConfig, KnnConfig, LinearProbeConfig, LogRegConfig, run_probe
from histodistill.bench.scorenet import ScoreNetConfig, ScoreNetDemoConfig, ScoreNetModelConfig
from histodistill.bench.segmentation import SegmentationConfig, make_demo_segmentation
from histodistill.bench.segmentation import run as segmentation_run
from histodistill.bench.slpd import SlideEvalConfig
from histodistill.config import load_schema
from histodistill.demo.mitosis import MitosisDemoConfig
from histodistill.demo.plism import PlismDemoConfig
from histodistill.demo.slides import DemoSlideConfig
from histodistill.demo.tasks import make_latent_hest_task
from histodistill.demo.teacher import DemoTeacherConfig
from histodistill.distill.pairs import PAIR_SOURCES, PairingConfig
from histodistill.distill.teacher_heads import HeadsConfig
from histodistill.distill.trainer import DistillConfig
from histodistill.embed import extract_embeddings
from histodistill.holdout import TissueHoldoutConfig
from histodistill.matched_tiles import cut_matched_tiles
from histodistill.registration import RegistrationConfig, register_to_grid
from histodistill.slide.demo import write_demo
from histodistill.slide.pretrain import RegionTrainConfig
from histodistill.slide.regions import build_region_store
from histodistill.teacher_cache import cache_teacher
from histodistill.tilestore import pack_tiles
from histodistill.tiling import TilingConfig, tile_slide
from histodistill.tissue import MaskConfig

SCHEMA = load_schema()

# Where each schema default comes from: (settings class, field) or (function, parameter). The key path and
# the field name are the same unless the row says otherwise.
SOURCES: dict[str, tuple] = {
    "demo.width_px": (DemoSlideConfig, "width_px"),
    "demo.height_px": (DemoSlideConfig, "height_px"),
    "demo.mpp": (DemoSlideConfig, "mpp"),
    **{
        f"demo.teacher.{f}": (DemoTeacherConfig, f)
        for f in (
            "steps",
            "batch_size",
            "lr",
            "n_slides",
            "eval_crops",
            "eval_every",
            "threads",
            "num_workers",
        )
    },
    "demo.plism_width_px": (PlismDemoConfig, "width_px"),  # the PLISM demo's reference slide
    "demo.plism_height_px": (PlismDemoConfig, "height_px"),
    # The PLISM reference grid is a tile table: its tiling settings are TilingConfig's.
    "plism.mpp": (TilingConfig, "mpp"),
    "plism.tile_px": (TilingConfig, "tile_px"),
    "plism.min_tissue": (TilingConfig, "min_tissue"),
    "plism.chunk_tiles": (cut_matched_tiles, "chunk_tiles"),
    **{
        f"plism.tissue_holdout.{f}": (TissueHoldoutConfig, f)
        for f in ("method", "held_out", "blocks", "table")
    },
    "plism.on_failure": (register_to_grid, "on_failure"),
    **{
        f"plism.registration.{f}": (RegistrationConfig, f)
        for f in (
            "fine_mpp",
            "affine_schedule",
            "bspline_schedule",
            "grid_spacing_um",
            "iterations",
            "spatial_samples",
            "min_ncc",
            "max_residual_um",
        )
    },
    **{
        f"tiling.{f}": (TilingConfig, f)
        for f in (
            "mpp",
            "tile_px",
            "min_tissue",
            "mask_mpp",
            "min_object_um2",
            "min_hole_um2",
            "min_saturation",
            "min_brightness",
            "max_brightness",
            "remove_ink",
            "min_od",
            "tissue_method",
            "tissue_weights",
            "on_no_tissue",
        )
    },
    "tiling.qc_max_px": (tile_slide, "qc_max_px"),
    "packing.chunk_tiles": (pack_tiles, "chunk_tiles"),
    "packing.compression_level": (pack_tiles, "zstd_level"),
    **{
        f"teacher.{f}": (cache_teacher, f)
        for f in (
            "views",
            "patch_tokens",
            "num_shards",
            "batch_size",
            "num_workers",
            "precision",
        )
    },
    "teacher.hed_jitter": (AugmentConfig, "hed_jitter"),
    **{
        f"embeddings.{f}": (extract_embeddings, f)
        for f in ("pooling", "batch_size", "num_workers", "precision")
    },
    **{
        f"benchmarks.plism.{f}": (score_plism, f)
        for f in ("top_k", "dtype", "tiles_subset", "block_size", "compat", "robustness_k")
    },
    "benchmarks.plism.n_boot": (summarize_scores, "n_boot"),
    **{
        f"benchmarks.segmentation.{f}": (SegmentationConfig, f)
        for f in (
            "max_steps",
            "batch_size",
            "lr",
            "weight_decay",
            "low_lr_factor",
            "low_lr_epochs",
            "n_runs",
            "seed",
            "threads",
        )
    },
    "benchmarks.segmentation.demo_tiles_per_slide": (make_demo_segmentation, "tiles_per_slide"),
    "benchmarks.segmentation.patience": (segmentation_run, "patience"),
    "benchmarks.hest.demo_slides": (make_latent_hest_task, "n_slides"),
    "benchmarks.hest.demo_crops_per_slide": (make_latent_hest_task, "crops_per_slide"),
    "benchmarks.hest.demo_width_px": (make_latent_hest_task, "width_px"),
    "benchmarks.hest.demo_height_px": (make_latent_hest_task, "height_px"),
    "benchmarks.hest.latent_dim": (score_task, "latent_dim"),
    "benchmarks.hest.seed": (score_task, "seed"),
    "benchmarks.probe.methods": (run_probe, "methods"),
    **{
        f"benchmarks.probe.linear.{f}": (LinearProbeConfig, f)
        for f in (
            "max_steps",
            "batch_size",
            "lr",
            "eval_every",
            "patience",
            "monitor",
            "low_lr_factor",
            "low_lr_epochs",
            "seeding",
            "seed",
            "seeds",
        )
    },
    "benchmarks.probe.knn_ks": (KnnConfig, "ks"),
    **{
        f"benchmarks.slide.abmil.{f.name}": (AbmilConfig, f.name)
        for f in dataclasses.fields(AbmilConfig)
        if f.name != "threads"
    },
    # MitosisConfig is the benchmark's one settings class (bench.mitosis.protocol); its section keys are its fields.
    **{
        f"benchmarks.mitosis.{f}": (MitosisConfig, f)
        for f in (
            "mpp",
            "patch_px",
            "methods",
            "fractions",
            "test_fraction",
            "val_fraction",
            "n_val_splits",
            "split",
            "split_seeds",
            "cross_domain",
            "cross_domain_runs",
        )
    },
    # ScoreNetConfig (bench.scorenet.protocol): the section's keys are its fields; `model` is ScoreNetModelConfig.
    **{
        f"benchmarks.scorenet.{f.name}": (ScoreNetConfig, f.name)
        for f in dataclasses.fields(ScoreNetConfig)
        if f.name != "model"
    },
    **{
        f"benchmarks.scorenet.model.{f.name}": (ScoreNetModelConfig, f.name)
        for f in dataclasses.fields(ScoreNetModelConfig)
    },
    "distill.collapse_floor": (DistillConfig, "collapse_floor"),
    "distill.collapse_patience": (DistillConfig, "collapse_patience"),
    "distill.collapse_entropy_ceiling": (DistillConfig, "collapse_entropy_ceiling"),
    **{
        f"distill.teacher_heads.{f.name}": (HeadsConfig, f.name)
        for f in dataclasses.fields(HeadsConfig)
        if f.name not in ("collapse_floor", "collapse_patience", "collapse_entropy_ceiling", "seed")
    },
    **{
        f"benchmarks.mitosis.lora.{f}": (LoraFinetuneConfig, f)
        for f in (
            "rank",
            "alpha",
            "dropout",
            "max_lr",
            "batch_size",
            "epochs",
            "epoch_samples",
            "val_samples",
        )
    },
    "slpd.regions.grid": (build_region_store, "grid"),
    "slpd.regions.min_tissue": (build_region_store, "min_tissue"),
    **{f"slpd.demo.{f}": (write_demo, f) for f in ("n_slides", "regions_per_slide", "grid", "missing")},
    **{
        f"slpd.train.{f.name}": (RegionTrainConfig, f.name)
        for f in dataclasses.fields(RegionTrainConfig)
        if f.name != "threads"
    },
    **{
        f"slpd.eval.{f.name}": (SlideEvalConfig, f.name)
        for f in dataclasses.fields(SlideEvalConfig)
        if f.name != "threads"
    },
}

# Schema defaults with no library counterpart: switches, paths and selections of the pipeline itself.
PIPELINE_ONLY = {
    "on_missing_slide": "the workflow's check of the sample sheet (config.check_slide_files, default error)",
    "benchmarks.plism.unmatched": "the pipeline scores the unmatched cosine; the library's default stays plismbench's metric set",
    "benchmarks.plism.robustness_tiles": "the pipeline adds the robustness index; the library's default stays plismbench's metric set",
    "results_dir": "the workflow's output folder; the library takes explicit paths",
    "seed": "the run's seed; each rule passes it (or one derived from it) to the library",
    "demo.enabled": "switch: make the demo slides",
    "demo.teacher.enabled": "switch: train the demo teacher",
    "demo.teacher.seed": "null: the run's seed",
    "demo.slides_dir": "path of the pipeline's demo slides",
    "demo.plism_dir": "path of the pipeline's PLISM demo set",
    "demo.multisite_cohorts": "a list of the sample sheet's cohorts (none by default)",
    "plism.enabled": "switch",
    "plism.source": "which rules make the matched tiles (registration or the public HDF5 tiles)",
    "plism.manifest": "path (required when enabled)",
    "plism.reference": "PLISM's reference slide id; the library takes the reference as an argument",
    "plism.stainings": "selection of manifest rows (empty: all)",
    "plism.h5_dir": "path",
    "teacher.model": "the pipeline's teacher (the paper's); DistillConfig.teacher is set from it",
    "teacher.cohorts": "selection (empty: all)",
    "embeddings.models": "selection",
    "embeddings.cohorts": "selection (empty: all)",
    "embeddings.exports": "selection of extra formats",
    "distill.nproc_per_node": "launcher (torchrun) setting of the distill rule",
    "distill.retries": "Snakemake retries of the distill rule",
    "benchmarks.models": "selection (empty: embeddings.models)",
    "benchmarks.plism.enabled": "switch",
    "benchmarks.hest.tasks_dir": "path",
    "benchmarks.hest.tasks": "selection",
    "benchmarks.hest.demo": "demo switch",
    "benchmarks.probe.demo": "demo switch (a HEST demo task's name)",
    "benchmarks.slide.demo": "demo switch (a cohort name)",
    "benchmarks.mitosis.enabled": "switch",
    "benchmarks.mitosis.demo": "switch",
    "benchmarks.segmentation.demo": "demo switch (a cohort name)",
    "benchmarks.mitosis.samples": "path",
    "benchmarks.scorenet.enabled": "switch",
    "benchmarks.scorenet.demo": "switch",
    "benchmarks.scorenet.manifest": "path",
    "benchmarks.mitosis.annotations": "path",
    "slpd.enabled": "switch",
    "slpd.models": "selection (empty: benchmarks.models)",
    "slpd.cohort": "selection (a cohort name)",
    "slpd.labels": "path",
    "slpd.nproc_per_node": "launcher (torchrun) setting of the pretrain_regions rule",
    "slpd.variants": "selection of ablation rows (each sets the loss weights it keeps)",
    "slpd.demo.enabled": "switch",
}

# Fields of settings classes that are deliberately not config keys, and why.
NOT_CONFIG: dict[type, dict[str, str] | str] = {
    TilingConfig: {},
    MaskConfig: {},  # every field is TilingConfig's (tiling.*), checked below
    TissueHoldoutConfig: {},
    RegistrationConfig: {"seed": "elastix's sampling seed: a registration does not depend on the run's seed"},
    AugmentConfig: {  # recorded in the teacher cache
        f.name: "DINOv2's augmentation recipe; not tunable per run"
        for f in dataclasses.fields(AugmentConfig)
        if f.name != "hed_jitter"
    },
    LinearProbeConfig: {"threads": "a process setting, not part of the protocol"},
    SegmentationConfig: {
        "patience": "per task (SEGMENTATION_TASKS); benchmarks.segmentation.patience overrides all"
    },
    KnnConfig: {
        "temperature": "DINO's protocol (0.07)",
        "block_size": "memory bound only; results do not depend on it",
        "default_k": "DINO's k without a validation split",
        "report_all_k": "extra rows for tests and analyses",
    },
    LogRegConfig: "the published protocol (UNI's linear_probe.py)",
    AbmilConfig: {"threads": "a process setting, not part of the protocol"},
    SamplerConfig: "the paper's sampling mix",
    MitosisConfig: {"lora": "the section benchmarks.mitosis.lora (LoraFinetuneConfig's fields)"},
    LoraFinetuneConfig: {
        "betas": "the paper's optimiser",
        "cycle_momentum": "the paper's schedule",
        "eval_batch_size": "memory bound only",
        "pooling": "each model's own pooling",
        "sampler": "SamplerConfig (the paper's mix)",
        "device": "chosen by the job (auto)",
        "precision": "chosen by the job (auto)",
        "threads": "a process setting",
        "seed": "the run's seed (top-level `seed`)",
    },
    DemoSlideConfig: {
        "levels": "pyramid of the demo files",
        "tile": "TIFF tile size",
        "blank": "test slides only",
    },
    PlismDemoConfig: {
        f: "the PLISM-like demo's scanners, stainings and warps are fixed (truth.json records them)"
        for f in (
            "scanners",
            "stainings",
            "max_rotation_deg",
            "max_shift_um",
            "max_scale",
            "elastic_um",
            "elastic_wavelength_um",
        )
    },
    DemoTeacherConfig: {
        "weight_decay": "the method (docs: the demo teacher)",
        "warmup_fraction": "the method (docs: the demo teacher)",
        "width_px": "the demo slides and tiles the rule passes (demo.*, tiling.*)",
        "height_px": "the demo slides and tiles the rule passes (demo.*, tiling.*)",
        "mpp": "the demo slides and tiles the rule passes (demo.*, tiling.*)",
        "tile_px": "the demo slides and tiles the rule passes (demo.*, tiling.*)",
        "tile_mpp": "the demo slides and tiles the rule passes (demo.*, tiling.*)",
        "min_tissue": "the demo slides and tiles the rule passes (demo.*, tiling.*)",
        "scale_jitter": "the method (docs: the demo teacher)",
        "hema": "the method (docs: the demo teacher)",
        "eosin": "the method (docs: the demo teacher)",
        "hue_deg": "the method (docs: the demo teacher)",
        "gain": "the method (docs: the demo teacher)",
        "gamma": "the method (docs: the demo teacher)",
        "blur_um": "the method (docs: the demo teacher)",
        "jpeg": "the method (docs: the demo teacher)",
        "reference_p": "the method (docs: the demo teacher)",
        "contrast_weight": "the method (docs: the demo teacher)",
        "contrast_temp": "the method (docs: the demo teacher)",
        "dense_weight": "the method (docs: the demo teacher)",
    },
    ScoreNetConfig: {"model": "the section benchmarks.scorenet.model (ScoreNetModelConfig's fields)"},
    ScoreNetModelConfig: {},
    ScoreNetDemoConfig: "the ScoreNet demo set is fixed (benchmarks.scorenet.demo only switches it on)",
    RegionTrainConfig: {"threads": "a process setting (the rule's threads)"},
    SlideEvalConfig: {"threads": "a process setting (the rule's threads)"},
    MitosisDemoConfig: "the mitosis demo set is fixed (benchmarks.mitosis.demo only switches it on)",
    # DistillConfig: each field is a key of distill.runs.<run> *without* a schema default (see below).
    DistillConfig: {
        "teacher": "the run's teacher is teacher.model",
        "teacher_weights": "the teacher's weights are models.<teacher>.weights",
        "collapse_floor": "distill.collapse_floor, one floor for every run and the heads stage",
        "collapse_patience": "distill.collapse_patience, as collapse_floor",
        "collapse_entropy_ceiling": "distill.collapse_entropy_ceiling, as collapse_floor",
    },
    # PairingConfig: each field is a key of distill.runs.<run>.pairing without a schema default (see below).
    PairingConfig: {},
    HeadsConfig: {
        "collapse_floor": "distill.collapse_floor (shared with the runs)",
        "collapse_patience": "distill.collapse_patience (shared with the runs)",
        "collapse_entropy_ceiling": "distill.collapse_entropy_ceiling (shared with the runs)",
        "seed": "the run's seed (top-level `seed`)",
    },
}


def _node(key: str) -> dict:
    node = SCHEMA
    for part in key.split("."):
        node = node["properties"][part]
    return node


def _schema_defaults(node: dict = SCHEMA, path: str = "") -> dict[str, object]:
    """Every default of a leaf key (sections' `default: {}` and free-form maps are not settings)."""
    out = {}
    for name, sub in node.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        if sub.get("type") == "object":
            out |= _schema_defaults(sub, key)
        elif "default" in sub:
            out[key] = sub["default"]
    return out


def _library_default(owner, name: str):
    if dataclasses.is_dataclass(owner):
        field = {f.name: f for f in dataclasses.fields(owner)}[name]
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        return field.default
    target = owner.__init__ if inspect.isclass(owner) else owner
    default = inspect.signature(target).parameters[name].default
    assert default is not inspect.Parameter.empty, f"{owner.__qualname__}({name}) has no default"
    return default


def _plain(value):
    """Tuples as lists (YAML has no tuple); everything else as is."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def test_every_schema_default_is_mapped_once():
    keys = set(_schema_defaults())
    assert not set(SOURCES) & set(PIPELINE_ONLY)
    assert keys - set(SOURCES) - set(PIPELINE_ONLY) == set(), "map the new schema default in SOURCES"
    assert set(SOURCES) | set(PIPELINE_ONLY) == keys, "a mapped key is not in the schema (anymore)"


@pytest.mark.parametrize("key", sorted(SOURCES))
def test_schema_default_equals_the_library_default(key):
    owner, name = SOURCES[key]
    assert _plain(_node(key)["default"]) == _plain(_library_default(owner, name)), (
        f"schema default of {key} differs from {owner.__qualname__}.{name}"
    )


def _settings_classes() -> set[type]:
    """Every dataclass named *Config or *Settings in the package (each module imported)."""
    found = set()
    for info in pkgutil.walk_packages(histodistill.__path__, "histodistill."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == module.__name__
                and obj.__name__.endswith(("Config", "Settings"))
            ):
                found.add(obj)
    return found


def test_every_settings_class_is_accounted_for():
    assert {c.__qualname__ for c in _settings_classes()} == {c.__qualname__ for c in NOT_CONFIG}


@pytest.mark.parametrize("cls", list(NOT_CONFIG), ids=lambda c: c.__qualname__)
def test_every_settings_field_is_a_config_key_or_says_why_not(cls):
    fields = {f.name for f in dataclasses.fields(cls)}
    excused = NOT_CONFIG[cls]
    if isinstance(excused, str):  # the whole class is not configurable
        assert not any(owner is cls for owner, _ in SOURCES.values())
        return
    assert set(excused) <= fields, "NOT_CONFIG names a field that does not exist"
    if cls in (DistillConfig, PairingConfig):
        return  # checked by test_distill_run_keys_have_no_schema_default
    if cls is MaskConfig:  # a view of TilingConfig: same names, same defaults
        for name in fields:
            assert _library_default(MaskConfig, name) == _library_default(TilingConfig, name)
        return
    mapped = {name for owner, name in SOURCES.values() if owner is cls}
    assert fields - set(excused) == mapped, (
        "map the field in SOURCES or say in NOT_CONFIG why it is not a key"
    )


def test_distill_run_keys_have_no_schema_default():
    """distill.runs.<run> keys are DistillConfig's fields with no default in the schema: unset keys take
    DistillConfig's defaults, which are therefore the only ones."""
    run = _node("distill.runs")["additionalProperties"]["properties"]
    assert [k for k, sub in run.items() if "default" in sub] == []
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(run) - {"cohort"} == fields - set(NOT_CONFIG[DistillConfig])
    pairing = run["pairing"]["properties"]
    assert [k for k, sub in pairing.items() if "default" in sub] == []
    assert set(pairing) == {f.name for f in dataclasses.fields(PairingConfig)}
    assert pairing["source"]["enum"] == list(PAIR_SOURCES)


def test_cli_defaults_are_the_librarys():
    from histodistill.cli import _MODEL_OPTIONS, _given, build_parser

    parser = build_parser()
    tile = parser.parse_args(["tile", "s.svs", "--out", "t.parquet"])
    tiling = TilingConfig()
    assert (tile.mpp, tile.tile_px, tile.min_tissue, tile.mask_mpp, tile.on_no_tissue) == (
        tiling.mpp,
        tiling.tile_px,
        tiling.min_tissue,
        tiling.mask_mpp,
        tiling.on_no_tissue,
    )
    assert (tile.tissue_method, tile.tissue_weights) == (tiling.tissue_method, tiling.tissue_weights)
    reg = parser.parse_args(["register", "a.svs", "b.svs", "--out", "o"])
    config = RegistrationConfig()
    assert (reg.fine_mpp, reg.grid_spacing_um, reg.iterations, reg.min_ncc, reg.max_residual_um) == (
        config.fine_mpp,
        config.grid_spacing_um,
        config.iterations,
        config.min_ncc,
        config.max_residual_um,
    )
    assert (reg.tile_mpp, reg.tile_px) == (tiling.mpp, tiling.tile_px)
    assert reg.on_failure == _library_default(register_to_grid, "on_failure")
    pack = parser.parse_args(["pack", "t.parquet", "--out", "s.zarr"])
    assert pack.chunk_tiles == _library_default(pack_tiles, "chunk_tiles")
    demo = parser.parse_args(["demo", "--out", "d"])
    spec = DemoSlideConfig()
    assert (demo.width_px, demo.height_px, demo.mpp) == (spec.width_px, spec.height_px, spec.mpp)
    # torch stages: an option not given is not passed, so the function's own default applies
    embed = parser.parse_args(["embed", "--model", "m", "--tiles", "t.zarr", "--out", "e.zarr"])
    assert _given(embed, *_MODEL_OPTIONS) == {}
    teacher = parser.parse_args(
        ["cache-teacher", "--model", "m", "--tiles", "t", "--out", "c", "--views", "4", "--batch-size", "8"]
    )
    assert _given(teacher, "views", "patch_tokens", "shard", "num_shards", *_MODEL_OPTIONS) == {
        "views": 4,
        "batch_size": 8,
    }
