"""Snakemake adapter: make the PLISM-like demo set (rule plism_demo)."""

from pathlib import Path

from histodistill.logs import log_to
from histodistill.synthetic import PlismDemoSpec, make_plism_demo

log_to(snakemake.log[0])
p = snakemake.params
spec = PlismDemoSpec(p.width_px, p.height_px, scanners=tuple(p.scanners), stainings=tuple(p.stainings))
make_plism_demo(Path(snakemake.output.truth).parent, p.seed, spec)
