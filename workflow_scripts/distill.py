"""Snakemake adapter: distil one student (rule distill): in process, torchrun with N processes, or one
torchrun per node of a multi-node SLURM allocation (resources.distill.nodes)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from histodistill.distill.trainer import DistillConfig, Trainer
from histodistill.logs import log_to

log_to(snakemake.log[0])
out_dir = Path(snakemake.output.student).parent
cfg = DistillConfig(**snakemake.params.settings)  # unknown keys fail here, named
nproc = snakemake.params.nproc_per_node
nodes = int(getattr(snakemake.resources, "nodes", 1))  # resources.distill.nodes: the job's allocation
if nproc == 1 and nodes == 1:
    result = Trainer(cfg, snakemake.input.tiles, snakemake.input.cache, out_dir).fit()
    sys.exit(75 if "stopped_at" in result else 0)  # 75: checkpointed on a signal; Snakemake retries resume
out_dir.mkdir(parents=True, exist_ok=True)
config_path = out_dir / "distill_config.json"
config_path.write_text(json.dumps(cfg.__dict__))
if nodes == 1:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
else:
    # One torchrun per node of the allocation (with `mpi` set, the plugin runs this script in the batch
    # step on the first node, outside any step), meeting at a c10d rendezvous on this node; the trainer
    # reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE before SLURM's variables.
    launcher = [
        "srun",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={socket.gethostname()}:29500",
        f"--rdzv_id={os.environ.get('SLURM_JOB_ID', 'histodistill')}",
    ]
command = [
    *launcher,
    "-m",
    "histodistill.distill.trainer",
    str(config_path),
    snakemake.input.tiles,
    snakemake.input.cache,
    str(out_dir),
]
with open(snakemake.log[0], "a") as log_file:  # every process's log lines go to the rule's log
    sys.exit(subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode)
