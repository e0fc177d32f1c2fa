# Distillation: one student per configured run, from the cohort's cached teacher (torchrun when >1 process).


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
            "collapse_entropy_ceiling": config["distill"]["collapse_entropy_ceiling"],
            "seed": config["seed"],
        },
    log:
        "logs/train_teacher_heads/{teacher}/{cohort}.log",
    threads: threads_for("train_teacher_heads")
    resources:
        **resources_for("train_teacher_heads"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/train_teacher_heads.py"


# students/{run}/checkpoint.pt is not an output: Snakemake deletes a failed job's outputs before its retry,
# and a run preempted with exit 75 resumes from it. The trainer binds it to this rule's inputs (tile store,
# teacher cache, heads, weights, settings) and never resumes one trained on others; a finished run removes it.
rule distill:
    input:
        tiles=lambda w: f"{RESULTS}/tilestore/{distill_run(w.run)['cohort']}.zarr",
        cache=lambda w: f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(w.run)['cohort']}.zarr",
        heads=lambda w: teacher_heads_file(w.run),
        teacher_weights=model_weights(config["teacher"]["model"]) or [],  # loaded by teacher_mode: online
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
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/distill.py"


rule all_students:
    input:
        expand(f"{RESULTS}/students/{{run}}/student.safetensors", run=list(config["distill"]["runs"])),
