"""Snakemake adapter: every mitosis annotation's centred patch → a tile store for `embed` (rule mitosis_store)."""

from histodistill.bench.mitosis import pack_patch_store
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
pack_patch_store(p.samples, p.annotations, snakemake.output[0], patch_px=p.patch_px, mpp=p.mpp)
