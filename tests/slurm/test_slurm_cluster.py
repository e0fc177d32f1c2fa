"""README's `snakemake --profile profiles/slurm all_benchmarks` on the demo, through a real local SLURM cluster."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slurm
def test_all_benchmarks_through_local_slurm(tmp_path):
    script = REPO / "tests" / "slurm" / "run_slurm_test.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=900
    )
    if result.returncode == 77:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "SLURM run ok" in result.stdout
    assert "has been submitted with SLURM jobid" in result.stdout + result.stderr
