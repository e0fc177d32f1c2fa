"""The demo the workflow tests run: README's demo with smaller slides and cheaper benchmarks, in a workdir
that holds a copy of the workflow, as a user's checkout does.

`write_demo_config` is shared by the local runs (tests/workflow) and the SLURM run
(tests/slurm/run_slurm_test.sh calls `python -m tests.workflow.demo_config RUN_DIR [PARTITION]`), so one
demo run serves both: the suite runs the demo end to end once.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PLISM_SLIDES = ("GMH_S60", "GMH_AT2", "GIV_S60", "GIV_GT450")
WORKFLOW = ("Snakefile", "rules", "workflow_scripts", "configs", "profiles", "envs")


def copy_workflow(workdir: Path) -> None:
    """The workflow files of a checkout (Snakefile, rules, scripts, configs, profiles, envs) into `workdir`."""
    for name in WORKFLOW:
        src, dst = REPO / name, workdir / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)


def write_demo_config(
    workdir: Path,
    teacher: dict | None = None,
    plism: dict | None = None,
    partition: str | None = None,
    **tiling,
) -> Path:
    """Write `workdir/config.yaml` (README's demo, smaller) and the sample sheets it names.

    Smaller: 2048 × 1536 px slides, 4 PLISM slides (the reference, another scanner, another staining, and
    both different: 3 registrations), a probe of 300 steps with EVA's 5 runs, a one-epoch LoRA, no ScoreNet, and no
    `feature`-objective student (3 models: teacher, DINO+iBOT student, random init). The distillation
    runs in 2 processes (torchrun, gloo) as on a cluster. `partition` is kept
    from an existing config.yaml when not given, so a test that rewrites the config plans against the
    same settings the run used. `teacher`, `plism` and `tiling` override those sections.
    """
    path = workdir / "config.yaml"
    if partition is None and path.exists():
        partition = yaml.safe_load(path.read_text())["resources"]["default"].get("partition")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["demo"].update(width_px=2048, height_px=1536, plism_width_px=2048, plism_height_px=1536)
    config["tiling"].update(tiling)
    config["teacher"].update(teacher or {})
    config["plism"].update(plism or {})
    if partition:  # the repo's resources fit a 2-CPU node as they are
        for spec in config["resources"].values():
            spec["partition"] = partition
    config["distill"]["nproc_per_node"] = 2  # torchrun inside the job (gloo on CPU)
    # 3 models, not README's 4: the `feature` student's distillation, embeddings and scores are over the
    # suite's budget (README "Distillation section")
    del config["distill"]["runs"]["demo_feature"]
    for key in ("embeddings", "benchmarks"):
        config[key]["models"] = [m for m in config[key]["models"] if m != "student-demo_feature"]
    # EVA's 5 runs seeded once: one run's recovery varies by about 0.15-0.19 (s.d.) with the head's seed alone
    # (README "Distillation section"); 4 more runs cost about 7 CPU s over the 3 models
    config["benchmarks"]["probe"]["linear"].update(max_steps=300, seeds=[0, 1, 2, 3, 4])
    config["benchmarks"]["mitosis"]["lora"].update(epochs=1, epoch_samples=16, val_samples=8)
    # ScoreNet trains per model for minutes of CPU: over the suite's budget; tests/unit/test_scorenet_demo.py
    # (slow) runs it with README's demo settings
    config["benchmarks"]["scorenet"]["enabled"] = False
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    (workdir / "configs" / "demo_samples.tsv").write_text((REPO / "configs" / "demo_samples.tsv").read_text())
    rows = (REPO / "configs" / "demo_plism.tsv").read_text().splitlines()
    keep = [r for r in rows if r.split("\t")[0] in ("slide_id", *PLISM_SLIDES)]
    (workdir / "configs" / "demo_plism.tsv").write_text("\n".join(keep) + "\n")
    path.write_text(yaml.safe_dump(config))
    return path


def prepare(workdir: Path, partition: str | None = None) -> Path:
    """A workdir ready for `snakemake --profile profiles/<local|slurm> all_benchmarks`."""
    workdir.mkdir(parents=True, exist_ok=True)
    copy_workflow(workdir)
    return write_demo_config(workdir, partition=partition)


if __name__ == "__main__":
    prepare(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
