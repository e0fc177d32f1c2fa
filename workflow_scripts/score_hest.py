"""Snakemake adapter: HEST gene-expression regression of one model over every task (rule score_hest)."""

from histodistill.bench import hest
from histodistill.logs import log_to

log_to(snakemake.log[0])
hest.run(
    snakemake.input.tasks,
    snakemake.input.embeddings,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    latent_dim=snakemake.params.latent_dim,
    seed=snakemake.params.seed,
)
