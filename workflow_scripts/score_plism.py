"""Snakemake adapter: PLISM robustness of one model (rule score_plism)."""

import pandas as pd

from histodistill.bench.plism import score_plism
from histodistill.logs import log_to

log_to(snakemake.log[0])
p = snakemake.params
tiles = pd.read_parquet(snakemake.input.tiles, columns=["slide_id", "scanner", "staining"])
slides = tiles.drop_duplicates("slide_id").reset_index(drop=True)  # the store's slide order
score_plism(
    snakemake.input.embeddings,
    slides,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    tiles_subset=p.tiles_subset,
    top_k=p.top_k,
    dtype=p.dtype,
    block_size=p.block_size,
    workers=snakemake.threads,
)
