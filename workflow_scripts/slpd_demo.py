"""Snakemake adapter: the SLPD demo's synthetic slides from one model's demo tile embeddings (rule slpd_demo)."""

from histodistill.logs import log_to
from histodistill.slide.demo import write_demo

log_to(snakemake.log[0])
write_demo(
    snakemake.input.embeddings, snakemake.output.store, snakemake.output.labels, **snakemake.params.demo
)
