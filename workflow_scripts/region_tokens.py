"""Snakemake adapter: one model's region store of a cohort, from its embeddings and tile tables (rule region_tokens)."""

from histodistill.logs import log_to
from histodistill.slide.regions import build_region_store

log_to(snakemake.log[0])
build_region_store(
    snakemake.input.embeddings, snakemake.input.tables, snakemake.output[0], **snakemake.params.regions
)
