# Benchmark scoring: PLISM robustness, HEST gene-expression regression, patch-classification probes, then
# the report. Each scorer reads embeddings made by the `embed` rule (datasets: plism, hest-{task}, cohorts).
BENCH = config["benchmarks"]
HEST = BENCH["hest"]
PROBE = BENCH["probe"]


def bench_models():
    return BENCH["models"] or config["embeddings"]["models"]


def hest_task_dir(task):
    return f"{HEST['tasks_dir']}/{task}"


def embedding(model, dataset):
    return f"{RESULTS}/embeddings/{model}/{dataset}.zarr"


rule score_plism:
    input:
        embeddings=lambda w: embedding(w.model, "plism"),
        tiles=f"{RESULTS}/plism/tiles.parquet",
    output:
        f"{RESULTS}/benchmarks/plism/{{model}}.parquet",
    params:
        top_k=BENCH["plism"]["top_k"],
        dtype=BENCH["plism"]["dtype"],
        tiles_subset=BENCH["plism"]["tiles_subset"],
        block_size=BENCH["plism"]["block_size"],
    log:
        "logs/score_plism/{model}.log",
    threads: threads_for("score_plism")
    resources:
        **resources_for("score_plism"),
    script:
        "../workflow_scripts/score_plism.py"


if config["demo"]["enabled"] and HEST["demo"]:

    rule hest_demo:
        input:
            store=f"{RESULTS}/tilestore/{HEST['demo']}.zarr",
        output:
            directory(hest_task_dir("{task}")),
        params:
            seed=config["seed"],
        log:
            "logs/hest_demo/{task}.log",
        script:
            "../workflow_scripts/hest_demo.py"


rule hest_store:
    input:
        task=lambda w: hest_task_dir(w.task),
    output:
        directory(f"{RESULTS}/hest/{{task}}.zarr"),
    log:
        "logs/hest_store/{task}.log",
    script:
        "../workflow_scripts/hest_store.py"


rule score_hest:
    input:
        tasks=[hest_task_dir(t) for t in HEST["tasks"]],
        embeddings=lambda w: [embedding(w.model, f"hest-{t}") for t in HEST["tasks"]],
    output:
        f"{RESULTS}/benchmarks/hest/{{model}}.parquet",
    params:
        tasks=HEST["tasks"],
        latent_dim=HEST["latent_dim"],
        seed=HEST["seed"],
    log:
        "logs/score_hest/{model}.log",
    threads: threads_for("score_hest")
    resources:
        **resources_for("score_hest"),
    script:
        "../workflow_scripts/score_hest.py"


if config["demo"]["enabled"] and PROBE["demo"]:

    rule probe_demo:
        input:
            store=f"{RESULTS}/tilestore/{PROBE['demo']}.zarr",
        output:
            f"{RESULTS}/demo/probe/{PROBE['demo']}_tissue.csv",
        log:
            "logs/probe_demo.log",
        script:
            "../workflow_scripts/probe_demo.py"


def probe_task(name):
    """A probe task's dataset and row manifest: a cohort's tiles, or image files packed by `probe_store`."""
    task = PROBE["tasks"][name]
    if task.get("images"):
        return {"dataset": f"probe-{name}", "manifest": f"{RESULTS}/probe/{name}.csv", "level": task["level"]}
    if not (task.get("dataset") and task.get("manifest")):
        raise ValueError(f"benchmarks.probe.tasks.{name}: give `images`, or `dataset` and `manifest`")
    return {"dataset": task["dataset"], "manifest": task["manifest"], "level": task["level"]}


PROBE_TASKS = {name: probe_task(name) for name in PROBE["tasks"]}


rule probe_store:
    input:
        images=lambda w: PROBE["tasks"][w.task]["images"],
    output:
        store=directory(f"{RESULTS}/probe/{{task}}.zarr"),
        manifest=f"{RESULTS}/probe/{{task}}.csv",
    params:
        tile_px=config["tiling"]["tile_px"],
    log:
        "logs/probe_store/{task}.log",
    script:
        "../workflow_scripts/probe_store.py"


