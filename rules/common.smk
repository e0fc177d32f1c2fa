# Shared helpers of all rules/*.smk files. The sample sheet, result paths, per-rule resources from the
# config, and each stage's path and settings functions. Only functions and settings live here, the other
# .smk files hold only rules, so none of them depends on another's definitions or on the include order.
import gc
import re
from pathlib import Path

# Parse-time imports stay light (nothing heavier than pandas: no torch, SimpleITK, zarr, h5py, scipy,
# scikit-image; tests/unit/test_light_imports.py): heavy modules are imported by the rules' scripts only.
from histodistill.config import (
    DISTILL_HEAD_DEFAULTS,
    REPORT_CONFIG_KEYS,
    check_slide_files,
    config_slice,
    read_plism_manifest,
    read_sample_sheet,
)
from histodistill.ids import ID_REGEX
from histodistill.models.ref import ModelRef
from histodistill.mpp import parse_mpp

RESULTS = config["results_dir"]
# Every slide file must exist when the workflow loads (the demo's are rendered by demo_slide), whatever the
# target: `on_missing_slide: skip` leaves missing ones out with a warning, and the report lists them.
SAMPLES, SKIPPED_SLIDES = check_slide_files(
    read_sample_sheet(config["samples"]),
    config["demo"]["slides_dir"] if config["demo"]["enabled"] else None,
    config["on_missing_slide"],
)
COHORTS = sorted(SAMPLES["cohort"].unique())

# Plain-dict views of the sheet for the per-job lookups (a 10,000-slide sheet means tens of thousands of
# calls while the DAG is planned; a dict lookup costs well under 1 µs, a pandas `.loc` ~30 µs).
SLIDE_PATHS = dict(zip(SAMPLES["slide_id"], SAMPLES["path"]))
_SLIDE_MPPS = {s: parse_mpp(m) for s, m in zip(SAMPLES["slide_id"], SAMPLES["mpp"])}
SLIDE_COHORTS = dict(zip(SAMPLES["slide_id"], SAMPLES["cohort"]))
_COHORT_SLIDES = {}
for _slide, _cohort in zip(SAMPLES["slide_id"], SAMPLES["cohort"]):
    _COHORT_SLIDES.setdefault(_cohort, []).append(_slide)

if len(SAMPLES) >= 1000:
    # Planning a DAG of thousands of jobs allocates millions of objects; CPython's default cyclic-GC
    # threshold (700) then spends ~10% of the planning time in collections. Collect less often.
    gc.set_threshold(100_000, 50, 1000)


# The ids' one validator (histodistill.ids): the sample sheet and the CLI accept exactly what these match.
wildcard_constraints:
    slide=ID_REGEX,
    cohort=ID_REGEX,
    dataset=ID_REGEX,
    teacher=r"[A-Za-z0-9_.-]+",
    model=r"[A-Za-z0-9_.-]+",
    shard=r"\d+",


def slides_of(cohort):
    """The cohort's slide ids in sample-sheet order ([] for a cohort not in the sheet)."""
    return list(_COHORT_SLIDES.get(cohort, ()))


def slide_path(slide):
    return SLIDE_PATHS[slide]


def slide_mpp_override(slide):
    """The sample sheet's `mpp` for this slide, or None (then the slide's own metadata is used)."""
    return _SLIDE_MPPS[slide]


def resources_for(rule_name):
    """Resources of one rule from config['resources'] (its own entry over `default`).

    Maps the config's names onto what Snakemake and snakemake-executor-plugin-slurm read:
    partition → slurm_partition, runtime_min → runtime, cpus → cpus_per_task, gpus → gpu.
    """
    spec = {**config["resources"].get("default", {}), **config["resources"].get(rule_name, {})}
    out = {"mem_mb": spec.get("mem_mb", 4000), "runtime": spec.get("runtime_min", 60)}
    out["cpus_per_task"] = spec.get("cpus", 1)
    if spec.get("partition"):
        out["slurm_partition"] = spec["partition"]
    if spec.get("gpus"):
        if spec.get("nodes", 1) > 1:
            # Several nodes (a schema key `nodes`): cpus, mem_mb and gpus are per node and there is one task
            # per node. `mpi` makes the plugin run the job's script in the batch step (not inside `srun -n1`),
            # so the script can start torchrun on every node with its own `srun`.
            out["nodes"] = out["tasks"] = spec["nodes"]
            out["tasks_per_gpu"] = 0  # else the plugin turns `tasks` into --ntasks-per-gpu
            out["mpi"] = "srun"
            out["gres"] = f"gpu:{spec['gpus']}"
        else:
            out["gpu"] = spec["gpus"]
    return out


def group_for(rule_name):
    """The job group from `resources.<rule_name>.group`, or None. Jobs of one group are sent to SLURM
    together, `group-components` of them per submission (profiles/slurm)."""
    return config["resources"].get(rule_name, {}).get("group")


