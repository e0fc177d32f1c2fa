"""Snakemake adapter: the demo patch-classification manifest (rule probe_demo)."""

from histodistill.demo.tasks import make_demo_probe
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_demo_probe(snakemake.input.store, snakemake.output[0])
