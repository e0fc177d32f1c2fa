"""Snakemake adapter: the ScoreNet demo's synthetic ROIs and their manifest (rule scorenet_demo)."""

from histodistill.bench.scorenet import make_demo_rois
from histodistill.demo.slides import seed_for
from histodistill.logs import log_to

log_to(snakemake.log[0])
make_demo_rois(snakemake.output[0], seed=seed_for("scorenet", snakemake.params.seed))
