"""Snakemake adapter: PLISM robustness of one model (rule score_plism)."""

from histodistill.bench import plism
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
plism.run(
    snakemake.input.embeddings,
    snakemake.input.tiles,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    tiles_subset=p.tiles_subset,
    top_k=p.top_k,
    dtype=p.dtype,
    block_size=p.block_size,
    unmatched=p.unmatched,
    compat=p.compat,
    robustness_tiles=p.robustness_tiles,
    robustness_k=p.robustness_k,
    tissue_holdout=p.tissue_holdout,
    workers=snakemake.threads,
)
