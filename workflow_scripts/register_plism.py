"""Snakemake adapter: register one PLISM slide to the reference (rule register_plism)."""

from histodistill.logs import log_to
from histodistill.registration import RegistrationConfig, register_to_grid

log_to(snakemake.log[0])
p = snakemake.params
register_to_grid(
    snakemake.input.fixed,
    snakemake.input.moving,
    snakemake.input.grid,
    snakemake.output.transform,
    snakemake.output.qc,
    snakemake.output.png,
    RegistrationConfig(**p.registration),
    names=(p.reference, snakemake.wildcards.plism_slide),
    slide_mpps=tuple(p.slide_mpps),
    on_failure=p.on_failure,
)
