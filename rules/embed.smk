# Embedding extraction: every configured model × cohort → Zarr [N, D] (+ optional export formats).


rule embed:
    input:
        store=lambda w: dataset_store(w.dataset),
        student=lambda w: student_checkpoint(w.model),
        weights=lambda w: model_weights(w.model) or [],
    output:
        embeddings=directory(f"{RESULTS}/embeddings/{{model}}/{{dataset}}.zarr"),
    params:
        pooling=lambda w: embed_pooling(w.dataset),
        batch_size=config["embeddings"]["batch_size"],
        num_workers=config["embeddings"]["num_workers"],
        precision=config["embeddings"]["precision"],
        seed=config["seed"],
        weights=lambda w: model_weights(w.model),
    log:
        "logs/embed/{model}/{dataset}.log",
    threads: threads_for("embed")
    resources:
        **resources_for("embed"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/embed.py"


rule export_embeddings:
    input:
        embeddings=f"{RESULTS}/embeddings/{{model}}/{{dataset}}.zarr",
    output:
        directory(f"{RESULTS}/exports/{{format}}/{{model}}/{{dataset}}"),
    wildcard_constraints:
        format="plismbench|h5",
    log:
        "logs/export_embeddings/{format}/{model}/{dataset}.log",
    conda:
        "../envs/torch.yaml"
    threads: threads_for("export_embeddings")
    resources:
        **resources_for("export_embeddings"),
    script:
        "../workflow_scripts/export_embeddings.py"


rule all_embeddings:
    input:
        expand(
            f"{RESULTS}/embeddings/{{model}}/{{dataset}}.zarr",
            model=config["embeddings"]["models"],
            dataset=embed_cohorts(),
        ),
        expand(
            f"{RESULTS}/exports/{{format}}/{{model}}/{{dataset}}",
            format=config["embeddings"]["exports"],
            model=config["embeddings"]["models"],
            dataset=embed_cohorts(),
        ),
