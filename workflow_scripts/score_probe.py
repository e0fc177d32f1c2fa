"""Snakemake adapter: classification probes of one model on every task (rule score_probe).

Tile-level tasks: linear probe, k-NN and logistic regression; slide-level tasks: ABMIL on each slide's tiles.
"""

import pandas as pd

from histodistill.bench import write_scores
from histodistill.bench.probe import (
    AbmilConfig,
    KnnConfig,
    LinearProbeConfig,
    load_manifest,
    run_abmil,
    run_probe,
)
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
    if task["level"] == "slide":
        if manifest.slide_id is None:
            raise ValueError(f"probe task {name}: level slide needs a slide_id column in {task['manifest']}")
        frames.append(
            run_abmil(
                x, manifest.label, manifest.split, manifest.slide_id, name, AbmilConfig(seeds=linear.seeds)
            )
        )
    else:
        frames.append(run_probe(x, manifest.label, manifest.split, name, p.methods, linear=linear, knn=knn))
rows = pd.concat(frames, ignore_index=True)
meta = provenance(
    {"tasks": p.tasks, "methods": p.methods, "linear": p.linear, "knn_ks": p.knn_ks},
    benchmark="probe",
    model=snakemake.wildcards.model,
)
write_scores(rows, snakemake.output[0], meta)
