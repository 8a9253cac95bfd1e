#!/usr/bin/env bash
# Source: /work/shared/reference/local-slurm/start_local_slurm.sh (the project's tested
# local-SLURM recipe; its README lists versions, timings and pitfalls). Copied for
# tests/test_slurm.py; changes: this header, the pointer to the profile below and the
# SLURM_MIN_JOB_AGE override.
#
# Start a real single-node SLURM cluster on localhost (Debian 12 "bookworm",
# Debian's slurm-wlm 22.05 packages, no systemd needed, no cgroups).
#
# Idempotent: installs only missing packages, (re)writes the config, starts only
# the daemons that are not already running (restarts them if the config
# changed), then waits until `sinfo` shows the node idle.
#
# Usage (as root):
#   bash start_local_slurm.sh                    # munged + slurmctld + slurmd (no accounting)
#   bash start_local_slurm.sh --with-accounting  # + MariaDB + slurmdbd, so `sacct` works
#
# Environment overrides:
#   SLURM_WITH_ACCOUNTING=1   same as --with-accounting
#   SLURM_CLUSTER_NAME        (default: localci)
#   SLURM_PARTITION_NAME      (default: debug)
#   SLURM_WAIT_S              seconds to wait for the node to become idle (default: 60)
#   SLURM_MIN_JOB_AGE         seconds squeue keeps showing finished jobs (default: 300;
#                             must stay >= 3 x the profile's
#                             slurm-init-seconds-before-status-checks)
#   SLURM_ACCOUNTS            comma-separated accounts to create for user root
#                             (only with accounting; needed if a profile sets
#                             slurm_account, which the plugin validates via sacctmgr)
#
# PID files (used by stop_local_slurm.sh):
#   /run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid
#   /run/slurmdbd.pid /run/mysqld/mysqld.pid   (the last two only with accounting)
#
# Without accounting `sacct` fails ("Slurm accounting storage is disabled"), so
# snakemake-executor-plugin-slurm must be told `slurm-status-command: squeue`
# (otherwise it hangs forever after the first submission); profiles/slurm does so.
set -euo pipefail

WITH_ACCOUNTING=${SLURM_WITH_ACCOUNTING:-0}
CLUSTER=${SLURM_CLUSTER_NAME:-localci}
PARTITION=${SLURM_PARTITION_NAME:-debug}
WAIT_S=${SLURM_WAIT_S:-60}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-300}
ACCOUNTS=${SLURM_ACCOUNTS:-}
DB_PASS=slurmdbpass  # local-only MariaDB user, bound to 127.0.0.1 / unix socket

for arg in "$@"; do
  case "$arg" in
    --with-accounting) WITH_ACCOUNTING=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[start_local_slurm] $*"; }
die() { echo "[start_local_slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[[ "$MIN_JOB_AGE" =~ ^[0-9]+$ ]] || die "SLURM_MIN_JOB_AGE must be a number of seconds"
T0=$(date +%s)

# ---------------------------------------------------------------- helpers
# alive PIDFILE COMM : true if the pid in PIDFILE is running and is COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# stop_pid PIDFILE COMM : TERM the daemon by its pid, KILL after 20 s
stop_pid() {
  local pid
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  log "stopping $2 (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$1"
}

# wait_for DESCRIPTION SECONDS CMD... : poll CMD until it succeeds
wait_for() {
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 4))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  die "timed out after ${secs}s waiting for $what"
}

# ---------------------------------------------------------------- packages
PKGS=(munge slurmctld slurmd slurm-client)
[ "$WITH_ACCOUNTING" = 1 ] && PKGS+=(slurmdbd mariadb-server)
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || MISSING+=("$p")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  log "installing: ${MISSING[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${MISSING[@]}" >/dev/null
fi
T_INSTALL=$(date +%s)

