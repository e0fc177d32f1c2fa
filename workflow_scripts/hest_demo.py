"""Snakemake adapter: a synthetic HEST task from the demo cohort's tiles (rule hest_demo)."""

from histodistill.demo.tasks import make_demo_hest_from_store
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_demo_hest_from_store(
    snakemake.input.store, snakemake.output[0], task=snakemake.wildcards.task, seed=snakemake.params.seed
)
