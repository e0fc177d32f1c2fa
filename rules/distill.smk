# Distillation: one student per configured run, from the cohort's cached teacher (torchrun when >1 process).


def distill_run(run):
    return config["distill"]["runs"][run]


HEAD_DIMS = ("n_prototypes", "head_hidden", "dino_bottleneck", "ibot_bottleneck")


def teacher_heads_file(run):
    """[the train_teacher_heads output] for a run with `teacher_heads: trained`, else [] (a path or
    `frozen` go to the trainer as they are)."""
    if distill_run(run).get("teacher_heads") != "trained":
        return []
    return [f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(run)['cohort']}.heads.safetensors"]


def run_settings(run):
    """The run's DistillConfig keyword arguments: its keys, the teacher, the shared collapse floor, and
    `teacher_heads: trained` replaced by the heads file."""
    settings = {
        **{k: v for k, v in distill_run(run).items() if k != "cohort"},
        "teacher": config["teacher"]["model"],
        "teacher_weights": model_weights(config["teacher"]["model"]),
        "seed": distill_run(run).get("seed", config["seed"]),
        "collapse_floor": config["distill"]["collapse_floor"],
        "collapse_patience": config["distill"]["collapse_patience"],
    }
    if teacher_heads_file(run):
        settings["teacher_heads"] = teacher_heads_file(run)[0]
    return settings


# Runs with `teacher_heads: trained` load heads of distill.teacher_heads' dimensions: refuse a mismatch now,
# not after the heads are trained (unset run keys are DistillConfig's defaults).
for _run in config["distill"]["runs"]:
    if teacher_heads_file(_run):
        from histodistill.distill.trainer import DistillConfig

        _differ = {
            k: (distill_run(_run).get(k, getattr(DistillConfig(), k)), config["distill"]["teacher_heads"][k])
            for k in HEAD_DIMS
            if distill_run(_run).get(k, getattr(DistillConfig(), k)) != config["distill"]["teacher_heads"][k]
        }
        if _differ:
            raise ValueError(
                f"distill run {_run!r} uses teacher_heads: trained, but its head dimensions differ from "
                f"distill.teacher_heads': {_differ} (run, heads stage)"
            )


rule train_teacher_heads:
    input:
        cache=f"{RESULTS}/teacher/{{teacher}}/{{cohort}}.zarr",
    output:
        heads=f"{RESULTS}/teacher/{{teacher}}/{{cohort}}.heads.safetensors",
        log=f"{RESULTS}/teacher/{{teacher}}/{{cohort}}.heads/train_log.parquet",
        plot=f"{RESULTS}/teacher/{{teacher}}/{{cohort}}.heads/loss.png",
    params:
        settings={
            **config["distill"]["teacher_heads"],
            "collapse_floor": config["distill"]["collapse_floor"],
            "collapse_patience": config["distill"]["collapse_patience"],
            "seed": config["seed"],
        },
    log:
        "logs/train_teacher_heads/{teacher}/{cohort}.log",
    threads: threads_for("train_teacher_heads")
    resources:
        **resources_for("train_teacher_heads"),
    script:
        "../workflow_scripts/train_teacher_heads.py"


rule distill:
    input:
        tiles=lambda w: f"{RESULTS}/tilestore/{distill_run(w.run)['cohort']}.zarr",
        cache=lambda w: f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(w.run)['cohort']}.zarr",
        heads=lambda w: teacher_heads_file(w.run),
    output:
        student=f"{RESULTS}/students/{{run}}/student.safetensors",
        ema=f"{RESULTS}/students/{{run}}/student_ema.safetensors",
        log=f"{RESULTS}/students/{{run}}/train_log.parquet",
        plot=f"{RESULTS}/students/{{run}}/loss.png",
    params:
        settings=lambda w: run_settings(w.run),
        nproc_per_node=config["distill"]["nproc_per_node"],
    log:
        "logs/distill/{run}.log",
    retries: config["distill"]["retries"]
    threads: threads_for("distill")
    resources:
        **resources_for("distill"),
    script:
        "../workflow_scripts/distill.py"


rule all_students:
    input:
        expand(f"{RESULTS}/students/{{run}}/student.safetensors", run=list(config["distill"]["runs"])),
