"""Snakemake adapter: fill one teacher cache shard (rule cache_teacher_shard)."""

from histodistill.augment import AugmentConfig
from histodistill.logs import log_to
from histodistill.teacher_cache import cache_teacher

log_to(snakemake.log[0])
p, w = snakemake.params, snakemake.wildcards
cache_teacher(
    w.teacher,
    snakemake.input.store,
    snakemake.output.shard,
    views=p.views,
    patch_tokens=p.patch_tokens,
    shard=int(w.shard),
    num_shards=int(snakemake.output.shard.rsplit("-of-", 1)[1].removesuffix(".zarr")),
    weights=p.weights,
    batch_size=p.batch_size,
    num_workers=min(p.num_workers, max(snakemake.threads - 1, 0)),
    precision=p.precision,
    seed=p.seed,
    augment=AugmentConfig(hed_jitter=p.hed_jitter),
)