def student_checkpoint(model):
    """[the distill rule's checkpoint] for a `student-<run>` model wildcard, else []: the job's
    `input.student`, the path the student is loaded from (models/ref.py parses the name)."""
    ref = ModelRef.parse(model)
    return [f"{RESULTS}/students/{ref.run}/student.safetensors"] if ref.is_student else []


def threads_for(rule_name):
    return resources_for(rule_name)["cpus_per_task"]


def model_weights(name):
    """A model's configured weights file (`models.<name>.weights`), or None."""
    return config["models"].get(name, {}).get("weights")


# ------------------------------------------------------------------------------------------------ tiling

TILING_KEYS = (
    "mpp", "tile_px", "min_tissue", "mask_mpp", "min_object_um2", "min_hole_um2", "min_saturation",
    "min_brightness", "max_brightness", "remove_ink", "min_od", "tissue_method", "tissue_weights", "on_no_tissue",
)


# ------------------------------------------------------------------------------------------------ PLISM

PLISM = config["plism"]
PLISM_OUT = f"{RESULTS}/plism"
if PLISM["enabled"]:
    if not PLISM["manifest"]:
        raise ValueError("plism.enabled needs plism.manifest (a TSV: slide_id, path, scanner, staining)")
    PLISM_SLIDES = read_plism_manifest(PLISM["manifest"], PLISM["reference"], PLISM["stainings"] or None)
    PLISM_MOVING = [s for s in PLISM_SLIDES["slide_id"] if s != PLISM["reference"]]
    PLISM_SETTINGS = {k: PLISM[k] for k in ("reference", "stainings", "mpp", "tile_px", "min_tissue")}
    # plain dicts for the per-call lookups, as SLIDE_PATHS (a pandas `.loc` costs ~30 µs, a dict well under 1 µs)
    _PLISM_PATHS = dict(zip(PLISM_SLIDES["slide_id"], PLISM_SLIDES["path"]))
    _PLISM_MPPS = {s: parse_mpp(m) for s, m in zip(PLISM_SLIDES["slide_id"], PLISM_SLIDES["mpp"])}


def plism_path(slide):
    return _PLISM_PATHS[slide]


def plism_mpp(slide):
    return _PLISM_MPPS[slide]  # no override → None


if PLISM["enabled"]:
    # The manifest as rule params (NaN-free, so an unchanged manifest never looks changed).
    PLISM_RECORDS = [{**r, "mpp": plism_mpp(r["slide_id"])} for r in PLISM_SLIDES.to_dict("records")]


# ------------------------------------------------------------------------------------------------ teacher, distillation

NUM_SHARDS = config["teacher"]["num_shards"]


def teacher_cohorts():
    return config["teacher"]["cohorts"] or COHORTS


def distill_run(run):
    return config["distill"]["runs"][run]


HEAD_DIMS = tuple(DISTILL_HEAD_DEFAULTS)


def teacher_heads_file(run):
    """[the train_teacher_heads output] for a run with `teacher_heads: trained`, else [] (a path or
    `frozen` go to the trainer as they are)."""
    if distill_run(run).get("teacher_heads") != "trained":
        return []
    return [f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(run)['cohort']}.heads.safetensors"]


def run_settings(run):
    """The run's DistillConfig keyword arguments: its keys, the teacher, the shared collapse floor,
    `teacher_heads: trained` replaced by the heads file, and for a registered-pair run on the PLISM matched
    tiles (cohort `plism`) `pairing.tissue_holdout` = plism.tissue_holdout unless the run sets its own."""
    settings = {
        **{k: v for k, v in distill_run(run).items() if k != "cohort"},
        "teacher": config["teacher"]["model"],
        "teacher_weights": model_weights(config["teacher"]["model"]),
        "seed": distill_run(run).get("seed", config["seed"]),
        "collapse_floor": config["distill"]["collapse_floor"],
        "collapse_patience": config["distill"]["collapse_patience"],
        "collapse_entropy_ceiling": config["distill"]["collapse_entropy_ceiling"],
    }
    if teacher_heads_file(run):
        settings["teacher_heads"] = teacher_heads_file(run)[0]
    pairing = settings.get("pairing") or {}
    if pairing.get("source") == "registered" and distill_run(run)["cohort"] == "plism":
        # honest splits: the held-out tissues that score_plism scores never train (histodistill.holdout)
        settings["pairing"] = {"tissue_holdout": config["plism"]["tissue_holdout"], **pairing}
    if pairing.get("source") == "mask":
        settings["pairing"] = {**pairing, "mask_dir": mask_store(run)}
    return settings


