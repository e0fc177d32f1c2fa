import os
import subprocess
import sys

import pytest

from histodistill.distill import trainer
from histodistill.distill.launch import (
    RDZV_PORT,
    REQUEUE_EXIT_CODE,
    THREAD_VARS,
    launch,
    launch_command,
    process_threads,
    torchrun_env,
)


def test_requeue_code_is_ex_tempfail_and_the_trainers():
    assert REQUEUE_EXIT_CODE == 75 and trainer.EXIT_REQUEUE == REQUEUE_EXIT_CODE


def test_single_node_is_standalone_torchrun():
    cmd = launch_command("cfg.json", "tiles.zarr", "cache.zarr", "out", nproc_per_node=4)
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "histodistill.distill.trainer", "cfg.json", "tiles.zarr", "cache.zarr", "out",
    ]  # fmt: skip


def test_several_nodes_are_one_torchrun_per_node_under_srun():
    cmd = launch_command("c", "t", "k", "o", nproc_per_node=8, nodes=3, host="node1", job_id="42")
    assert cmd[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[4:7] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=3", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_id=42"} <= set(cmd)
    assert f"--rdzv_endpoint=node1:{RDZV_PORT}" in cmd and "--standalone" not in cmd
    assert cmd[-5:] == ["histodistill.distill.trainer", "c", "t", "k", "o"]


def test_bad_counts_and_unknown_settings_fail_before_any_process(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        launch_command("c", "t", "k", "o", nproc_per_node=0)
    with pytest.raises(TypeError, match="learning_rate"):
        launch({"learning_rate": 1e-3}, "t", "k", tmp_path / "out", nproc_per_node=2)
    assert not (tmp_path / "out").exists()


def test_processes_share_the_jobs_threads(monkeypatch):
    """Snakemake exports OMP_NUM_THREADS = the rule's threads and torchrun keeps it: each process must get
    its share, else 2 processes × 2 threads on the demo's 2 CPUs ran 10× slower."""
    assert [process_threads(t, n) for t, n in [(2, 2), (8, 2), (7, 2), (1, 4), (16, 1)]] == [1, 4, 3, 1, 16]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    assert process_threads(None, 4) == 3
    for name in THREAD_VARS:  # what Snakemake exports to a 2-thread job
        monkeypatch.setenv(name, "2")
    env = torchrun_env(2, 2)
    assert {name: env[name] for name in THREAD_VARS} == dict.fromkeys(THREAD_VARS, "1")
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"} <= set(THREAD_VARS)
    assert env["PATH"] == os.environ["PATH"]
    with pytest.raises(ValueError, match="at least 1"):
        process_threads(4, 0)


def test_launch_gives_the_processes_their_share(tmp_path, monkeypatch):
    seen = {}

    def run(command, env, **kwargs):
        seen.update(command=command, omp=env["OMP_NUM_THREADS"], mkl=env["MKL_NUM_THREADS"])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("MKL_NUM_THREADS", "8")
    monkeypatch.setattr(subprocess, "run", run)
    settings = {"student": "h0_mini_tiny", "teacher": "h_optimus_0_tiny"}
    assert launch(settings, "t", "k", tmp_path / "out", nproc_per_node=2, threads=8) == 0
    assert seen["omp"] == seen["mkl"] == "4" and "--nproc_per_node=2" in seen["command"]
