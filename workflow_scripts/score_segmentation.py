"""Snakemake adapter: EVA segmentation of one model over every task (rule score_segmentation)."""

from histodistill.bench import segmentation
from histodistill.logs import log_to

log_to(snakemake.log[0])
segmentation.run(
    snakemake.params.tasks,
    snakemake.input.stores,
    snakemake.input.manifests,
    snakemake.input.embeddings,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    settings=snakemake.params.settings,
)
