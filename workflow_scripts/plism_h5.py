"""Snakemake adapter: read the public pre-registered PLISM tiles (rule plism_tiles, source h5)."""

from histodistill.logs import log_to
from histodistill.matched_tiles import ingest_h5

log_to(snakemake.log[0])
p = snakemake.params
ingest_h5(
    p.manifest,
    p.settings["reference"],
    p.h5_dir,
    snakemake.output.store,
    snakemake.output.table,
    chunk_tiles=p.chunk_tiles,
    zstd_level=p.compression_level,
    params=p.settings,
)
