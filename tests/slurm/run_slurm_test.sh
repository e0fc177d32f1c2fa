#!/usr/bin/env bash
# Runs the demo's `all_tiles` and `all_students` (tiling, packing, teacher cache shards, and distillation
# with torchrun launching 2 processes inside one SLURM job) through a real one-node SLURM cluster on
# localhost with profiles/slurm.
#
# Installs Debian's slurm-wlm if missing (needs root), writes a private slurm.conf (auth/none,
# cred/none, no accounting daemon), starts slurmctld + slurmd, runs
# `snakemake --profile profiles/slurm all_tiles` on a small demo, checks the outputs and that the jobs
# really went through SLURM, and stops the daemons it started (also on failure).
# Usage: tests/slurm/run_slurm_test.sh [WORKDIR]
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$(mktemp -d -t histodistill-slurm-XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PY="${PYTHON:-python3}"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
  if [ "$(id -u)" != "0" ]; then
    echo "slurm-wlm is not installed and this is not root: cannot install it" >&2
    exit 77
  fi
  echo "installing slurm-wlm…"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm >/dev/null
fi

# The cluster: an existing one that answers (and whose config is not ours) is used as it is;
# otherwise this script writes /etc/slurm/slurm.conf (the default path, which job steps started by srun
# inside a job also read) and starts slurmctld + slurmd, and stops them again at the end.
SLURM_ETC=/etc/slurm/slurm.conf
MARKER="# One-node test cluster written by tests/slurm/run_slurm_test.sh"
CONF_DIR="$WORK/slurm"
STARTED=0
stop_daemons() {
  if [ "$STARTED" = 1 ]; then
    for pidfile in "$CONF_DIR/slurmd.pid" "$CONF_DIR/slurmctld.pid"; do
      if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    sleep 1
  fi
}
trap stop_daemons EXIT

if [ -f "$SLURM_ETC" ] && ! grep -qF "$MARKER" "$SLURM_ETC" && timeout 10 sinfo -h >/dev/null 2>&1; then
  echo "using the running SLURM cluster configured in $SLURM_ETC"
else
  [ "$(id -u)" = "0" ] || { echo "need root to write $SLURM_ETC and start slurmctld/slurmd" >&2; exit 77; }
  if [ -f "$SLURM_ETC" ] && ! grep -qF "$MARKER" "$SLURM_ETC"; then
    echo "$SLURM_ETC exists, is not ours, and its cluster does not answer: not touching it" >&2
    exit 1
  fi
  mkdir -p "$CONF_DIR/state" "$CONF_DIR/spool" /etc/slurm
  MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))
  cat > "$SLURM_ETC" <<CONF
$MARKER
ClusterName=histodistill
SlurmctldHost=localhost
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$CONF_DIR/state
SlurmdSpoolDir=$CONF_DIR/spool
SlurmctldPidFile=$CONF_DIR/slurmctld.pid
SlurmdPidFile=$CONF_DIR/slurmd.pid
SlurmctldLogFile=$CONF_DIR/slurmctld.log
SlurmdLogFile=$CONF_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to squeue for an hour: the executor plugin tracks them with squeue.
MinJobAge=3600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  sleep 1
  STARTED=1
  slurmctld -i
  slurmd -N localhost
fi
for _ in $(seq 1 30); do
  if sinfo -h -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then break; fi
  sleep 1
done
sinfo
sinfo -h -o "%t" | grep -qE "^(idle|mix|alloc)" || { echo "SLURM node did not come up" >&2; cat "$CONF_DIR"/*.log >&2 || true; exit 1; }
PARTITION=$(sinfo -h -o "%P" | grep '\*$' | tr -d '*' | head -1)

# A small demo in WORK (the demo config with smaller slides).
mkdir -p "$WORK/configs"
cp "$REPO/configs/demo_samples.tsv" "$REPO/configs/demo_plism.tsv" "$WORK/configs/"
"$PY" - "$REPO/config.yaml" "$WORK/config.yaml" "$PARTITION" <<'PYCONF'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["demo"].update(width_px=2048, height_px=1536)
config["resources"] = {
    "default": {"partition": sys.argv[3], "runtime_min": 10, "mem_mb": 1500, "cpus": 1},
    "distill": {"partition": sys.argv[3], "runtime_min": 20, "mem_mb": 4000, "cpus": 2},
}
config["distill"]["nproc_per_node"] = 2  # torchrun inside the SLURM job (gloo on CPU)
config["distill"]["runs"]["demo"].update(iterations=10, checkpoint_every=5)
yaml.safe_dump(config, open(sys.argv[2], "w"))
PYCONF

cd "$WORK"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m snakemake -s "$REPO/Snakefile" --profile "$REPO/profiles/slurm" --configfile "$WORK/config.yaml" \
  --slurm-logdir "$WORK/slurm_logs" --slurm-keep-successful-logs --slurm-status-command squeue \
  --slurm-init-seconds-before-status-checks 5 --jobs 4 all_tiles all_students

# Outputs exist and are real; every job left a SLURM log (so it ran through sbatch, not locally).
"$PY" - "$WORK" <<'PYCHECK'
import sys
from pathlib import Path
from histodistill.tilestore import TileStore
from histodistill.tiling import read_tile_table
work = Path(sys.argv[1])
tables = sorted((work / "results/tiles/demo").glob("*.parquet"))
assert [p.stem for p in tables] == ["demo_00", "demo_01", "demo_02"], tables
n = sum(len(read_tile_table(p)[0]) for p in tables)
store = TileStore(work / "results/tilestore/demo.zarr")
assert len(store) == n > 0, (len(store), n)
assert all((work / f"results/qc/demo/demo_0{i}.png").stat().st_size > 0 for i in range(3))
logs = sorted((work / "slurm_logs").rglob("*.log"))
for rule in ("demo_slide", "tile_slide", "pack_tiles", "cache_teacher_shard", "distill"):
    assert any(f"rule_{rule}" in str(p) for p in logs), (rule, logs)
import pandas as pd
train_log = pd.read_parquet(work / "results/students/demo/train_log.parquet")
assert len(train_log) == 10 and train_log["loss_total"].notna().all()
distill_log = (work / "logs/distill/demo.log").read_text()
assert "world_size=2" in distill_log, distill_log[-2000:]
print(f"SLURM run ok: {n} tiles from {len(tables)} slides, a student distilled by 2 processes, {len(logs)} SLURM job logs")
PYCHECK
