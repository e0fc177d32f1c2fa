"""Snakemake adapter: ScoreNet ROI classification with one model as the local encoder (rule score_scorenet)."""

from histodistill.bench.scorenet import ScoreNetConfig, run
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
run(
    snakemake.wildcards.model,
    p.manifest,
    snakemake.output[0],
    ScoreNetConfig.from_config(p.settings),
    weights=next(iter(snakemake.input.student), p.weights),  # a student's checkpoint, else the configured
    seed=p.seed,
)
