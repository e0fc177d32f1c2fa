"""Snakemake adapter: the tile grid of the PLISM reference slide (rule plism_grid)."""

from histodistill.logs import log_to
from histodistill.tiling import TilingConfig, tile_slide

log_to(snakemake.log[0])
tile_slide(
    snakemake.input.slide,
    snakemake.config["plism"]["reference"],
    snakemake.output.table,
    TilingConfig(**snakemake.params.tiling),
    slide_mpp=snakemake.params.slide_mpp,
    qc=snakemake.output.qc,
    qc_max_px=snakemake.params.qc_max_px,
)
