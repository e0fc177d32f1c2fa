"""Snakemake adapter: EVA's slide-level tasks of one model, ABMIL on each slide's tiles (rule score_slide)."""

from histodistill.bench import slide
from histodistill.logs import log_to

log_to(snakemake.log[0])
slide.run(
    snakemake.params.tasks,
    snakemake.input.embeddings,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    abmil=snakemake.params.abmil,
)
