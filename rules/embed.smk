# Embedding extraction: every configured model × cohort → Zarr [N, D] (+ optional export formats).


def embed_cohorts():
    """Datasets every model embeds: the configured cohorts (or all) and the PLISM matched tiles.

    (HEST tasks, datasets `hest-{task}`, are embedded on demand by the models that are scored.)
    """
    return list(config["embeddings"]["cohorts"] or COHORTS) + (["plism"] if config["plism"]["enabled"] else [])


def dataset_store(dataset):
    """A dataset's tile store: a cohort's, the PLISM matched tiles (read as one flat store), a HEST task's,
    or a probe task's image files."""
    if dataset == "plism":
        return f"{RESULTS}/plism/tiles.zarr"
    if dataset.startswith("hest-"):
        return f"{RESULTS}/hest/{dataset.removeprefix('hest-')}.zarr"
    if dataset.startswith("probe-"):
        return f"{RESULTS}/probe/{dataset.removeprefix('probe-')}.zarr"
    return f"{RESULTS}/tilestore/{dataset}.zarr"


rule embed:
    input:
        store=lambda w: dataset_store(w.dataset),
        student=lambda w: (
            [f"{RESULTS}/students/{w.model.removeprefix('student-')}/student.safetensors"]
            if w.model.startswith("student-")
            else []
        ),
        weights=lambda w: model_weights(w.model) or [],
    output:
        embeddings=directory(f"{RESULTS}/embeddings/{{model}}/{{dataset}}.zarr"),
    params:
        pooling=config["embeddings"]["pooling"],
        batch_size=config["embeddings"]["batch_size"],
        num_workers=config["embeddings"]["num_workers"],
        precision=config["embeddings"]["precision"],
        seed=config["seed"],
        weights=lambda w: model_weights(w.model),
        results_dir=RESULTS,
    log:
        "logs/embed/{model}/{dataset}.log",
    threads: threads_for("embed")
    resources:
        **resources_for("embed"),
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
