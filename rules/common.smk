# Shared helpers: the sample sheet, result paths, per-rule resources from the config.
import gc

from histodistill.config import read_sample_sheet
from histodistill.models.ref import ModelRef
from histodistill.slides import parse_mpp

RESULTS = config["results_dir"]
SAMPLES = read_sample_sheet(config["samples"])
COHORTS = sorted(SAMPLES["cohort"].unique())

# Plain-dict views of the sheet for the per-job lookups (a 10,000-slide sheet means tens of thousands of
# calls while the DAG is planned; a dict lookup costs well under 1 µs, a pandas `.loc` ~30 µs).
SLIDE_PATHS = dict(zip(SAMPLES["slide_id"], SAMPLES["path"]))
_SLIDE_MPPS = {s: parse_mpp(m) for s, m in zip(SAMPLES["slide_id"], SAMPLES["mpp"])}
_COHORT_SLIDES = {}
for _slide, _cohort in zip(SAMPLES["slide_id"], SAMPLES["cohort"]):
    _COHORT_SLIDES.setdefault(_cohort, []).append(_slide)

if len(SAMPLES) >= 1000:
    # Planning a DAG of thousands of jobs allocates millions of objects; CPython's default cyclic-GC
    # threshold (700) then spends ~10% of the planning time in collections. Collect less often.
    gc.set_threshold(100_000, 50, 1000)


wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    cohort=r"[A-Za-z0-9._-]+",
    dataset=r"[A-Za-z0-9._-]+",
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
    """The job group of a rule (`resources.<rule>.group`), or None: jobs of one group are sent to SLURM
    together, `group-components` of them per submission (profiles/slurm)."""
    return config["resources"].get(rule_name, {}).get("group")


def student_checkpoint(model):
    """[the distill rule's checkpoint] for a `student-<run>` model wildcard, else []: the job's
    `input.student`, the path the student is loaded from (models/ref.py parses the name)."""
    ref = ModelRef.parse(model)
    return [f"{RESULTS}/students/{ref.run}/student.safetensors"] if ref.is_student else []


def threads_for(rule_name):
    return resources_for(rule_name)["cpus_per_task"]
