"""Snakemake adapter: a probe task's image files → a tile store and its row manifest (rule probe_store)."""

from histodistill.bench.datasets import pack_image_dataset
from histodistill.logs import log_to

log_to(snakemake.log[0])
pack_image_dataset(
    snakemake.input.images,
    snakemake.output.store,
    snakemake.output.manifest,
    tile_px=snakemake.params.tile_px,
)
