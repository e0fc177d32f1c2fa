"""Snakemake adapter: classification probes of one model on every task (rule score_probe).

Tile-level tasks: linear probe, k-NN and logistic regression; slide-level tasks: ABMIL on each slide's tiles.
"""

from histodistill.bench import probe
from histodistill.logs import log_to

log_to(snakemake.log[0])
probe.run(
    snakemake.params.tasks,
    snakemake.input.embeddings,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    methods=snakemake.params.methods,
    linear=snakemake.params.linear,
    knn_ks=snakemake.params.knn_ks,
)