def mask_store(run):
    """A mask-paired run's mask store (distill.pairs.read_mask_tile): its `pairing.mask_dir`, else the
    demo's `results/masks/{cohort}` (rule demo_mask writes it). None for other runs."""
    pairing = distill_run(run).get("pairing") or {}
    if pairing.get("source") != "mask":
        return None
    return pairing.get("mask_dir") or f"{RESULTS}/masks/{distill_run(run)['cohort']}"


def distill_masks(run):
    """The mask files a run reads, one `{mask store}/{slide_id}.tiff` per slide of its cohort (rule
    distill's input, so the masks are made first and a changed mask reruns the student); [] unpaired."""
    if mask_store(run) is None:
        return []
    slides = SAMPLES.loc[SAMPLES["cohort"] == distill_run(run)["cohort"], "slide_id"]
    return [f"{mask_store(run)}/{s}.tiff" for s in slides]


# Cohorts whose masks the demo generator writes (by rule demo_mask), the segmentation demo's and those of
# mask-paired runs that use the default store.
DEMO_MASK_COHORTS = sorted(
    {
        distill_run(r)["cohort"]
        for r in config["distill"]["runs"]
        if mask_store(r) == f"{RESULTS}/masks/{distill_run(r)['cohort']}"
    }
    | ({config["benchmarks"]["segmentation"]["demo"]} - {None, False})
)


def paired_report_runs():
    """{student-<run>: its pairing, teacher_mode, objective, seed} of the benchmarked runs that set a
    `pairing`: the report's seed-style tables (histodistill.report.paired)."""
    keys = ("pairing", "teacher_mode", "objective")
    return {
        f"student-{name}": {**{k: run[k] for k in keys if k in run}, "seed": run.get("seed", config["seed"])}
        for name, run in config["distill"]["runs"].items()
        if run.get("pairing") and f"student-{name}" in bench_models()
    }


# Runs with `teacher_heads: trained` load heads of distill.teacher_heads' dimensions: refuse a mismatch now,
# not after the heads are trained (unset run keys are DistillConfig's defaults).
for _run in config["distill"]["runs"]:
    if teacher_heads_file(_run):
        _differ = {
            k: (distill_run(_run).get(k, DISTILL_HEAD_DEFAULTS[k]), config["distill"]["teacher_heads"][k])
            for k in HEAD_DIMS
            if distill_run(_run).get(k, DISTILL_HEAD_DEFAULTS[k]) != config["distill"]["teacher_heads"][k]
        }
        if _differ:
            raise ValueError(
                f"distill run {_run!r} uses teacher_heads: trained, but its head dimensions differ from "
                f"distill.teacher_heads': {_differ} (run, heads stage)"
            )


# ------------------------------------------------------------------------------------------------ embeddings


def embed_cohorts():
    """Datasets every model embeds: the configured cohorts (or all) and the PLISM matched tiles.

    (HEST tasks, datasets `hest-{task}`, probe tasks, `probe-{task}`, segmentation tasks,
    `segmentation-{task}`, and the mitosis patches, `mitosis`, are embedded on demand by the models that are
    scored.)
    """
    return list(config["embeddings"]["cohorts"] or COHORTS) + (["plism"] if config["plism"]["enabled"] else [])


def dataset_store(dataset):
    """A dataset's tile store: a cohort's, the PLISM matched tiles (read as one flat store), a HEST task's,
    a probe task's image files, or the mitosis annotations' patches."""
    if dataset == "plism":
        return f"{RESULTS}/plism/tiles.zarr"
    if dataset == "mitosis":
        return f"{RESULTS}/mitosis/patches.zarr"
    if dataset.startswith("hest-"):
        return f"{RESULTS}/hest/{dataset.removeprefix('hest-')}.zarr"
    if dataset.startswith("probe-"):
        return f"{RESULTS}/probe/{dataset.removeprefix('probe-')}.zarr"
    if dataset.startswith("segmentation-"):
        return f"{RESULTS}/segmentation/{dataset.removeprefix('segmentation-')}.zarr"
    return f"{RESULTS}/tilestore/{dataset}.zarr"


def embed_pooling(dataset):
    """A dataset's pooling: segmentation stores are embedded as patch tokens (EVA's cached decoder inputs)."""
    return "patch_tokens" if dataset.startswith("segmentation-") else config["embeddings"]["pooling"]


def embedding(model, dataset):
    return f"{RESULTS}/embeddings/{model}/{dataset}.zarr"


# ------------------------------------------------------------------------------------------------ benchmarks

