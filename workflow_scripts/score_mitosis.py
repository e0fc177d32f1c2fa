"""Snakemake adapter: mitotic-figure classification of one model, linear probe and LoRA (rule score_mitosis)."""

import pandas as pd

from histodistill.bench.mitosis import (
    LoraSettings,
    PatchReader,
    cross_domain_splits,
    embed_annotations,
    read_annotations,
    run_linear_protocol,
    run_lora_protocol,
    scaling_splits,
    slides_from_sheet,
    write_results,
)
from histodistill.config import read_sample_sheet
from histodistill.logs import log_to
from histodistill.models import load_model
from histodistill.models.ref import ModelRef
from histodistill.provenance import provenance

log_to(snakemake.log[0])
p = snakemake.params
s = p.settings
model = snakemake.wildcards.model
name = ModelRef.parse(model).id
weights = snakemake.input.student[0] if snakemake.input.student else p.weights  # a student's checkpoint
paths, mpps = slides_from_sheet(read_sample_sheet(p.samples))
annotations = read_annotations(p.annotations, slide_ids=list(paths))
splits = scaling_splits(
    annotations, s["fractions"], s["test_fraction"], s["n_val_splits"], s["val_fraction"], seed=p.seed
)
if s["cross_domain"] and annotations["domain"].nunique() > 1:
    splits += cross_domain_splits(
        annotations, s["test_fraction"], s["val_fraction"], s["cross_domain_runs"], p.seed
    )
frames = []
with PatchReader(paths, mpps, patch_px=s["patch_px"], mpp=s["mpp"]) as reader:
    if "linear" in s["methods"]:
        loaded = load_model(name, weights, seed=p.seed)
        features = embed_annotations(loaded, annotations, reader)
        frames.append(run_linear_protocol(features, annotations, splits, model))
    if "lora" in s["methods"]:
        lora = LoraSettings(**s["lora"], seed=p.seed)
        loaded = load_model(name, weights, seed=p.seed)  # fresh weights
        frames.append(run_lora_protocol(loaded, annotations, splits, reader, model, lora))
rows = pd.concat(frames, ignore_index=True)
write_results(rows, snakemake.output[0], provenance(s, benchmark="mitosis", model=model, seed=p.seed))
