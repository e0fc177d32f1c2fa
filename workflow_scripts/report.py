"""Snakemake adapter: the HTML report and the leaderboard (rule report)."""

from pathlib import Path

from histodistill import report
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
report.run(
    snakemake.input.scores,
    snakemake.input.embeddings,
    Path(snakemake.output.html).parent,
    benchmarks=p.benchmarks,
    models=p.models,
    students=p.students,
    teacher=p.teacher,
    config=p.config,
    n_boot=p.n_boot,
    skipped_slides=p.skipped_slides,
    paired_runs=p.paired_runs,
    plism_reference=p.plism_reference,
    tissue_holdout=p.tissue_holdout,
)
