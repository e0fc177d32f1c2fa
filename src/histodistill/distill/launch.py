"""Start one distillation run: in this process, under torchrun on this node, or one torchrun per node.

The `distill` rule calls `launch`, which picks the way from the process count and the SLURM allocation:

- one process on one node: `Trainer(...).fit()` here;
- N processes on one node: `torchrun --standalone --nproc_per_node=N -m histodistill.distill.trainer ...`;
- several nodes (`resources.distill.nodes`; the SLURM plugin's `mpi` setting runs the job's script in the
  batch step on the first node): `srun --nodes=M --ntasks-per-node=1 torchrun ...`, one torchrun per node,
  meeting at a c10d rendezvous on this node (port `RDZV_PORT`); the trainer reads torchrun's
  RANK / LOCAL_RANK / WORLD_SIZE before SLURM's variables.

A run stopped by SIGUSR1/SIGTERM checkpoints and exits with `REQUEUE_EXIT_CODE` (75, EX_TEMPFAIL from
sysexits.h): the job fails, the rule's `retries` rerun it, and the trainer resumes from the checkpoint.

The processes of one node share the job's CPUs: each gets `process_threads` = the job's threads // N
threads (every `THREAD_VARS` in their environment). Snakemake exports `OMP_NUM_THREADS`, `MKL_NUM_THREADS`
and the other BLAS counts = the rule's threads to a script job, and torchrun keeps a set value, so without
this every process ran the job's full thread count: on the demo's 2-CPU job, 2 processes with
`OMP_NUM_THREADS` 2 ran 3.9 samples/s against 40 with 1 (12 iterations of the demo run, quiet machine);
`OMP_NUM_THREADS` 1 with `MKL_NUM_THREADS` 2 still ran 1.6 against 17 with both 1 (beside a CI run).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on a signal; run the job again to resume
RDZV_PORT = 29500  # the c10d rendezvous port of a multi-node run, on the first node
# the thread counts Snakemake exports to a job (snakemake/shell.py): OpenMP's and the BLAS libraries'
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def process_threads(threads: int | None, nproc_per_node: int) -> int:
    """OpenMP/torch threads for each of `nproc_per_node` processes sharing a job's `threads` CPUs:
    threads // nproc_per_node, at least 1. `threads` None: the CPUs this process may run on
    (`os.sched_getaffinity`, which a SLURM allocation restricts). Raises ValueError when `nproc_per_node` < 1."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) must be at least 1")
    if threads is None:
        threads = len(os.sched_getaffinity(0))
    return max(1, int(threads) // nproc_per_node)


def torchrun_env(threads: int | None, nproc_per_node: int) -> dict[str, str]:
    """This process's environment with every `THREAD_VARS` = `process_threads(threads, nproc_per_node)`, for
    the processes `torchrun_command` starts (torchrun, and srun on several nodes, pass it on to each)."""
    return thread_env(process_threads(threads, nproc_per_node))


def thread_env(n: int) -> dict[str, str]:
    """This process's environment with every `THREAD_VARS` set to `n`."""
    return {**os.environ, **dict.fromkeys(THREAD_VARS, str(n))}


def torchrun_command(
    module: str,
    args: list[str],
    *,
    nproc_per_node: int,
    nodes: int = 1,
    host: str | None = None,
    job_id: str | None = None,
) -> list[str]:
    """The torchrun (single node) or srun + torchrun (several nodes) command line that runs
    `python -m <module> <args>` in every process (the distillation trainer, SLPD region pretraining).

    `host` is the rendezvous host (default: this host's name), `job_id` the rendezvous id (default:
    `$SLURM_JOB_ID`, else "histodistill"). Raises ValueError when `nproc_per_node` or `nodes` is below 1.
    """
    if nproc_per_node < 1 or nodes < 1:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) and nodes ({nodes}) must be at least 1")
    if nodes == 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc_per_node}",
        ]
    else:
        launcher = [
            "srun",
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nodes}",
            f"--nproc_per_node={nproc_per_node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={host or socket.gethostname()}:{RDZV_PORT}",
            f"--rdzv_id={job_id or os.environ.get('SLURM_JOB_ID', 'histodistill')}",
        ]
    return [*launcher, "-m", module, *map(str, args)]


