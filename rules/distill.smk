# Distillation: one student per configured run, from the cohort's cached teacher (torchrun when >1 process).


def distill_run(run):
    return config["distill"]["runs"][run]


rule distill:
    input:
        tiles=lambda w: f"{RESULTS}/tilestore/{distill_run(w.run)['cohort']}.zarr",
        cache=lambda w: f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(w.run)['cohort']}.zarr",
        teacher_weights=model_weights(config["teacher"]["model"]) or [],  # loaded by teacher_mode: online
    output:
        student=f"{RESULTS}/students/{{run}}/student.safetensors",
        ema=f"{RESULTS}/students/{{run}}/student_ema.safetensors",
        log=f"{RESULTS}/students/{{run}}/train_log.parquet",
        plot=f"{RESULTS}/students/{{run}}/loss.png",
    params:
        settings=lambda w: {
            **{k: v for k, v in distill_run(w.run).items() if k != "cohort"},
            "teacher": config["teacher"]["model"],
            "teacher_weights": model_weights(config["teacher"]["model"]),
            "seed": distill_run(w.run).get("seed", config["seed"]),
        },
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
