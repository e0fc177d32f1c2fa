"""Snakemake adapter: pack a cohort's tiles into its tile store (rule pack_tiles)."""

from histodistill.logs import log_to
from histodistill.tilestore import pack_tiles

log_to(snakemake.log[0])  # noqa: F821 (snakemake injects this object)
pack_tiles(
    list(snakemake.input.tables),  # noqa: F821
    snakemake.output.store,  # noqa: F821
    chunk_tiles=snakemake.params.chunk_tiles,  # noqa: F821
    zstd_level=snakemake.params.compression_level,  # noqa: F821
)
