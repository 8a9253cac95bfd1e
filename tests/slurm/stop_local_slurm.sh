#!/usr/bin/env bash
# Source: /work/shared/reference/local-slurm/stop_local_slurm.sh (the project's tested
# local-SLURM recipe), copied unchanged apart from this header for tests/test_slurm.py.
#
# Stop the local single-node SLURM cluster started by start_local_slurm.sh.
# Cancels the jobs still queued on it, then stops each daemon by the pid in its
# PID file (TERM, KILL after 20 s), checking that the pid really is that daemon.
# Never kills by name. Safe to run when nothing is running.
set -uo pipefail

log() { echo "[stop_local_slurm] $*"; }
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

stop_pid() {
  local pid
  if ! alive "$1" "$2"; then
    [ -e "$1" ] && rm -f "$1"
    return 0
  fi
  pid=$(cat "$1")
  log "stopping $2 (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$2 (pid $pid) still alive after 20s, sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$1"
}

# cancel remaining jobs so no slurmstepd / job processes outlive slurmd
if alive /run/slurmctld.pid slurmctld; then
  jobs=$(squeue -h -o '%i' 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do
      [ -z "$(squeue -h -t PD,R,CG,S -o '%i' 2>/dev/null)" ] && break
      sleep 0.25
    done
  fi
fi

stop_pid /run/slurmd.pid slurmd
stop_pid /run/slurmctld.pid slurmctld
stop_pid /run/slurmdbd.pid slurmdbd
stop_pid /run/mysqld/mysqld.pid mariadbd
stop_pid /run/munge/munged.pid munged
log "done"
