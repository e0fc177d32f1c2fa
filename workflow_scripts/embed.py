"""Snakemake adapter: embed one dataset with one model (rule embed)."""

from histodistill.embed import extract_embeddings
from histodistill.logs import log_to
from histodistill.models.ref import ModelRef

log_to(snakemake.log[0])
p = snakemake.params
student = snakemake.input.student  # [the checkpoint] for a student-<run> wildcard, else []
extract_embeddings(
    ModelRef.parse(snakemake.wildcards.model).id,
    snakemake.input.store,
    snakemake.output.embeddings,
    pooling=p.pooling,
    weights=student[0] if student else p.weights,
    batch_size=p.batch_size,
    num_workers=min(p.num_workers, max(snakemake.threads - 1, 0)),
    precision=p.precision,
    seed=p.seed,
)
