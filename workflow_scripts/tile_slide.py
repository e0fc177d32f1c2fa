"""Snakemake adapter: tile one slide (rule tile_slide)."""

from histodistill.logs import log_to
from histodistill.tiling import TilingParams, tile_slide

log_to(snakemake.log[0])  # noqa: F821 (snakemake injects this object)
tile_slide(
    snakemake.input.slide,  # noqa: F821
    snakemake.wildcards.slide,  # noqa: F821
    snakemake.output.table,  # noqa: F821
    TilingParams(**snakemake.params.tiling),  # noqa: F821
    slide_mpp=snakemake.params.slide_mpp,  # noqa: F821
    qc=snakemake.output.qc,  # noqa: F821
    qc_max_px=snakemake.params.qc_max_px,  # noqa: F821
)
