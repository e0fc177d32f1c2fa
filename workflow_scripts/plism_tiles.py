"""Snakemake adapter: cut the reference grid from every registered PLISM slide (rule plism_tiles)."""

from histodistill.logs import log_to
from histodistill.matched_tiles import cut_registered

log_to(snakemake.log[0])
p = snakemake.params
cut_registered(
    p.manifest,
    p.settings["reference"],
    snakemake.input.grid,
    snakemake.input.transforms,
    snakemake.input.qc,
    snakemake.output.store,
    snakemake.output.table,
    snakemake.output.summary,
    chunk_tiles=p.chunk_tiles,
    zstd_level=p.compression_level,
    workers=snakemake.threads,
    params=p.settings,
)
