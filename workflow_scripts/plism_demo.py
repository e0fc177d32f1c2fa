"""Snakemake adapter: make the PLISM-like demo set (rule plism_demo)."""

from pathlib import Path

from histodistill.demo.plism import PlismDemoConfig, make_plism_demo
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
spec = PlismDemoConfig(p.width_px, p.height_px, scanners=tuple(p.scanners), stainings=tuple(p.stainings))
make_plism_demo(Path(snakemake.output.truth).parent, p.seed, spec)
