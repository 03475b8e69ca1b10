#!/usr/bin/env bash
# Single-node SLURM cluster on this machine (Debian 12, root, no systemd): munge, MariaDB, slurmdbd, slurmctld, slurmd.
# Usage: bash scripts/slurm_cluster.sh up | down | status. `up` is idempotent; state and logs live under $SLURM_BASE.
set -euo pipefail

BASE="${SLURM_BASE:-/tmp/conddetr-slurm}"
LOGS="$BASE/log"
CLUSTER="${SLURM_CLUSTER_NAME:-conddetr}"
NODE="$(hostname -s)"
CONF_DIR=/etc/slurm
DB_SOCKET=/run/mysqld/mysqld.sock # libmariadb's default socket, so slurmdbd's StorageHost=localhost finds it
DB_PIDFILE=/run/mysqld/mariadb.pid
DB_PASS=conddetr-slurmdbd         # local socket only (MariaDB runs with --skip-networking)
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client slurm-wlm-basic-plugins)

STARTED=0      # set when `up` had to start something
CONF_CHANGED=0 # set when `up` wrote a slurm.conf that differs from the one the daemons may be running with

log() { echo "[slurm_cluster] $*"; }

die() {
  echo "[slurm_cluster] ERROR: $*" >&2
  for f in "$LOGS"/*.log /var/log/munge/munged.log; do
    [[ -f "$f" ]] || continue
    echo "----- last lines of $f -----" >&2
    tail -n 25 "$f" >&2
  done
  exit 1
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s until it succeeds, or fail with the daemon logs.
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing ${missing[*]}"
  # Without systemd the packages' maintainer scripts would try to start the daemons; policy-rc.d forbids that.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$BASE/apt.log" 2>&1 || {
    ((created_policy)) && rm -f "$policy"
    tail -n 30 "$BASE/apt.log" >&2
    die "apt-get install failed (full log: $BASE/apt.log)"
  }
  ((created_policy)) && rm -f "$policy"
  return 0
}

write_configs() {
  local cpus mem
  cpus=$(nproc)
  # slurmd -C reports what the node really has; keep 512 MB back for the daemons so the node never drains.
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  [[ -n "$mem" ]] || die "could not read RealMemory from 'slurmd -C'"
  mem=$((mem - 512))
  mkdir -p "$CONF_DIR"
  local old=""
  [[ -f "$CONF_DIR/slurm.conf" ]] && old=$(cat "$CONF_DIR/slurm.conf")
  cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credentials: a requeued job may start again ~10 s after it stopped instead of ~130 s.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that gives no --mem takes the whole node's memory and blocks every other job. Each CPU's
# share of the node: 1-CPU tasks (of one job, e.g. two gloo ranks, or of several jobs) always fit side by side.
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
# Pending jobs are looked at every 2-5 s (defaults 30/60 s): a requeued job restarts as soon as it may.
SchedulerParameters=bf_interval=5,sched_interval=2
JobRequeue=1
KillWait=5
MinJobAge=600
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# Jobs in 'urgent' preempt jobs in 'debug' by requeueing them (the preemption path of the requeue tests).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
  cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# Written by scripts/slurm_cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$BASE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  [[ "$(cat "$CONF_DIR/slurm.conf")" == "$old" ]] || CONF_CHANGED=1
}

start_munge() {
  if pid_alive /run/munge/munged.pid && munge -n | unmunge >/dev/null 2>&1; then return 0; fi
  log "starting munged"
  STARTED=1
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  # A fresh key each time munged starts: nothing else holds the old one, and no two machines share it.
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0700 /etc/munge /var/log/munge
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force || die "munged failed to start"
  wait_for 10 "munge" bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if mariadb-admin --socket="$DB_SOCKET" ping >/dev/null 2>&1; then return 0; fi
  log "starting MariaDB"
  STARTED=1
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if [[ ! -d "$BASE/mysql/mysql" ]]; then
    mkdir -p "$BASE/mysql" && chown mysql:mysql "$BASE/mysql"
    mariadb-install-db --user=mysql --datadir="$BASE/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOGS/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
  fi
  # mariadbd drops to the mysql user before it writes its pid and log files.
  touch "$LOGS/mariadb.log" && chown mysql:mysql "$LOGS/mariadb.log"
  # Test cluster: durability traded for start-up and table-creation speed.
  setsid nohup mariadbd --user=mysql --datadir="$BASE/mysql" --socket="$DB_SOCKET" --pid-file="$DB_PIDFILE" \
    --skip-networking --log-error="$LOGS/mariadb.log" --innodb-buffer-pool-size=64M \
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 >/dev/null 2>&1 </dev/null &
  wait_for 30 "MariaDB" mariadb-admin --socket="$DB_SOCKET" ping
  mariadb --socket="$DB_SOCKET" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" || die "could not create the accounting DB"
}

start_slurm() {
  if ((CONF_CHANGED)) && pid_alive "$BASE/slurmctld.pid"; then
    # Some settings (AuthInfo, node resources) only take effect on a restart; jobs survive it (state is saved).
    log "slurm.conf changed: restarting slurmctld and slurmd"
    STARTED=1
    stop_pidfile slurmd "$BASE/slurmd.pid"
    stop_pidfile slurmctld "$BASE/slurmctld.pid"
  fi
  if ! pid_alive "$BASE/slurmdbd.pid"; then
    log "starting slurmdbd"
    STARTED=1
    slurmdbd || die "slurmdbd failed to start"
  fi
  wait_for 30 "slurmdbd" sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
  fi
  if ! pid_alive "$BASE/slurmctld.pid"; then
    log "starting slurmctld"
    STARTED=1
    slurmctld || die "slurmctld failed to start"
  fi
  wait_for 20 "slurmctld" scontrol ping
  if ! pid_alive "$BASE/slurmd.pid"; then
    log "starting slurmd"
    STARTED=1
    slurmd || die "slurmd failed to start"
  fi
}

node_state() { sinfo -h -N -n "$NODE" -p debug -o %t 2>/dev/null | head -n 1; }

wait_idle() {
  local deadline=$((SECONDS + 40)) state
  while :; do
    state=$(node_state)
    case "$state" in
      idle | mix | alloc) break ;;
      down* | drain* | drng*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    ((SECONDS < deadline)) || die "node $NODE not idle after 40s (state: '${state:-none}')"
    sleep 0.5
  done
  # sacct answers once slurmctld has registered with slurmdbd.
  wait_for 30 "sacct" sacct -n -X -S now
}

cmd_up() {
  local t0=$SECONDS
  mkdir -p "$BASE" "$LOGS" "$BASE/state" "$BASE/spool"
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurm
  wait_idle
  if ((STARTED)); then
    log "up in $((SECONDS - t0))s: node $NODE is $(node_state); logs in $LOGS"
  else
    log "already up: node $NODE is $(node_state); logs in $LOGS"
  fi
}

stop_pidfile() {
  local name=$1 pidfile=$2
  pid_alive "$pidfile" || return 0
  local pid
  pid=$(cat "$pidfile")
  log "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.25
  done
  kill -9 "$pid" 2>/dev/null || true
}

cmd_down() {
  stop_pidfile slurmd "$BASE/slurmd.pid"
  stop_pidfile slurmctld "$BASE/slurmctld.pid"
  stop_pidfile slurmdbd "$BASE/slurmdbd.pid"
  stop_pidfile mariadb "$DB_PIDFILE"
  stop_pidfile munged /run/munge/munged.pid
  log "down"
}

cmd_status() {
  local rc=0
  for d in munged:/run/munge/munged.pid mariadb:$DB_PIDFILE slurmdbd:$BASE/slurmdbd.pid \
    slurmctld:$BASE/slurmctld.pid slurmd:$BASE/slurmd.pid; do
    if pid_alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"; else echo "${d%%:*}: stopped" && rc=1; fi
  done
  ((rc == 0)) && sinfo
  return $rc
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up | down | status" >&2
    exit 2
    ;;
esac
