"""Snakemake adapter: render one demo slide (rule demo_slide)."""

from histodistill.demo.slides import DemoSlideConfig, draw_site, make_demo_slide, seed_for
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
spec = DemoSlideConfig(width_px=p.width_px, height_px=p.height_px, mpp=p.mpp)
seed = seed_for(snakemake.wildcards.slide, p.seed)
make_demo_slide(snakemake.output[0], seed, spec, draw_site(seed, p.mpp) if p.multisite else None)
