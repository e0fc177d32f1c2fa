"""Snakemake adapter: distil one student (rule distill): in process, or torchrun with N processes."""

import json
import subprocess
import sys
from pathlib import Path

from histodistill.distill.trainer import DistillConfig, Trainer
from histodistill.logs import log_to

log_to(snakemake.log[0])
out_dir = Path(snakemake.output.student).parent
cfg = DistillConfig(**snakemake.params.settings)  # unknown keys fail here, named
nproc = snakemake.params.nproc_per_node
if nproc == 1:
    result = Trainer(cfg, snakemake.input.tiles, snakemake.input.cache, out_dir).fit()
    sys.exit(75 if "stopped_at" in result else 0)  # 75: checkpointed on a signal; Snakemake retries resume
out_dir.mkdir(parents=True, exist_ok=True)
config_path = out_dir / "distill_config.json"
config_path.write_text(json.dumps(cfg.__dict__))
command = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    f"--nproc_per_node={nproc}",
    "-m",
    "histodistill.distill.trainer",
    str(config_path),
    snakemake.input.tiles,
    snakemake.input.cache,
    str(out_dir),
]
with open(snakemake.log[0], "a") as log_file:  # every process's log lines go to the rule's log
    sys.exit(subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode)
