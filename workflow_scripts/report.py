"""Snakemake adapter: the HTML report and the leaderboard (rule report)."""

from pathlib import Path

from histodistill.embed import EmbeddingStore
from histodistill.logs import log_to
from histodistill.models.ref import ModelRef
from histodistill.report import build_report, model_profile

log_to(snakemake.log[0])
p = snakemake.params
scores = {b: {} for b in p.benchmarks}
for path in snakemake.input.scores:
    path = Path(path)
    scores[path.parent.name][path.stem] = path
models = {}
for model, emb_path in zip(p.models, snakemake.input.embeddings, strict=True):
    # a distilled student has its run's architecture; its size is that of the architecture
    ref = ModelRef.parse(model)
    arch = p.students.get(ref.run, model) if ref.is_student else model
    attrs = EmbeddingStore(emb_path).attrs
    models[model] = {
        **model_profile(arch),
        "tiles_per_s": attrs.get("tiles_per_s"),
        "device": attrs.get("throughput_device"),
    }
build_report(scores, Path(snakemake.output.html).parent, models=models, config=p.config, n_boot=p.n_boot)
