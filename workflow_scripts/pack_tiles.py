"""Snakemake adapter: pack a cohort's tiles into its tile store (rule pack_tiles)."""

from histodistill.logs import log_to
from histodistill.tilestore import pack_tiles

log_to(snakemake.log[0])
pack_tiles(
    list(snakemake.input.tables),
    snakemake.output.store,
    chunk_tiles=snakemake.params.chunk_tiles,
    zstd_level=snakemake.params.compression_level,
    workers=snakemake.threads,
)
