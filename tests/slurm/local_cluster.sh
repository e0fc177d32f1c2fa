#!/usr/bin/env bash
# A private one-node SLURM cluster on localhost, to try `--profile profiles/slurm` without a real cluster.
#
#   eval "$(tests/slurm/local_cluster.sh start DIR)"   # starts it; sets SLURM_CONF and PATH in this shell
#   tests/slurm/local_cluster.sh stop DIR              # stops exactly the daemons `start DIR` started
#
# Everything lives in DIR: slurm.conf (auth/none, cred/none, no accounting storage), state and spool
# directories, logs and PID files. The daemons listen on two free ports picked at start, so the cluster
# neither reads nor writes /etc/slurm and does not collide with a cluster already running on the machine.
# Clients (sbatch, squeue, srun inside jobs) find it through SLURM_CONF, which `start` prints in an
# `export` line with DIR/bin (wrappers of the client commands that set it) first on PATH.
# Needs Debian's slurm-wlm (installed when missing and run as root) and root to start slurmd.
# Exit codes: 0 ok, 1 failed, 77 cannot run here (not root, no slurm-wlm).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
ACTION=$1
mkdir -p "$2"
DIR="$(cd "$2" && pwd)"
CONF="$DIR/slurm.conf"

stop() {
  # Only the PIDs this directory's daemons wrote, and only while they still are those daemons.
  for name in slurmd slurmctld; do
    pidfile="$DIR/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  if ! command -v slurmctld >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    if [ "$(id -u)" != "0" ]; then
      echo "slurm-wlm is not installed and this is not root: cannot install it" >&2
      exit 77
    fi
    echo "installing slurm-wlm…" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq slurm-wlm >/dev/null
  fi
  [ "$(id -u)" = "0" ] || { echo "slurmd needs root on this machine (auth/none test cluster)" >&2; exit 77; }
  stop  # a cluster this directory started earlier
  mkdir -p "$DIR/state" "$DIR/spool"
  local ctld_port slurmd_port mem_mb cpus
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
  mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))
  # The CPUs this process may use, not OMP_NUM_THREADS: GNU nproc honours OMP_NUM_THREADS / OMP_THREAD_LIMIT,
  # so a shell with OMP_NUM_THREADS=1 declared a 1-CPU node and every 2-CPU job pended forever
  # (squeue: PartitionConfig).
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  cat > "$CONF" <<CONF
# One-node test cluster written by tests/slurm/local_cluster.sh
ClusterName=histodistill
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# Finished jobs stay visible to squeue for an hour; profiles/slurm asks squeue for job states.
MinJobAge=3600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  # Client commands find this cluster through SLURM_CONF. Inside a job, Snakemake's jobstep executor
  # removes every SLURM_* variable before it calls srun, so srun would look for /etc/slurm/slurm.conf:
  # DIR/bin holds one-line wrappers of the client commands that set SLURM_CONF, first on PATH (sbatch
  # passes PATH on to the jobs).
  mkdir -p "$DIR/bin"
  for cmd in sbatch srun salloc squeue scancel sinfo scontrol sacct; do
    real=$(command -v "$cmd") || continue
    printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$CONF" "$real" > "$DIR/bin/$cmd"
    chmod +x "$DIR/bin/$cmd"
  done
  export SLURM_CONF="$CONF"
  slurmctld -i -f "$CONF"
  slurmd -N localhost -f "$CONF"
  for _ in $(seq 1 30); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qE "^(idle|mix|alloc)"; then
      echo "export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH"
      return 0
    fi
    sleep 1
  done
  echo "the SLURM node did not come up; logs:" >&2
  cat "$DIR"/*.log >&2 || true
  stop
  exit 1
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