def launch_command(
    config_path: str | Path,
    tiles: str | Path,
    cache: str | Path,
    out_dir: str | Path,
    *,
    nproc_per_node: int,
    nodes: int = 1,
    host: str | None = None,
    job_id: str | None = None,
    checkpoint_dir: str | Path | None = None,
) -> list[str]:
    """The `torchrun_command` of one distillation run (`histodistill.distill.trainer`'s entry point).
    Raises ValueError when `nproc_per_node` or `nodes` is below 1."""
    args = [config_path, tiles, cache, out_dir, *([checkpoint_dir] if checkpoint_dir is not None else [])]
    return torchrun_command(
        "histodistill.distill.trainer",
        args,
        nproc_per_node=nproc_per_node,
        nodes=nodes,
        host=host,
        job_id=job_id,
    )


def launch(
    settings: Mapping[str, Any],
    tiles: str | Path,
    cache: str | Path,
    out_dir: str | Path,
    *,
    nproc_per_node: int = 1,
    nodes: int = 1,
    log_path: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    threads: int | None = None,
) -> int:
    """Train one student into `out_dir`; returns the exit code for the job (0, `REQUEUE_EXIT_CODE`, or the
    launcher's own non-zero code when a process failed).

    `settings`: `DistillConfig` fields (an unknown key raises TypeError here, before any process starts);
    `tiles`: the cohort's tile store; `cache`: its teacher cache. With more than one process, the settings
    are written to `out_dir/distill_config.json` for the trainer processes, and their stdout and stderr are
    appended to `log_path` (else inherited). `checkpoint_dir` (default `out_dir`) holds the run's
    `checkpoint.pt` and, with more than one process, the settings file `distill_config.json`; the workflow
    passes the run's resume directory (rule `distill_resume`). `threads`: the job's CPUs per node (the rule's
    threads; None: this process's CPU affinity), shared by its processes (`process_threads`).
    """
    from histodistill.distill.trainer import DistillConfig, Trainer

    cfg = DistillConfig(**settings)
    out_dir = Path(out_dir)
    if nproc_per_node == 1 and nodes == 1:
        result = Trainer(cfg, tiles, cache, out_dir, checkpoint_dir=checkpoint_dir).fit()
        return REQUEUE_EXIT_CODE if "stopped_at" in result else 0
    settings_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir
    settings_dir.mkdir(parents=True, exist_ok=True)
    config_path = settings_dir / "distill_config.json"
    config_path.write_text(json.dumps(cfg.__dict__))
    command = launch_command(
        config_path,
        tiles,
        cache,
        out_dir,
        nproc_per_node=nproc_per_node,
        nodes=nodes,
        checkpoint_dir=checkpoint_dir,
    )
    env = torchrun_env(threads, nproc_per_node)
    log.info("launching %s (%s threads per process)", " ".join(command), env["OMP_NUM_THREADS"])
    return run_processes(command, env, log_path)


def run_processes(command: list[str], env: dict[str, str], log_path: str | Path | None) -> int:
    """Run a `torchrun_command` with `env`; its stdout and stderr appended to `log_path` after our own
    lines (else inherited). Returns its exit code."""
    if log_path is None:
        return subprocess.run(command, env=env, check=False).returncode
    for handler in logging.getLogger().handlers:  # our own lines first, then the processes' in order
        handler.flush()
    with open(log_path, "a") as log_file:
        return subprocess.run(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False
        ).returncode


def new_resume_dir(path: str | Path, settings: Mapping[str, Any]) -> Path:
    """Create a run's empty resume directory (rule `distill_resume`), where `launch` keeps the checkpoint.

    It holds `run.json`, the settings it was made for (for people; the trainer binds each checkpoint to
    its inputs itself). Created beside `path` and renamed into place, so a killed job leaves no directory
    Snakemake would take as done. Raises FileExistsError when `path` exists (Snakemake removes a stale
    one before the job runs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    (tmp / "run.json").write_text(json.dumps(dict(settings), indent=1, sort_keys=True, default=str) + "\n")
    os.rename(tmp, path)
    log.info("resume directory %s (a checkpoint in it is resumed by `distill`)", path)
    return path
