"""Snakemake adapter: distill one student (rule distill); `launch` picks in-process, torchrun or srun."""

import sys
from pathlib import Path

from histodistill.distill.launch import launch
from histodistill.logs import log_to

log_to(snakemake.log[0])
sys.exit(
    launch(
        snakemake.params.settings,
        snakemake.input.tiles,
        snakemake.input.cache,
        Path(snakemake.output.student).parent,  # with ema, train_log, loss.png
        nproc_per_node=snakemake.params.nproc_per_node,
        nodes=int(getattr(snakemake.resources, "nodes", 1)),  # resources.distill.nodes: the allocation
        log_path=snakemake.log[0],
        checkpoint_dir=snakemake.input.resume,
        threads=snakemake.threads,  # shared by the node's processes (OMP_NUM_THREADS = threads // nproc_per_node)
    )
)
