"""Snakemake adapter: learn the teacher's DINO/iBOT heads on its cached tokens (rule train_teacher_heads)."""

from pathlib import Path

from histodistill.distill.teacher_heads import HeadsConfig, train_teacher_heads
from histodistill.logs import log_to

log_to(snakemake.log[0])
train_teacher_heads(
    snakemake.input.cache,
    snakemake.output.heads,
    HeadsConfig(**snakemake.params.settings),  # unknown keys fail here, named
    teacher=snakemake.wildcards.teacher,
    log_dir=Path(snakemake.output.log).parent,
)
