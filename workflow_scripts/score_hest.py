"""Snakemake adapter: HEST gene-expression regression of one model over every task (rule score_hest)."""

import pandas as pd

from histodistill.bench import write_scores
from histodistill.bench.datasets import embeddings_by_sample
from histodistill.bench.hest import load_task, score_task, summarize
from histodistill.embed import EmbeddingStore
from histodistill.logs import log_to
from histodistill.provenance import provenance

log_to(snakemake.log[0])
p = snakemake.params
frames, sources = [], {}
for task_dir, emb_path in zip(snakemake.input.tasks, snakemake.input.embeddings, strict=True):
    task = load_task(task_dir)
    store = EmbeddingStore(emb_path)
    samples = [s["slide_id"] for s in store.attrs["provenance"]["slides"]]
    by_sample = embeddings_by_sample(store.embeddings, store.index()["slide_index"], samples)
    frames.append(score_task(task, by_sample, latent_dim=p.latent_dim, seed=p.seed))
    sources[task.name] = store.attrs["provenance"]["config_hash"]
rows = pd.concat(frames, ignore_index=True)
meta = provenance(
    {"tasks": p.tasks, "latent_dim": p.latent_dim, "seed": p.seed},
    benchmark="hest",
    model=snakemake.wildcards.model,
    embeddings_config_hash=sources,
    summary=summarize(rows).to_dict("records"),
)
write_scores(rows, snakemake.output[0], meta)
