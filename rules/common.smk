# Shared helpers: the sample sheet, result paths, per-rule resources from the config.
from histodistill.config import read_sample_sheet

RESULTS = config["results_dir"]
SAMPLES = read_sample_sheet(config["samples"])
COHORTS = sorted(SAMPLES["cohort"].unique())


wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    cohort=r"[A-Za-z0-9._-]+",
    dataset=r"[A-Za-z0-9._-]+",
    teacher=r"[A-Za-z0-9_.-]+",
    model=r"[A-Za-z0-9_.-]+",
    shard=r"\d+",


def slides_of(cohort):
    return SAMPLES.loc[SAMPLES["cohort"] == cohort, "slide_id"].tolist()


def slide_mpp_override(slide):
    """The sample sheet's `mpp` for this slide, or None (then the slide's own metadata is used)."""
    value = SAMPLES.loc[slide, "mpp"]
    return None if value != value else float(value)  # NaN → None


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
        out["gpu"] = spec["gpus"]
    return out


def threads_for(rule_name):
    return resources_for(rule_name)["cpus_per_task"]
