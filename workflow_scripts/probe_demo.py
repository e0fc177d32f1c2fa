"""Snakemake adapter: the demo probe manifest, the demo HEST task's latent crops by class (rule probe_demo)."""

from histodistill.demo.tasks import make_latent_probe
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_latent_probe(snakemake.input.task, snakemake.input.store, snakemake.output[0])
