"""Snakemake adapter: a synthetic HEST task on latent crops of fresh demo slides (rule hest_demo)."""

from histodistill.demo.tasks import make_latent_hest_task
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
make_latent_hest_task(
    snakemake.output[0],
    task=snakemake.wildcards.task,
    seed=p.seed,
    n_slides=p.n_slides,
    crops_per_slide=p.crops_per_slide,
    width_px=p.width_px,
    height_px=p.height_px,
)
