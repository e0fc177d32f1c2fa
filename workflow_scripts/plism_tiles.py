"""Snakemake adapter: cut the reference grid from every registered PLISM slide (rule plism_tiles)."""

import json
from pathlib import Path

import pandas as pd

from histodistill.atomic import atomic_path
from histodistill.logs import log_to
from histodistill.matched_tiles import cut_matched_tiles

log_to(snakemake.log[0])
p = snakemake.params
manifest = pd.DataFrame(p.manifest).set_index("slide_id", drop=False)
transforms = {Path(t).name: t for t in snakemake.input.transforms}
qc = {Path(q).stem: json.loads(Path(q).read_text()) for q in snakemake.input.qc}
summary = cut_matched_tiles(
    manifest,
    p.settings["reference"],
    snakemake.input.grid,
    transforms,
    qc,
    snakemake.output.store,
    snakemake.output.table,
    chunk_tiles=p.chunk_tiles,
    zstd_level=p.compression_level,
    workers=snakemake.threads,
    params=p.settings,
)
with atomic_path(snakemake.output.summary) as tmp:
    summary.to_csv(tmp, sep="\t", index=False)
