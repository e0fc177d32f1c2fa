"""Snakemake adapter: tile one slide (rule tile_slide)."""

from histodistill.logs import log_to
from histodistill.tiling import TilingConfig, tile_slide

log_to(snakemake.log[0])
tile_slide(
    snakemake.input.slide,
    snakemake.wildcards.slide,
    snakemake.output.table,
    TilingConfig(**snakemake.params.tiling),
    slide_mpp=snakemake.params.slide_mpp,
    qc=snakemake.output.qc,
    qc_max_px=snakemake.params.qc_max_px,
)
