"""Snakemake adapter: SLPD region pretraining, one encoder per ablation variant (rule pretrain_regions)."""

from histodistill.logs import log_to
from histodistill.slide.pretrain import pretrain_variants

log_to(snakemake.log[0])
pretrain_variants(
    snakemake.input.regions,
    dict(zip(snakemake.params.variants, snakemake.output, strict=True)),
    snakemake.params.work_dir,
    snakemake.params.settings,
    threads=snakemake.threads,
    nproc_per_node=snakemake.params.nproc_per_node,
    log_path=snakemake.log[0],
)