# ---------------------------------------------------------------- munge key
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  install -d -o munge -g munge -m 0700 /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
NODE_HW=$(slurmd -C | head -1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_HW")
if [ -z "$CPUS" ] || [ -z "$MEM" ]; then die "could not parse 'slurmd -C': $NODE_HW"; fi
# leave a little headroom so the node never drains with "Low RealMemory"
MEM=$(( MEM > 1024 ? MEM - 256 : MEM ))

if [ "$WITH_ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

install -d -m 0755 /etc/slurm
install -d -o slurm -g slurm -m 0755 /var/lib/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm

NEW_CONF=$(cat <<EOF
# generated by start_local_slurm.sh: single node on localhost, no cgroups
ClusterName=${CLUSTER}
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
${ACCT_LINES}
JobCompType=jobcomp/none
ReturnToService=2
# keep finished jobs visible to squeue for a while (needed by the snakemake
# slurm plugin when it polls with squeue instead of sacct)
MinJobAge=${MIN_JOB_AGE}
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

CONF_CHANGED=0
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$NEW_CONF" ]; then
  printf '%s\n' "$NEW_CONF" > /etc/slurm/slurm.conf
  chmod 0644 /etc/slurm/slurm.conf
  CONF_CHANGED=1
  log "wrote /etc/slurm/slurm.conf"
fi

DBD_CHANGED=0
if [ "$WITH_ACCOUNTING" = 1 ]; then
  NEW_DBD=$(cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF
)
  if [ "$(cat /etc/slurm/slurmdbd.conf 2>/dev/null)" != "$NEW_DBD" ]; then
    printf '%s\n' "$NEW_DBD" > /etc/slurm/slurmdbd.conf
    DBD_CHANGED=1
    log "wrote /etc/slurm/slurmdbd.conf"
  fi
  chown slurm:slurm /etc/slurm/slurmdbd.conf
  chmod 0600 /etc/slurm/slurmdbd.conf
fi

# restart running slurm daemons whose config changed
if [ "$CONF_CHANGED" = 1 ]; then
  stop_pid /run/slurmd.pid slurmd
  stop_pid /run/slurmctld.pid slurmctld
fi
if [ "$DBD_CHANGED" = 1 ]; then
  stop_pid /run/slurmdbd.pid slurmdbd
fi

# ---------------------------------------------------------------- munged
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid munged; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
fi
wait_for "munge" 20 bash -c 'munge -n | unmunge'

# ---------------------------------------------------------------- accounting
if [ "$WITH_ACCOUNTING" = 1 ]; then
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    log "initialising MariaDB data dir"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  if ! alive /run/mysqld/mysqld.pid mariadbd; then
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
      --innodb-lock-wait-timeout=900 \
      >>/var/log/slurm/mariadbd.log 2>&1 </dev/null &
    disown || true
  fi
  wait_for "mariadbd" 60 mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  wait_for "mariadbd pid file" 20 alive /run/mysqld/mysqld.pid mariadbd
  mariadb --socket=/run/mysqld/mysqld.sock -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  if ! alive /run/slurmdbd.pid slurmdbd; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
  fi
  wait_for "slurmdbd" 60 sacctmgr -n list cluster
fi

# ---------------------------------------------------------------- slurmctld / slurmd
if ! alive /run/slurmctld.pid slurmctld; then
  log "starting slurmctld"
  /usr/sbin/slurmctld
fi
wait_for "slurmctld" 30 bash -c 'scontrol ping | grep -q UP'

if [ -n "$ACCOUNTS" ]; then
  [ "$WITH_ACCOUNTING" = 1 ] || die "SLURM_ACCOUNTS needs --with-accounting"
  for acct in ${ACCOUNTS//,/ }; do
    if [ -z "$(sacctmgr -n list account "$acct" format=account)" ]; then
      log "creating account $acct for user root"
      sacctmgr -i add account "$acct" Description=local Organization=local >/dev/null
    fi
    if [ -z "$(sacctmgr -n list association user=root account="$acct" format=account)" ]; then
      sacctmgr -i add user root Account="$acct" >/dev/null
    fi
  done
fi

if ! alive /run/slurmd.pid slurmd; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# ---------------------------------------------------------------- wait for node
resumed=0
state=""
for _ in $(seq 1 $((WAIT_S * 4))); do
  state=$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down*|drain*|fail*)
      if [ "$resumed" = 0 ]; then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
        resumed=1
      fi ;;
  esac
  sleep 0.25
done
case "$state" in
  idle|mixed|allocated|completing) ;;
  *) tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
     die "node $HOST not ready after ${WAIT_S}s (state: '${state:-none}')" ;;
esac

if [ "$state" = idle ]; then
  timeout 60 srun -N1 -n1 --quiet true || die "'srun true' failed"
fi

T1=$(date +%s)
log "ready: $(sinfo -V) cluster=${CLUSTER} partition=${PARTITION} node=${HOST} cpus=${CPUS} mem=${MEM}MB accounting=$([ "$WITH_ACCOUNTING" = 1 ] && echo slurmdbd || echo none)"
log "timing: install $((T_INSTALL - T0))s, configure+start $((T1 - T_INSTALL))s, total $((T1 - T0))s"
sinfo
