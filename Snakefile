# histodistill: distill a pathology foundation model into a small student, and benchmark both.
# Targets: demo, all_tiles (tiling + packing), plism_tiles / all_plism (PLISM matched tiles), all_teacher (teacher cache),
# all_students (distillation), all_embeddings, all_benchmarks (scores + report).
import gc

# Snakemake has imported ~1,400 modules by now (~100,000 objects that live as long as the process): move
# them out of the cyclic GC's reach, so each full collection while the workflow is parsed and its DAG built
# scans only the objects made since (about 0.1 CPU s per full collection otherwise, issue 19).
gc.freeze()

from histodistill.config import validate_config


configfile: "config.yaml"


# Validate first against the schema shipped in the package (histodistill/schema.yaml): an unknown key or a
# wrong type stops the run before any job, naming the key.
validate_config(config)


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/tiling.smk"
include: "rules/plism.smk"
include: "rules/teacher.smk"
include: "rules/distill.smk"
include: "rules/embed.smk"
include: "rules/benchmarks.smk"
include: "rules/slide.smk"


rule all:
    default_target: True
    input:
        rules.all_tiles.input,
        rules.all_plism.input,
        rules.all_teacher.input,
        rules.all_students.input,
        rules.all_embeddings.input,
        rules.all_benchmarks.input,
