"""Snakemake adapter: mitotic-figure classification of one model, linear probe and LoRA (rule score_mitosis)."""

from histodistill.bench.mitosis import MitosisConfig, run
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
run(
    snakemake.wildcards.model,
    p.samples,
    p.annotations,
    snakemake.output[0],
    MitosisConfig.from_config(p.settings),
    embeddings=next(iter(snakemake.input.embeddings), None),  # none without the linear probe
    weights=next(iter(snakemake.input.student), p.weights),  # a student's checkpoint, else the configured
    seed=p.seed,
)
