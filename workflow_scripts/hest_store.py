"""Snakemake adapter: one HEST task's patches → a tile store for `embed` (rule hest_store)."""

from histodistill.bench.datasets import pack_hest_task
from histodistill.logs import log_to

log_to(snakemake.log[0])
pack_hest_task(snakemake.input.task, snakemake.output[0])
