# Benchmark scoring: PLISM robustness, HEST gene-expression regression, patch-classification probes, EVA
# segmentation and slide-level tasks (ABMIL), mitosis, ScoreNet ROI classification, then the report. Each
# scorer reads embeddings made by the `embed` rule (datasets: plism, hest-{task}, probe-{task},
# segmentation-{task}, mitosis, cohorts); mitosis' LoRA and ScoreNet also read pixels.
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
        tissue_holdout=PLISM["tissue_holdout"],  # score only the held-out tissues (histodistill.holdout)
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

    # latent crops of fresh generator slides under random stainings (histodistill.demo.tasks), no cohort tile
    rule hest_demo:
        output:
            directory(hest_task_dir("{task}")),
        params:
            seed=config["seed"],
            n_slides=HEST["demo_slides"],
            crops_per_slide=HEST["demo_crops_per_slide"],
            width_px=HEST["demo_width_px"],
            height_px=HEST["demo_height_px"],
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

    # the latent crops of HEST demo task PROBE['demo'] (its packed store), labelled from their latents
    rule probe_demo:
        input:
            task=hest_task_dir(PROBE["demo"]),
            store=dataset_store(f"hest-{PROBE['demo']}"),
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


if SLIDE["tasks"]:
    ENABLED_BENCHMARKS.append("slide")

if config["demo"]["enabled"] and SLIDE["demo"]:

    rule slide_demo:
        input:
            store=f"{RESULTS}/tilestore/{SLIDE['demo']}.zarr",  # the cohort's tiles, labelled by nuclear density
        output:
            SLIDE_DEMO_TASK,
        params:
            seed=config["seed"],
        log:
            "logs/slide_demo.log",
        conda:
            "../envs/bench.yaml"
        threads: threads_for("slide_demo")
        resources:
            **resources_for("slide_demo"),
        script:
            "../workflow_scripts/slide_demo.py"


