"""Snakemake adapter: write an embedding store in another tool's format (rule export_embeddings)."""

from histodistill.export import export_h5, export_plismbench
from histodistill.logs import log_to

log_to(snakemake.log[0])
exporter = {"plismbench": export_plismbench, "h5": export_h5}[snakemake.wildcards.format]
exporter(snakemake.input.embeddings, snakemake.output[0])
