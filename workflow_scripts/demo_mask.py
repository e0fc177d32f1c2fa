"""Snakemake adapter: the mask slide of one demo slide (rule demo_mask)."""

from histodistill.demo.masks import make_demo_mask_slide
from histodistill.demo.slides import DemoSlideConfig, seed_for
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
spec = DemoSlideConfig(width_px=p.width_px, height_px=p.height_px, mpp=p.mpp)
make_demo_mask_slide(snakemake.output[0], seed_for(snakemake.wildcards.slide, p.seed), spec)
