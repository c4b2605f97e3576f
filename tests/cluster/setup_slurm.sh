#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the end-to-end test of
# mriflow through Nipype's SLURM plugin (tests/cluster/test_slurm.py).
#
# Installs Debian's slurm-wlm and munge when missing (needs root and apt),
# writes a minimal slurm.conf for localhost, starts munged, slurmctld and
# slurmd, and returns once the node is idle and `sbatch --wait` ran a job.
# Idempotent: daemons already running are kept when the config is unchanged,
# restarted when it changed.
#
# Environment (all optional):
#   SLURM_CONF_DIR      where slurm.conf goes          (default /etc/slurm)
#   SLURM_STATE_DIR     spool, logs, job completion log (default /var/lib/mriflow-slurm)
#   SLURM_WAIT_SECONDS  how long to wait for the node   (default 60)
#
# The job completion log (one line per finished job, JobCompType=jobcomp/filetxt)
# is $SLURM_STATE_DIR/jobcomp.log; the test reads it to prove the jobs ran in Slurm.
set -euo pipefail

CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
STATE_DIR="${SLURM_STATE_DIR:-/var/lib/mriflow-slurm}"
WAIT_SECONDS="${SLURM_WAIT_SECONDS:-60}"
CONF="$CONF_DIR/slurm.conf"

say() { echo "setup_slurm: $*"; }
die() { echo "setup_slurm: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, runs slurmd as root)"

# --- 1. packages --------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- 2. munge -----------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating a munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    # a stale pid/socket from a killed munged makes the new one refuse to start
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- 3. slurm.conf ------------------------------------------------------------
NODE="$(hostname -s)"
# CPUs and memory as slurmd sees them, so the node does not drain for a mismatch
HW="$(slurmd -C | head -n 1)"
CPUS="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")"
MEM="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")"
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "cannot read CPUs/RealMemory from 'slurmd -C': $HW"

install -d -m 0755 "$CONF_DIR" "$STATE_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$STATE_DIR/log"
NEW_CONF="$(mktemp)"
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
# Written by mriflow tests/cluster/setup_slurm.sh: a one-node test cluster.
ClusterName=mriflow
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups in a container: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
# CPUs are the consumable; memory is not, so small jobs share the node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no accounting daemon; one line per finished job in a text file
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.log
# quick turnover for many short jobs
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
    cp "$NEW_CONF" "$CONF"
    chmod 0644 "$CONF"
    CHANGED=1
    say "wrote $CONF (node $NODE, CPUs=$CPUS, RealMemory=$MEM MB)"
fi
# the Debian slurmd wants a cgroup.conf only for cgroup plugins; none used here

# --- 4. daemons ---------------------------------------------------------------
running() { pgrep -x "$1" >/dev/null; }
stop_daemon() {  # by the pid the daemon wrote, never by name
    local pidfile="$STATE_DIR/$1.pid"
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "stopping $1 (config changed)"
        kill "$(cat "$pidfile")"
        for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    fi
}
if [ "$CHANGED" -eq 1 ]; then
    stop_daemon slurmd
    stop_daemon slurmctld
fi
if ! running slurmctld; then
    say "starting slurmctld"
    # -c: clean start, no saved job state from an older config
    slurmctld -c -f "$CONF"
fi
if ! running slurmd; then
    say "starting slurmd"
    slurmd -c -f "$CONF"
fi

# --- 5. wait until the node takes jobs -----------------------------------------
export SLURM_CONF="$CONF"
deadline=$((SECONDS + WAIT_SECONDS))
state=""
while [ $SECONDS -lt $deadline ]; do
    state="$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*)
            # a node left down by an earlier start: return it to service
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) die "node $NODE is '${state:-unknown}' after ${WAIT_SECONDS}s; logs in $STATE_DIR/log" ;;
esac
say "node $NODE is $state"

probe="$STATE_DIR/probe.out"
rm -f "$probe"
if ! timeout "$WAIT_SECONDS" sbatch --wait --quiet -J mriflow-probe -o "$probe" \
        --wrap 'echo "ran on $(hostname -s) as job $SLURM_JOB_ID"' >/dev/null; then
    die "a trivial 'sbatch --wait' job did not finish; logs in $STATE_DIR/log"
fi
grep -q "ran on" "$probe" || die "the probe job wrote no output ($probe)"
say "$(cat "$probe")"
say "ready: SLURM_CONF=$CONF, job completion log $STATE_DIR/jobcomp.log"
