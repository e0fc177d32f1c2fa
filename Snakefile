# histodistill: distill a pathology foundation model into a small student, and benchmark both.
# Targets: demo, all_tiles (tiling + packing), plism_tiles / all_plism (PLISM matched tiles), all_teacher (teacher cache),
# all_students (distillation), all_embeddings, all_benchmarks (scores + report).
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