rule score_probe:
    input:
        manifests=[t["manifest"] for t in PROBE_TASKS.values()],
        embeddings=lambda w: [embedding(w.model, t["dataset"]) for t in PROBE_TASKS.values()],
    output:
        f"{RESULTS}/benchmarks/probe/{{model}}.parquet",
    params:
        tasks=PROBE_TASKS,
        methods=PROBE["methods"],
        linear=PROBE["linear"],
        knn_ks=PROBE["knn_ks"],
        seed=config["seed"],
    log:
        "logs/score_probe/{model}.log",
    threads: threads_for("score_probe")
    resources:
        **resources_for("score_probe"),
    script:
        "../workflow_scripts/score_probe.py"


MITOSIS = BENCH["mitosis"]
MITOSIS_DEMO_DIR = f"{RESULTS}/demo/mitosis"


def mitosis_inputs():
    """The annotated slides: the demo set's directory, or the user's sheet, annotations and slides."""
    if MITOSIS["demo"]:
        return [MITOSIS_DEMO_DIR]
    sheet = read_sample_sheet(MITOSIS["samples"])
    return [MITOSIS["samples"], MITOSIS["annotations"], *sheet["path"]]


if MITOSIS["enabled"] and MITOSIS["demo"]:

    rule mitosis_demo:
        output:
            directory(MITOSIS_DEMO_DIR),
        params:
            seed=config["seed"],
        log:
            "logs/mitosis_demo.log",
        script:
            "../workflow_scripts/mitosis_demo.py"


rule score_mitosis:
    input:
        data=mitosis_inputs() if MITOSIS["enabled"] else [],
        student=lambda w: (
            [f"{RESULTS}/students/{w.model.removeprefix('student-')}/student.safetensors"]
            if w.model.startswith("student-")
            else []
        ),
        weights=lambda w: model_weights(w.model) or [],
    output:
        f"{RESULTS}/benchmarks/mitosis/{{model}}.parquet",
    params:
        settings={k: v for k, v in MITOSIS.items() if k != "enabled"},
        samples=f"{MITOSIS_DEMO_DIR}/samples.tsv" if MITOSIS["demo"] else MITOSIS["samples"],
        annotations=f"{MITOSIS_DEMO_DIR}/annotations.csv" if MITOSIS["demo"] else MITOSIS["annotations"],
        weights=lambda w: model_weights(w.model),
        seed=config["seed"],
        results_dir=RESULTS,
    log:
        "logs/score_mitosis/{model}.log",
    threads: threads_for("score_mitosis")
    resources:
        **resources_for("score_mitosis"),
    script:
        "../workflow_scripts/score_mitosis.py"


def enabled_benchmarks():
    out = []
    if BENCH["plism"]["enabled"] and config["plism"]["enabled"]:
        out.append("plism")
    if HEST["tasks"]:
        out.append("hest")
    if PROBE["tasks"]:
        out.append("probe")
    if MITOSIS["enabled"]:
        out.append("mitosis")
    return out


rule report:
    input:
        scores=[f"{RESULTS}/benchmarks/{b}/{m}.parquet" for b in enabled_benchmarks() for m in bench_models()],
        # throughput is measured by the embedding runs on the first embedded dataset (not all of a big cohort)
        embeddings=[embedding(m, (config["embeddings"]["cohorts"] or COHORTS)[0]) for m in bench_models()],
    output:
        html=report(f"{RESULTS}/report/index.html", category="Benchmarks"),
        leaderboard=f"{RESULTS}/report/leaderboard.parquet",
    params:
        benchmarks=enabled_benchmarks(),
        models=bench_models(),
        students={name: run.get("student") for name, run in config["distill"]["runs"].items()},
        config=config,
    log:
        "logs/report.log",
    threads: threads_for("report")
    resources:
        **resources_for("report"),
    script:
        "../workflow_scripts/report.py"


rule all_benchmarks:
    input:
        f"{RESULTS}/report/index.html",
        f"{RESULTS}/report/leaderboard.parquet",
