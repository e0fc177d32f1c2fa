# Teacher feature cache: one job per shard (GPU on SLURM), then a manifest joining the shards.


rule cache_teacher_shard:
    input:
        store=lambda w: dataset_store(w.cohort),  # a cohort's tile store, or (plism) the matched tiles
        weights=lambda w: model_weights(w.teacher) or [],  # a local weights file (e.g. the demo teacher's)
    output:
        shard=directory(f"{RESULTS}/teacher/{{teacher}}/{{cohort}}/shard-{{shard}}-of-{NUM_SHARDS}.zarr"),
    params:
        views=config["teacher"]["views"],
        hed_jitter=config["teacher"]["hed_jitter"],
        patch_tokens=config["teacher"]["patch_tokens"],
        batch_size=config["teacher"]["batch_size"],
        num_workers=config["teacher"]["num_workers"],
        precision=config["teacher"]["precision"],
        seed=config["seed"],
        weights=lambda w: model_weights(w.teacher),
    log:
        "logs/cache_teacher/{teacher}/{cohort}/shard-{shard}.log",
    threads: threads_for("cache_teacher")
    resources:
        **resources_for("cache_teacher"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/cache_teacher.py"


rule cache_teacher:
    input:
        shards=expand(
            f"{RESULTS}/teacher/{{{{teacher}}}}/{{{{cohort}}}}/shard-{{shard}}-of-{NUM_SHARDS}.zarr",
            shard=range(NUM_SHARDS),
        ),
    output:
        cache=directory(f"{RESULTS}/teacher/{{teacher}}/{{cohort}}.zarr"),
    log:
        "logs/gather_teacher/{teacher}/{cohort}.log",
    localrule: True
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/gather_teacher.py"


rule all_teacher:
    input:
        expand(f"{RESULTS}/teacher/{config['teacher']['model']}/{{cohort}}.zarr", cohort=teacher_cohorts()),
