#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the Slurm tests and for trying the
# launchers: munge + slurmctld + slurmd from Debian's packages, with a project-owned config.
#
#   bash scripts/setup_slurm.sh          # install (apt) if needed, write the config, start the daemons
#   export SLURM_CONF=/var/lib/megatron-vr1-slurm/etc/slurm.conf   # then sinfo, sbatch, ... use it
#
# Two partitions:
#   cpu   this machine (Default): jobs really run here (the tiny recipes).
#   h800  16 fake nodes of 8 GPUs in CLOUD state with power saving (Resume/SuspendProgram are
#         /bin/true), so the daemons never contact them: `sbatch --test-only` checks the 7B-72B
#         scripts against a real scheduler's view of an H800 partition.
#
# Idempotent and quick on reruns: apt runs only when a binary is missing; the daemons restart only
# when the written config differs from the one they run with (or one of them is down).
# Needs root (apt-get, daemons). Everything lives in $VR1_SLURM_DIR (default
# /var/lib/megatron-vr1-slurm): etc/ (slurm.conf, gres.conf), state/, spool/, log/.
set -euo pipefail

DIR=${VR1_SLURM_DIR:-/var/lib/megatron-vr1-slurm}
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF

if [[ $(id -u) != 0 ]]; then
  echo "setup_slurm: needs root (apt-get install, slurmctld/slurmd); run it with sudo" >&2
  exit 1
fi

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  echo "setup_slurm: installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  }
fi

# ---------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1k count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { echo "setup_slurm: munged does not answer" >&2; exit 1; }
fi

# ---------------------------------------------------------------- config
HOST=$(hostname -s)
CPUS=$(nproc --all)  # not nproc: it follows OMP_NUM_THREADS
# RealMemory: what the machine has, minus 10 % (slurmd refuses a node that claims more than it has)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log"

NEW=$(mktemp)
cat >"$NEW" <<EOF
# Written by scripts/setup_slurm.sh (megatron-vr1): a local test cluster. Do not edit: rerun the script.
ClusterName=vr1local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once its old credential expired: keep that short (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups in containers: track processes by parent pid, no task binding or memory enforcement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
GresTypes=gpu
JobRequeue=1
ReturnToService=2
# Completed jobs stay visible to scontrol for 10 minutes (no slurmdbd, so no sacct here).
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=defer_batch=0
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
# Power saving for the fake H800 nodes: never resumed for real (--test-only only).
SuspendProgram=/bin/true
ResumeProgram=/bin/true
SuspendTime=600
ResumeTimeout=300
SuspendTimeout=30
# Never the local node: suspended after 10 idle minutes (the test suite reaches the Slurm tests
# ~25 minutes after set-up) it would "power up" through /bin/true and wait ResumeTimeout for a
# registration its slurmd never sends again, with jobs stuck in CONFIGURING.
SuspendExcNodes=$HOST
TreeWidth=64
# Show the powered-down cloud nodes in sinfo/scontrol.
PrivateData=cloud
MailProg=/bin/true
MpiDefault=none

NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# H800 nodes as a lab has them: 2 x 56 cores, 2 TB, 8 GPUs of 80 GB.
NodeName=h800-[01-16] CPUs=112 Sockets=2 CoresPerSocket=56 ThreadsPerCore=1 RealMemory=2000000 Gres=gpu:8 State=CLOUD Feature=h800

PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=h800 Nodes=h800-[01-16] MaxTime=7-00:00:00 State=UP
EOF
NEW_GRES=$(mktemp)
cat >"$NEW_GRES" <<EOF
# Written by scripts/setup_slurm.sh: the fake H800 nodes' GPUs (never probed).
AutoDetect=off
NodeName=h800-[01-16] Name=gpu File=/dev/nvidia[0-7]
EOF

changed=0
cmp -s "$NEW" "$CONF" || { mv "$NEW" "$CONF"; changed=1; }
cmp -s "$NEW_GRES" "$DIR/etc/gres.conf" || { mv "$NEW_GRES" "$DIR/etc/gres.conf"; changed=1; }
rm -f "$NEW" "$NEW_GRES"
chmod 644 "$CONF" "$DIR/etc/gres.conf"

# ---------------------------------------------------------------- daemons
alive() {  # alive PIDFILE
  [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}
stop() {  # stop PIDFILE: the daemon we started (by its pid file), never by name
  if alive "$1"; then
    local pid
    pid=$(cat "$1")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$1"
}
if ((changed)) || ! alive "$DIR/slurmctld.pid" || ! alive "$DIR/slurmd.pid"; then
  stop "$DIR/slurmd.pid"
  stop "$DIR/slurmctld.pid"
  # -c: start clean (no saved jobs/nodes from an older config); -i: ignore errors in state files
  /usr/sbin/slurmctld -f "$CONF" -c -i
  /usr/sbin/slurmd -f "$CONF"
fi

# Wait until the local node can take jobs (fail with the log tail if it never does).
for _ in $(seq 150); do
  state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null || true)
  # (a ~ or # suffix is a powered-down or powering-up node: not ready)
  [[ ($state == idle* || $state == mix* || $state == alloc*) && $state != *[~#%] ]] && break
  if [[ $state == down* || $state == drain* ]]; then
    scontrol update nodename="$HOST" state=resume 2>/dev/null || true
  fi
  sleep 0.2
done
state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null || true)
if [[ ($state != idle* && $state != mix* && $state != alloc*) || $state == *[~#%] ]]; then
  echo "setup_slurm: node $HOST is '${state:-unreachable}', not idle; logs:" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
fi
echo "setup_slurm: ok (SLURM_CONF=$CONF; partitions: $(sinfo -h -o '%P' | tr '\n' ' '))"
