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


# A run's resume directory (its checkpoint.pt) is the output of its own rule: Snakemake knows it, so
# `--delete-all-output` removes it and a change of any input or setting recreates it empty, while a failed or
# preempted `distill` job (exit 75) keeps it for its retry, since Snakemake deletes only that job's outputs.
# The trainer also binds each checkpoint to the digests of its inputs and never resumes one trained on others.
rule distill_resume:
    input:
        tiles=lambda w: dataset_store(distill_run(w.run)["cohort"]),  # as distill's: plism, the matched tiles
        cache=lambda w: f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(w.run)['cohort']}.zarr",
        heads=lambda w: teacher_heads_file(w.run),
        teacher_weights=model_weights(config["teacher"]["model"]) or [],
        masks=lambda w: distill_masks(w.run),  # a mask-paired run's mask store (pairing.source: mask)
    output:
        resume=directory(f"{RESULTS}/students/{{run}}/resume"),
    params:
        settings=lambda w: run_settings(w.run),
    log:
        "logs/distill_resume/{run}.log",
    localrule: True
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/distill_resume.py"


rule distill:
    input:
        tiles=lambda w: dataset_store(distill_run(w.run)["cohort"]),  # cohort plism: the matched tiles
        cache=lambda w: f"{RESULTS}/teacher/{config['teacher']['model']}/{distill_run(w.run)['cohort']}.zarr",
        heads=lambda w: teacher_heads_file(w.run),
        teacher_weights=model_weights(config["teacher"]["model"]) or [],  # loaded by teacher_mode: online
        masks=lambda w: distill_masks(w.run),  # a mask-paired run's mask files, read per tile (distill.pairs)
        resume=f"{RESULTS}/students/{{run}}/resume",  # its mtime is its .snakemake_timestamp: checkpoints do not count
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
