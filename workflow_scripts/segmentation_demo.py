"""Snakemake adapter: the demo's segmentation task from its tiles and mask slides (rule segmentation_demo)."""

from histodistill.bench.segmentation import make_demo_segmentation
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_demo_segmentation(
    snakemake.input.store,
    snakemake.params.masks_dir,
    snakemake.output.store,
    snakemake.output.manifest,
    cohort=snakemake.params.cohort,
    tiles_per_slide=snakemake.params.tiles_per_slide,
)
