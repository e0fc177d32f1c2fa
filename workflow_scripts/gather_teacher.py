"""Snakemake adapter: join teacher cache shards under one manifest (rule cache_teacher)."""

from histodistill.logs import log_to
from histodistill.teacher_cache import gather_teacher_cache

log_to(snakemake.log[0])
gather_teacher_cache(list(snakemake.input.shards), snakemake.output.cache)
