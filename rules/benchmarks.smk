# Benchmark scoring: PLISM robustness, HEST gene-expression regression, patch-classification probes, mitosis,
# then the report. Each scorer reads embeddings made by the `embed` rule (datasets: plism, hest-{task},
# probe-{task}, mitosis, cohorts); mitosis' LoRA also reads the slides.
if BENCH["plism"]["enabled"] and config["plism"]["enabled"]:
    ENABLED_BENCHMARKS.append("plism")


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
        unmatched=BENCH["plism"]["unmatched"],
        compat=BENCH["plism"]["compat"],
        robustness_tiles=BENCH["plism"]["robustness_tiles"],
        robustness_k=BENCH["plism"]["robustness_k"],
    log:
        "logs/score_plism/{model}.log",
    threads: threads_for("score_plism")
    resources:
        **resources_for("score_plism"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_plism.py"


if HEST["tasks"]:
    ENABLED_BENCHMARKS.append("hest")

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
        conda:
            "../envs/bench.yaml"
        threads: threads_for("hest_demo")
        resources:
            **resources_for("hest_demo"),
        script:
            "../workflow_scripts/hest_demo.py"


rule hest_store:
    input:
        task=lambda w: hest_task_dir(w.task),
    output:
        directory(f"{RESULTS}/hest/{{task}}.zarr"),
    log:
        "logs/hest_store/{task}.log",
    conda:
        "../envs/bench.yaml"
    threads: threads_for("hest_store")
    resources:
        **resources_for("hest_store"),
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
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_hest.py"


if PROBE["tasks"]:
    ENABLED_BENCHMARKS.append("probe")

if config["demo"]["enabled"] and PROBE["demo"]:

    rule probe_demo:
        input:
            store=f"{RESULTS}/tilestore/{PROBE['demo']}.zarr",
        output:
            f"{RESULTS}/demo/probe/{PROBE['demo']}_tissue.csv",
        log:
            "logs/probe_demo.log",
        conda:
            "../envs/bench.yaml"
        threads: threads_for("probe_demo")
        resources:
            **resources_for("probe_demo"),
        script:
            "../workflow_scripts/probe_demo.py"


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
    conda:
        "../envs/bench.yaml"
    threads: threads_for("probe_store")
    resources:
        **resources_for("probe_store"),
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
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_probe.py"


if MITOSIS["enabled"]:
    ENABLED_BENCHMARKS.append("mitosis")

if MITOSIS["enabled"] and MITOSIS["demo"]:

    rule mitosis_demo:
        output:
            directory(MITOSIS_DEMO_DIR),
        params:
            seed=config["seed"],
        log:
            "logs/mitosis_demo.log",
        conda:
            "../envs/wsi.yaml"
        threads: threads_for("mitosis_demo")
        resources:
            **resources_for("mitosis_demo"),
        script:
            "../workflow_scripts/mitosis_demo.py"


MITOSIS_SAMPLES = f"{MITOSIS_DEMO_DIR}/samples.tsv" if MITOSIS["demo"] else MITOSIS["samples"]
MITOSIS_ANNOTATIONS = f"{MITOSIS_DEMO_DIR}/annotations.csv" if MITOSIS["demo"] else MITOSIS["annotations"]


rule mitosis_store:
    input:
        data=mitosis_inputs() if MITOSIS["enabled"] else [],
    output:
        directory(f"{RESULTS}/mitosis/patches.zarr"),
    params:
        samples=MITOSIS_SAMPLES,
        annotations=MITOSIS_ANNOTATIONS,
        patch_px=MITOSIS["patch_px"],
        mpp=MITOSIS["mpp"],
    log:
        "logs/mitosis_store.log",
    threads: threads_for("mitosis_store")
    resources:
        **resources_for("mitosis_store"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/mitosis_store.py"


rule score_mitosis:
    input:
        data=mitosis_inputs() if MITOSIS["enabled"] else [],
        # the linear probe's features: the patch store embedded by `embed` (dataset `mitosis`)
        embeddings=lambda w: [embedding(w.model, "mitosis")] if "linear" in MITOSIS["methods"] else [],
        student=lambda w: student_checkpoint(w.model),
        weights=lambda w: model_weights(w.model) or [],
    output:
        f"{RESULTS}/benchmarks/mitosis/{{model}}.parquet",
    params:
        settings={k: v for k, v in MITOSIS.items() if k != "enabled"},
        samples=MITOSIS_SAMPLES,
        annotations=MITOSIS_ANNOTATIONS,
        weights=lambda w: model_weights(w.model),
        seed=config["seed"],
    log:
        "logs/score_mitosis/{model}.log",
    threads: threads_for("score_mitosis")
    resources:
        **resources_for("score_mitosis"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_mitosis.py"


rule report:
    input:
        scores=lambda w: [f"{RESULTS}/benchmarks/{b}/{m}.parquet" for b in ENABLED_BENCHMARKS for m in benchmark_models(b)],
        # throughput is measured by the embedding runs on the first embedded dataset (not all of a big cohort)
        embeddings=[embedding(m, (config["embeddings"]["cohorts"] or COHORTS)[0]) for m in bench_models()],
    output:
        html=report(f"{RESULTS}/report/index.html", category="Benchmarks"),
        leaderboard=f"{RESULTS}/report/leaderboard.parquet",
        distillation=f"{RESULTS}/report/distillation.parquet",  # recovery of the teacher per student
    params:
        benchmarks=lambda w: ENABLED_BENCHMARKS,
        models=bench_models(),
        students={name: run.get("student") for name, run in config["distill"]["runs"].items()},
        teacher=config["teacher"]["model"],  # with students and their random-init twin: recovery
        n_boot=BENCH["plism"]["n_boot"],
        skipped_slides=SKIPPED_SLIDES,
        config=report_config(),
    log:
        "logs/report.log",
    threads: threads_for("report")
    resources:
        **resources_for("report"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/report.py"


rule all_benchmarks:
    input:
        f"{RESULTS}/report/index.html",
        f"{RESULTS}/report/leaderboard.parquet",
