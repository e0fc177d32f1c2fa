"""Snakemake adapter: embed one dataset with one model (rule embed)."""

from histodistill.embed import extract_embeddings
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
extract_embeddings(
    snakemake.wildcards.model.replace("student-", "student:", 1),  # paths hold no ":"
    snakemake.input.store,
    snakemake.output.embeddings,
    pooling=p.pooling,
    weights=p.weights,
    batch_size=p.batch_size,
    num_workers=min(p.num_workers, max(snakemake.threads - 1, 0)),
    precision=p.precision,
    seed=p.seed,
    results_dir=p.results_dir,
)
