"""Snakemake adapter: linear probe, k-NN and logistic regression of one model on every task (rule score_probe)."""

import pandas as pd

from histodistill.bench import write_scores
from histodistill.bench.probe import KnnConfig, LinearProbeConfig, load_manifest, run_probe
from histodistill.embed import EmbeddingStore
from histodistill.logs import log_to
from histodistill.provenance import provenance

log_to(snakemake.log[0])
p = snakemake.params
linear = LinearProbeConfig(**{**p.linear, "seeds": tuple(p.linear["seeds"])})
knn = KnnConfig(ks=tuple(p.knn_ks))
frames = []
for (name, task), emb_path in zip(p.tasks.items(), snakemake.input.embeddings, strict=True):
    embeddings = EmbeddingStore(emb_path).embeddings
    manifest = load_manifest(task["manifest"], n_tiles=len(embeddings))
    x = manifest.select(embeddings)
    frames.append(run_probe(x, manifest.label, manifest.split, name, p.methods, linear=linear, knn=knn))
rows = pd.concat(frames, ignore_index=True)
meta = provenance(
    {"tasks": p.tasks, "methods": p.methods, "linear": p.linear, "knn_ks": p.knn_ks},
    benchmark="probe",
    model=snakemake.wildcards.model,
)
write_scores(rows, snakemake.output[0], meta)
