"""Snakemake adapter: the demo slide-level task, bags of demo tiles decided by a dense-nuclei tile (rule slide_demo)."""

from histodistill.demo.slide_task import make_demo_slide_task_from_store
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_demo_slide_task_from_store(snakemake.input.store, snakemake.output[0], seed=snakemake.params.seed)
