# Slide-level pretraining (SLPD) after distillation: regions of tile embeddings, one region encoder per
# ablation variant, and the slide-level benchmark `slpd` (scored for slpd.models only).
if SLPD["enabled"]:
    ENABLED_BENCHMARKS.append("slpd")

if SLPD["enabled"] and SLPD["demo"]["enabled"]:

    rule slpd_demo:
        input:
            embeddings=lambda w: embedding(w.model, slpd_cohort()),
        output:
            store=directory(slpd_regions("{model}")),
            labels=f"{RESULTS}/slide/{{model}}/labels.csv",
        params:
            demo={**{k: v for k, v in SLPD["demo"].items() if k != "enabled"}, "seed": config["seed"]},
        log:
            "logs/slpd_demo/{model}.log",
        threads: threads_for("slpd_demo")
        resources:
            **resources_for("slpd_demo"),
        conda:
            "../envs/bench.yaml"
        script:
            "../workflow_scripts/slpd_demo.py"

else:

    rule region_tokens:
        input:
            embeddings=lambda w: embedding(w.model, slpd_cohort()),
            tables=lambda w: expand(f"{RESULTS}/tiles/{slpd_cohort()}/{{slide}}.parquet", slide=slides_of(slpd_cohort())),
        output:
            directory(slpd_regions("{model}")),
        params:
            regions=SLPD["regions"],
        log:
            "logs/region_tokens/{model}.log",
        threads: threads_for("region_tokens")
        resources:
            **resources_for("region_tokens"),
        conda:
            "../envs/bench.yaml"
        script:
            "../workflow_scripts/region_tokens.py"


rule pretrain_regions:
    input:
        regions=slpd_regions("{model}"),
    output:
        [f"{RESULTS}/slide/{{model}}/encoders/{v}.pt" for v in SLPD["variants"]],
    params:
        variants=SLPD["variants"],
        settings=SLPD["train"],
        work_dir=lambda w: f"{RESULTS}/slide/{w.model}/work",
        nproc_per_node=SLPD["nproc_per_node"],
    log:
        "logs/pretrain_regions/{model}.log",
    threads: threads_for("pretrain_regions")
    resources:
        **resources_for("pretrain_regions"),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/pretrain_regions.py"


rule score_slpd:
    input:
        regions=slpd_regions("{model}"),
        encoders=[f"{RESULTS}/slide/{{model}}/encoders/{v}.pt" for v in SLPD["variants"]],
        labels=lambda w: slpd_labels(w.model),
    output:
        f"{RESULTS}/benchmarks/slpd/{{model}}.parquet",
    params:
        variants=SLPD["variants"],
        settings=SLPD["eval"],
        task=lambda w: "demo-arrangement" if SLPD["demo"]["enabled"] else slpd_cohort(),
    log:
        "logs/score_slpd/{model}.log",
    threads: threads_for("score_slpd")
    resources:
        **resources_for("score_slpd"),
    conda:
        "../envs/bench.yaml"
    script:
        "../workflow_scripts/score_slpd.py"
