"""configs/h0mini.yaml (the paper's setup) as Snakemake plans it, on trees of placeholder files.

- At 10,000 slides `snakemake -n --profile profiles/slurm all_benchmarks --configfile configs/h0mini.yaml`
  plans the expected jobs per rule in under 60 s (a dry run reads no pixels: every leaf is an empty file).
- After a (touched) complete run, editing one stage's setting plans exactly that stage and its dependants.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from benchmarks.dag_scale import CONFIG, dry_run, job_counts, make_placeholder_tree, run_snakemake
from histodistill.bench.probe import abmil_config, linear_config
from histodistill.config import load_schema, validate_config
from tests.conftest import REPO

H0MINI = yaml.safe_load(CONFIG.read_text())
MODELS = H0MINI["benchmarks"]["models"]  # every scored model, the distilled student among them
# Datasets each scored model embeds: the EVA probe stores, the PLISM tiles, the HEST tasks and the EVA
# slide tasks' cohorts, and the EVA segmentation tasks (as patch tokens).
SLIDE_DATASETS = {t["dataset"] for t in H0MINI["benchmarks"]["slide"]["tasks"].values()}
SEGMENTATION_TASKS = H0MINI["benchmarks"]["segmentation"]["tasks"]
DATASETS_PER_MODEL = (
    len(H0MINI["embeddings"]["cohorts"])
    + 1
    + len(H0MINI["benchmarks"]["hest"]["tasks"])
    + len(SLIDE_DATASETS)
    + len(SEGMENTATION_TASKS)
)


def expected_jobs(n_slides: int) -> dict[str, int]:
    n_models = len(MODELS)
    return {
        "tile_slide": n_slides,
        "pack_tiles": 1,  # tcga
        "probe_store": len(H0MINI["benchmarks"]["probe"]["tasks"]),  # EVA's image files → tile stores
        "cache_teacher_shard": H0MINI["teacher"]["num_shards"],
        "cache_teacher": 1,
        "train_teacher_heads": 1,  # H-Optimus-0's DINO/iBOT heads, learned on the cached tokens
        "distill_resume": 1,  # the run's resume directory (its checkpoint), an output of its own
        "distill": 1,
        "plism_tiles": 1,  # from the 91 pre-registered h5 files: no registration jobs
        "hest_store": len(H0MINI["benchmarks"]["hest"]["tasks"]),
        "embed": n_models * DATASETS_PER_MODEL,
        "score_plism": n_models,
        "score_hest": n_models,
        "score_probe": n_models,
        "score_slide": n_models,
        "segmentation_store": len(SEGMENTATION_TASKS),  # CoNSeP, MoNuSAC from their published layouts
        "score_segmentation": n_models,
        "report": 1,
        "all_benchmarks": 1,
    }


def test_h0mini_config_is_valid_and_is_the_papers_recipe():
    config = validate_config(yaml.safe_load(CONFIG.read_text()), load_schema())
    run = config["distill"]["runs"]["h0mini"]
    assert (run["iterations"], run["batch_size"], run["n_prototypes"]) == (105_000, 2048, 131_072)
    assert (run["dino_bottleneck"], run["ibot_bottleneck"]) == (384, 256)
    assert (run["warmup_epochs"], run["warmup_teacher_temp_epochs"], run["weight_decay_end"]) == (16, 30, 0.4)
    assert run["student"] == "h0_mini" and config["teacher"]["model"] == "h_optimus_0"
    assert run["teacher_heads"] == "trained" and config["distill"]["teacher_heads"]["n_prototypes"] == 131_072
    assert (config["tiling"]["mpp"], config["tiling"]["tile_px"]) == (0.5, 224)
    assert len(config["benchmarks"]["hest"]["tasks"]) == 9
    manifest = (REPO / config["plism"]["manifest"]).read_text().splitlines()
    assert len(manifest) == 1 + 91 and manifest[0].split("\t") == ["slide_id", "path", "scanner", "staining"]
    assert {name: task["eva"] for name, task in config["benchmarks"]["segmentation"]["tasks"].items()} == {
        "consep": "consep",
        "monusac": "monusac",
    }
    # every EVA patch task takes EVA's own linear-probe settings (pinned in tests/unit/test_bench_probe.py)
    probe = config["benchmarks"]["probe"]
    assert {name: task.get("eva") for name, task in probe["tasks"].items()} == {
        "bach": "bach",
        "crc": "crc",
        "mhist": "mhist",
        "pcam": "pcam",
    }
    patience = {
        n: linear_config(probe["linear"], t["eva"], t.get("linear")).patience
        for n, t in probe["tasks"].items()
    }
    assert patience == {"bach": 1250, "crc": 7, "mhist": 278, "pcam": 3}
    assert linear_config(probe["linear"]) == linear_config(None)  # the global section is EVA's CRC default
    # both EVA slide tasks take EVA's ABMIL settings (pinned in tests/unit/test_bench_slide.py)
    slide = config["benchmarks"]["slide"]["tasks"]
    assert {name: task.get("eva") for name, task in slide.items()} == {
        "camelyon16_small": "camelyon16_small",
        "panda_small": "panda_small",
    }
    assert {n: abmil_config(None, t["eva"]).max_tiles for n, t in slide.items()} == {
        "camelyon16_small": 1000,
        "panda_small": 200,
    }


@pytest.fixture(scope="module")
def tree_10k(tmp_path_factory) -> Path:
    return make_placeholder_tree(tmp_path_factory.mktemp("h0mini_10k"), 10_000)


def test_dry_run_of_10000_slides_plans_every_stage_in_under_60_s(tree_10k):
    seconds, result = dry_run(tree_10k)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_counts(result) == expected_jobs(10_000)
    load = os.getloadavg()[0]
    assert seconds < 60, f"dry run of 10,000 slides took {seconds:.1f} s (load average {load:.1f})"


# --- rerun one stage ------------------------------------------------------------------------------------

N_SMALL = 12


def write_config(workdir: Path, edit=None) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    if edit:
        edit(config)
    path = workdir / "h0mini.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def done_tree(tmp_path_factory) -> Path:
    """A small tree in the state after a complete run: every output exists, Snakemake recorded its
    metadata (params, code, inputs) with `--touch`, and a dry run finds nothing to do."""
    workdir = make_placeholder_tree(tmp_path_factory.mktemp("h0mini_done"), N_SMALL)
    config = write_config(workdir)
    _, planned = dry_run(workdir, config=config)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    outputs = {
        path
        for line in planned.stdout.splitlines()
        if line.startswith("    output: ")
        for path in line.removeprefix("    output: ").split(", ")
    }
    assert len(outputs) > 2 * N_SMALL
    for out in sorted(outputs):
        path = workdir / out
        if out.endswith((".zarr", "/resume")):  # directory outputs (stores, a run's resume directory)
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    # --forceall: every job is touched (in DAG order) and gets its metadata, also one whose placeholder
    # happens to be newer than its inputs already
    _, touched = run_snakemake(workdir, "--touch", "--forceall", config=config)
    assert touched.returncode == 0, touched.stdout[-3000:] + touched.stderr[-3000:]
    _, again = dry_run(workdir, config=config)
    assert again.returncode == 0 and job_counts(again) == {}, again.stdout[-3000:]
    return workdir


def planned_after(workdir: Path, edit) -> dict[str, int]:
    _, result = dry_run(workdir, config=write_config(workdir, edit))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return job_counts(result)


def test_editing_the_distillation_lr_reruns_that_student_and_its_dependants_only(done_tree):
    def edit(config):
        config["distill"]["runs"]["h0mini"]["lr"] = 4e-4

    # the student, its embeddings of every dataset, its three scores and the report: nothing upstream
    assert planned_after(done_tree, edit) == {
        "distill_resume": 1,  # a new resume directory: no checkpoint of the old settings
        "distill": 1,
        "embed": DATASETS_PER_MODEL,
        "score_plism": 1,
        "score_hest": 1,
        "score_probe": 1,
        "score_slide": 1,
        "score_segmentation": 1,
        "report": 1,
        "all_benchmarks": 1,
    }


def test_editing_the_plism_top_k_list_rescores_plism_only(done_tree):
    def edit(config):
        config["benchmarks"]["plism"]["top_k"] = [1, 5, 10]

    assert planned_after(done_tree, edit) == {"score_plism": len(MODELS), "report": 1, "all_benchmarks": 1}
