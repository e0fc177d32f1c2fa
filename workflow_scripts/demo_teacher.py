"""Snakemake adapter: train the demo teacher on synthetic slides (rule demo_teacher)."""

from histodistill.demo.teacher import DemoTeacherConfig, train_demo_teacher
from histodistill.logs import log_to

log_to(snakemake.log[0])
p, out = snakemake.params, snakemake.output
train_demo_teacher(
    out.weights, p.model, DemoTeacherConfig(**p.settings), seed=p.seed, train_log=out.train_log, plot=out.plot
)
