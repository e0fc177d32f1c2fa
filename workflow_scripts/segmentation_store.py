"""Snakemake adapter: an EVA segmentation dataset in its published layout → a segmentation store
(rule segmentation_store)."""

from histodistill.bench.segmentation import pack_eva_task
from histodistill.logs import log_to

log_to(snakemake.log[0])
pack_eva_task(
    snakemake.params.task, snakemake.output.store, snakemake.output.manifest, tile_px=snakemake.params.tile_px
)
