#!/usr/bin/env bash
# Runs README's SLURM command, `snakemake --profile profiles/slurm all_benchmarks`, on the demo
# through a real one-node SLURM cluster on localhost: demo slides, tiling, PLISM registration, teacher cache,
# distillation (torchrun with 2 processes inside one SLURM job), embeddings, every demo benchmark, report.
#
# The cluster is private (tests/slurm/local_cluster.sh: its own slurm.conf in WORKDIR/slurm, own state,
# spool, ports and PID files; /etc/slurm untouched) and is stopped at the end, also on failure. The
# workflow is copied into WORKDIR/run with the workflow tests' smaller demo config.yaml
# (tests/workflow/demo_config.py), and the command runs there as a user would type it. Afterwards the
# outputs are checked, and SLURM's own job list (saved to WORKDIR/run/slurm_jobs.txt) must show every rule's
# jobs COMPLETED (so they ran through sbatch, not locally). The workflow tests' demo fixture runs this script:
# the suite runs the demo end to end once, through SLURM where it can.
# Usage: tests/slurm/run_slurm_test.sh [WORKDIR]   (exit 77: cannot run here, e.g. not root)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$(mktemp -d -t histodistill-slurm-XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PY="${PYTHON:-python3}"

CLUSTER="$WORK/slurm"
trap 'bash "$REPO/tests/slurm/local_cluster.sh" stop "$CLUSTER"' EXIT
exports=$(bash "$REPO/tests/slurm/local_cluster.sh" start "$CLUSTER") || exit $?
eval "$exports"
[ -n "${SLURM_CONF:-}" ] || { echo "local_cluster.sh gave no SLURM_CONF" >&2; exit 1; }
sinfo
PARTITION=$(sinfo -h -o "%P" | grep '\*$' | tr -d '*' | head -1)

# The workflow, as a user's checkout has it, with the smaller demo of the workflow tests
# (tests/workflow/demo_config.py: the suite runs the demo end to end once, through this script).
RUN="$WORK/run"
(cd "$REPO" && "$PY" -m tests.workflow.demo_config "$RUN" "$PARTITION")

cd "$RUN"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
# One flag is added to README's command: the plugin's first status check after a submission or a finished job
# comes after 5 s instead of its default 40 s (a courtesy to a shared slurmctld that this private one-node
# cluster does not need). Each dependent job otherwise waits up to 40 s + for its predecessor's end to be seen.
snakemake --profile profiles/slurm all_benchmarks --slurm-init-seconds-before-status-checks 5
echo "README's SLURM command finished in $(( $(date +%s) - start )) s"

# Outputs exist and are real; SLURM's job list shows each rule's jobs COMPLETED.
"$PY" - "$RUN" <<'PYCHECK'
import subprocess, sys
from collections import Counter
from pathlib import Path
import pandas as pd
run = Path(sys.argv[1])
board = pd.read_parquet(run / "results/report/leaderboard.parquet")
assert set(board["model"]) >= {"h_optimus_0_tiny", "student-demo", "h0_mini_tiny"}, board["model"].tolist()
html = (run / "results/report/index.html").read_text()
assert "Leaderboard" in html and "PLISM" in html, html[:500]
train_log = pd.read_parquet(run / "results/students/demo/train_log.parquet")
import yaml
iterations = yaml.safe_load((run / "config.yaml").read_text())["distill"]["runs"]["demo"]["iterations"]
assert len(train_log) == iterations and train_log["loss_total"].notna().all()
assert "world_size=2" in (run / "logs/distill/demo.log").read_text()
jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%k|%T"], capture_output=True, text=True, check=True)
(run / "slurm_jobs.txt").write_text(jobs.stdout)  # SLURM's own job list, for the tests
rows = [line.split("|") for line in jobs.stdout.split("\n") if line.startswith("rule_")]
states = Counter(state for _, state in rows)
assert set(states) == {"COMPLETED"}, states
rules = {comment.split("_wildcards_")[0].removeprefix("rule_") for comment, _ in rows}
for rule in ("demo_slide", "tile_slide", "pack_tiles", "register_plism", "cache_teacher_shard", "distill",
             "embed", "score_plism", "score_hest", "score_probe", "score_mitosis", "report"):
    assert rule in rules, (rule, sorted(rules))
print(f"SLURM run ok: {len(rows)} SLURM jobs of {len(rules)} rules COMPLETED; leaderboard of {len(board)} models")
PYCHECK
