"""Snakemake adapter: the slide-level SLPD ablation of one model (rule score_slpd)."""

from histodistill.bench import slpd
from histodistill.logs import log_to

log_to(snakemake.log[0])
slpd.run(
    snakemake.input.regions,
    dict(zip(snakemake.params.variants, snakemake.input.encoders, strict=True)),
    snakemake.input.labels,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    task=snakemake.params.task,
    config={**snakemake.params.settings, "threads": snakemake.threads},
)