rule score_slide:
    input:
        manifests=[t["manifest"] for t in SLIDE_TASKS.values()],
        embeddings=lambda w: [embedding(w.model, t["dataset"]) for t in SLIDE_TASKS.values()],
    output:
        f"{RESULTS}/benchmarks/slide/{{model}}.parquet",
    params:
        tasks=SLIDE_TASKS,
        abmil=SLIDE["abmil"],
    log:
        "logs/score_slide/{model}.log",
    threads: threads_for("score_slide")
    resources:
        **resources_for("score_slide"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_slide.py"
if SEGMENTATION_TASKS:
    ENABLED_BENCHMARKS.append("segmentation")

if config["demo"]["enabled"] and DEMO_MASK_COHORTS:  # the segmentation demo's, mask-paired runs' (common.smk)

    rule demo_mask:
        output:
            f"{RESULTS}/masks/{{cohort}}/{{slide}}.tiff",
        wildcard_constraints:
            cohort="|".join(re.escape(c) for c in DEMO_MASK_COHORTS),
        params:
            seed=config["seed"],
            width_px=config["demo"]["width_px"],
            height_px=config["demo"]["height_px"],
            mpp=config["demo"]["mpp"],
        log:
            "logs/demo_mask/{cohort}/{slide}.log",
        threads: threads_for("demo_mask")
        resources:
            **resources_for("demo_mask"),
        conda:
            "../envs/wsi.yaml"
        script:
            "../workflow_scripts/demo_mask.py"


if config["demo"]["enabled"] and SEGMENTATION["demo"]:

    rule segmentation_demo:
        input:
            store=f"{RESULTS}/tilestore/{SEGMENTATION['demo']}.zarr",
            masks=[
                f"{RESULTS}/masks/{SEGMENTATION['demo']}/{s}.tiff"
                for s in SAMPLES.loc[SAMPLES["cohort"] == SEGMENTATION["demo"], "slide_id"]
            ],
        output:
            store=directory(f"{RESULTS}/segmentation/demo.zarr"),
            manifest=f"{RESULTS}/segmentation/demo.csv",
        params:
            masks_dir=lambda w, input: input.masks[0].rsplit("/", 2)[0],  # masks/{cohort}/{slide}.tiff → masks
            cohort=SEGMENTATION["demo"],
            tiles_per_slide=SEGMENTATION["demo_tiles_per_slide"],
        log:
            "logs/segmentation_demo.log",
        threads: threads_for("segmentation_demo")
        resources:
            **resources_for("segmentation_demo"),
        conda:
            "../envs/bench.yaml"
        script:
            "../workflow_scripts/segmentation_demo.py"


if SEGMENTATION["tasks"]:

    rule segmentation_store:
        output:
            store=directory(f"{RESULTS}/segmentation/{{task}}.zarr"),
            manifest=f"{RESULTS}/segmentation/{{task}}.csv",
        wildcard_constraints:
            task="|".join(SEGMENTATION["tasks"]),
        params:
            task=lambda w: SEGMENTATION["tasks"][w.task],
            tile_px=config["tiling"]["tile_px"],
        log:
            "logs/segmentation_store/{task}.log",
        threads: threads_for("segmentation_store")
        resources:
            **resources_for("segmentation_store"),
        conda:
            "../envs/bench.yaml"
        script:
            "../workflow_scripts/segmentation_store.py"


rule score_segmentation:
    input:
        stores=[f"{RESULTS}/segmentation/{t}.zarr" for t in SEGMENTATION_TASKS],
        manifests=[f"{RESULTS}/segmentation/{t}.csv" for t in SEGMENTATION_TASKS],
        # patch tokens, cached once per model and task (rule embed, pooling patch_tokens)
        embeddings=lambda w: [embedding(w.model, f"segmentation-{t}") for t in SEGMENTATION_TASKS],
    output:
        f"{RESULTS}/benchmarks/segmentation/{{model}}.parquet",
    params:
        tasks=SEGMENTATION_TASKS,
        settings=SEGMENTATION_SETTINGS,
    log:
        "logs/score_segmentation/{model}.log",
    threads: threads_for("score_segmentation")
    resources:
        **resources_for("score_segmentation"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_segmentation.py"


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


if SCORENET["enabled"]:
    ENABLED_BENCHMARKS.append("scorenet")

if SCORENET["enabled"] and SCORENET["demo"]:

    rule scorenet_demo:
        output:
            directory(SCORENET_DEMO_DIR),
        params:
            seed=config["seed"],
        log:
            "logs/scorenet_demo.log",
        conda:
            "../envs/bench.yaml"
        threads: threads_for("scorenet_demo")
        resources:
            **resources_for("scorenet_demo"),
        script:
            "../workflow_scripts/scorenet_demo.py"


rule score_scorenet:
    # ScoreNet ROI classification with {model} as the local encoder (histodistill.bench.scorenet)
    input:
        data=[SCORENET_DEMO_DIR] if SCORENET["demo"] else [SCORENET["manifest"]] if SCORENET["manifest"] else [],
        student=lambda w: student_checkpoint(w.model),
        weights=lambda w: model_weights(w.model) or [],
    output:
        f"{RESULTS}/benchmarks/scorenet/{{model}}.parquet",
    params:
        settings={k: v for k, v in SCORENET.items() if k not in ("enabled", "demo", "manifest")},
        manifest=f"{SCORENET_DEMO_DIR}/manifest.csv" if SCORENET["demo"] else SCORENET["manifest"],
        weights=lambda w: model_weights(w.model),
        seed=config["seed"],
    log:
        "logs/score_scorenet/{model}.log",
    threads: threads_for("score_scorenet")
    resources:
        **resources_for("score_scorenet"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_scorenet.py"


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
        paired_runs=paired_report_runs(),  # the seed-style tables of the paired runs (report.paired)
        plism_reference=PLISM["reference"],
        tissue_holdout=PLISM["tissue_holdout"],  # the paired section names and describes the held-out tissues
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
