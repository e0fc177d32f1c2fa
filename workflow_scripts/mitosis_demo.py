"""Snakemake adapter: annotated mitosis demo slides in two domains (rule mitosis_demo)."""

from histodistill.demo.mitosis import make_mitosis_demo
from histodistill.demo.slides import seed_for
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_mitosis_demo(snakemake.output[0], seed=seed_for("mitosis", snakemake.params.seed))