BENCH = config["benchmarks"]
HEST = BENCH["hest"]
PROBE = BENCH["probe"]
MITOSIS = BENCH["mitosis"]
SEGMENTATION = BENCH["segmentation"]
# name → {eva, root}; the demo's task (`demo`, from the demo cohort's tiles and masks) has no entry of its own
SEGMENTATION_TASKS = {
    **({"demo": {}} if config["demo"]["enabled"] and SEGMENTATION["demo"] else {}),
    **SEGMENTATION["tasks"],
}
SEGMENTATION_SETTINGS = {
    k: v for k, v in SEGMENTATION.items() if k not in ("tasks", "demo", "demo_tiles_per_slide")
}
MITOSIS_DEMO_DIR = f"{RESULTS}/demo/mitosis"
SCORENET = BENCH["scorenet"]
SCORENET_DEMO_DIR = f"{RESULTS}/demo/scorenet"


def bench_models():
    return BENCH["models"] or config["embeddings"]["models"]


def report_config():
    """The settings the report shows (histodistill.config.REPORT_CONFIG_KEYS), its only config params: an
    edit of anything else (resources, a SLURM runtime, a distillation setting) does not rerun the report."""
    return config_slice(config, REPORT_CONFIG_KEYS)


def hest_task_dir(task):
    return f"{HEST['tasks_dir']}/{task}"


def probe_task(name):
    """A probe task's dataset and row manifest: a cohort's tiles, or image files packed by `probe_store`."""
    task = PROBE["tasks"][name]
    settings = {k: task[k] for k in ("eva", "linear") if task.get(k)}  # per-task linear-probe settings
    if task.get("images"):
        return {
            "dataset": f"probe-{name}",
            "manifest": f"{RESULTS}/probe/{name}.csv",
            "level": task["level"],
            **settings,
        }
    if not (task.get("dataset") and task.get("manifest")):
        raise ValueError(f"benchmarks.probe.tasks.{name}: give `images`, or `dataset` and `manifest`")
    return {"dataset": task["dataset"], "manifest": task["manifest"], "level": task["level"], **settings}


PROBE_TASKS = {name: probe_task(name) for name in PROBE["tasks"]}

SLIDE = BENCH["slide"]
SLIDE_DEMO_TASK = f"{RESULTS}/demo/slide/{SLIDE['demo']}_bags.csv"


def slide_task(name):
    """A slide task's dataset, manifest and settings (EVA's task name, ABMIL overrides)."""
    task = SLIDE["tasks"][name]
    return {k: task[k] for k in ("dataset", "manifest", "eva", "abmil") if task.get(k)}


SLIDE_TASKS = {name: slide_task(name) for name in SLIDE["tasks"]}
if config["demo"]["enabled"] and PROBE["demo"] and not (HEST["demo"] and PROBE["demo"] in HEST["tasks"]):
    raise ValueError(
        f"benchmarks.probe.demo ({PROBE['demo']}) labels the latent crops of that demo HEST task: set "
        f"benchmarks.hest.demo: true and list it in benchmarks.hest.tasks (now {HEST['tasks']})"
    )


def mitosis_inputs():
    """The annotated slides: the demo set's directory, or the user's sheet, annotations and slides."""
    if MITOSIS["demo"]:
        return [MITOSIS_DEMO_DIR]
    sheet = read_sample_sheet(MITOSIS["samples"])
    return [MITOSIS["samples"], MITOSIS["annotations"], *sheet["path"]]


# The benchmarks this run scores: each benchmark's block in rules/benchmarks.smk adds its name when its
# config enables it; the report reads the list when the DAG is built (after every rule file is read).
ENABLED_BENCHMARKS = []


# ------------------------------------------------------------------------------------------------ slide level (SLPD)

SLPD = config["slpd"]
if SLPD["enabled"] and not set(SLPD["models"]) <= set(bench_models()):
    raise ValueError(
        f"slpd.models {sorted(set(SLPD['models']) - set(bench_models()))} are not benchmarks.models: the report "
        "shows the benchmarked models only; add them there or remove them from slpd.models"
    )


def slpd_models():
    """The patch encoders the slide-level stage pretrains on and scores: slpd.models or benchmarks.models."""
    return SLPD["models"] or bench_models()


def benchmark_models(name):
    """The models benchmark `name` scores (the report's inputs): slide → slpd_models(), others bench_models()."""
    return slpd_models() if name == "slpd" else bench_models()


def slpd_cohort():
    """The cohort whose tile embeddings make the regions (slpd.cohort, else the first cohort)."""
    return SLPD["cohort"] or COHORTS[0]


def slpd_regions(model):
    return f"{RESULTS}/slide/{model}/regions.zarr"


def slpd_labels(model):
    """The slide labels: the demo's (written with its synthetic slides) or slpd.labels."""
    if SLPD["demo"]["enabled"]:
        return f"{RESULTS}/slide/{model}/labels.csv"
    if not SLPD["labels"]:
        raise ValueError("slpd.enabled needs slpd.labels (a CSV: slide_id, label) or slpd.demo.enabled")
    return SLPD["labels"]
