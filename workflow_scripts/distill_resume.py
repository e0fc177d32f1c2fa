"""Snakemake adapter: a run's empty resume directory (rule distill_resume), where distill checkpoints."""

from histodistill.distill.launch import new_resume_dir
from histodistill.logs import log_to

log_to(snakemake.log[0])
new_resume_dir(snakemake.output.resume, snakemake.params.settings)
