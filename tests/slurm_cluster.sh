#!/usr/bin/env bash
# Starts (or reuses) a one-node SLURM cluster on this machine, for tests/test_sbatch.py and CI.
#   bash tests/slurm_cluster.sh start    # idempotent: installs slurm-wlm + munge if missing (root + apt-get), writes
#                                        # /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd; waits for an idle node
#   bash tests/slurm_cluster.sh status   # exit 0 when the node answers and is usable
#   bash tests/slurm_cluster.sh check    # harness self-test: a trivial batch job gets USR1 in its trap, requeues itself
#                                        # and comes back with SLURM_RESTART_COUNT=1
#   bash tests/slurm_cluster.sh stop     # stops the daemons this script started
# Exit status 0: ready. Exit status 2: SLURM cannot run here; the last line on stderr says why (tests skip with it).
# State, spool and logs live under $QLORA_SLURM_DIR (default /tmp/qlora-slurm). It refuses to overwrite a slurm.conf
# that it did not write and does not submit to a cluster it did not configure (QLORA_TEST_SLURM=any allows that).
set -euo pipefail
ROOT=${QLORA_SLURM_DIR:-/tmp/qlora-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by qlora tests/slurm_cluster.sh"

on_error() { cannot "line $1: ${BASH_COMMAND%%$'\n'*} failed"; }  # BASH_COMMAND: the command that failed
cannot() { echo "slurm_cluster: cannot start a local SLURM cluster: $*" >&2; exit 2; }
log() { echo "slurm_cluster: $*" >&2; }

node_ready() {  # the node answers and is idle, mixed or allocated (not down/drained)
  local state
  state=$(timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -n1) || return 1
  [[ $state =~ ^(idle|mix|alloc|comp)$ ]]
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || cannot "slurm-wlm/munge are not installed and this is not root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
  log "installing slurm-wlm and munge (apt-get)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
         >"${TMPDIR:-/tmp}/qlora-slurm-apt.log" 2>&1; then
    cannot "apt-get install slurm-wlm munge failed (no network to the package registry?): $(tail -n1 "${TMPDIR:-/tmp}/qlora-slurm-apt.log")"
  fi
  # test_sbatch.py lints the shell scripts with shellcheck when it is installed; optional.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null 2>&1 ||
    log "shellcheck not installed (optional)"
}

start_munge() {
  if pgrep -x munged >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  # Started as root (as on the Debian CI machine, without systemd); --force accepts the package's munge-owned dirs.
  munged --force 2>/dev/null || cannot "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  cannot "munged started but munge -n | unmunge fails"
}

write_conf() {
  if [ -f "$CONF" ] && ! ours; then
    cannot "$CONF exists and was not written by this script; not overwriting a site configuration"
  fi
  local host node_line
  host=$(hostname -s)
  # slurmd -C prints this machine's real CPUs/sockets/cores/memory; a node declared larger than it is gets drained.
  node_line=$(slurmd -C | head -n1)
  [[ $node_line == NodeName=* ]] || cannot "slurmd -C printed no node line: $node_line"
  mkdir -p "$ROOT"/{state,spool,log} /etc/slurm
  cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=qloratest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MinJobAge=600
KillWait=10
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$CONF.tmp" "$CONF"
}

ours() { [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; }

# A running test cluster of ours may still hold jobs of an interrupted earlier test run; on a one-node cluster they
# would keep every new job pending. Cancel them and wait until the node is free again.
clear_stale_jobs() {
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  [ -n "${jobs// /}" ] || return 0
  log "cancelling jobs left from an earlier run: $jobs"
  # shellcheck disable=SC2086  # one job id per word
  scancel $jobs 2>/dev/null || true
  for _ in $(seq 120); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && [[ $(sinfo -h -N -o '%t' | head -n1) == idle ]] && return 0
    sleep 0.5
  done
  # Not a limit of this machine but a broken cluster: fail (exit 1) rather than let the tests skip.
  echo "slurm_cluster: jobs of an earlier run did not go away: $(squeue -h 2>&1 | head -n3 | tr '\n' ' ')" >&2
  exit 1
}

start() {
  if [ -f "$CONF" ] && ! ours && [ "${QLORA_TEST_SLURM:-}" != any ]; then
    # A site cluster (e.g. a Raven login node): test jobs would go to its queue. QLORA_TEST_SLURM=any allows it.
    cannot "$CONF belongs to a site cluster, not to this script; not submitting test jobs to it"
  fi
  if command -v sinfo >/dev/null && node_ready; then
    log "reusing the running cluster"
    ! ours || clear_stale_jobs
    return 0
  fi
  [ "$(id -u)" = 0 ] || cannot "not root (the daemons must run as root here)"
  install_packages
  start_munge
  write_conf
  if ! pgrep -x slurmctld >/dev/null; then
    # -c: start from empty state. Without it slurmctld recovers the jobs of an earlier run from $ROOT/state (e.g.
    # one that was running when the machine's processes were killed); such a job keeps the only node allocated and
    # every new test job then waits on "Resources" (seen in CI).
    slurmctld -c -i || cannot "slurmctld did not start: $(tail -n3 "$ROOT/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
  fi
  if ! pgrep -x slurmd >/dev/null; then
    slurmd -c || cannot "slurmd did not start: $(tail -n3 "$ROOT/log/slurmd.log" 2>/dev/null | tr '\n' ' ')"
  fi
  for _ in $(seq 60); do
    if node_ready; then log "node $(hostname -s) is $(sinfo -h -N -o '%t' | head -n1)"; return 0; fi
    sleep 0.5
  done
  # A node left down/drained by an earlier run comes back with an explicit resume.
  scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
  for _ in $(seq 20); do node_ready && return 0; sleep 0.5; done
  cannot "the node did not become idle: $(sinfo -h -N -o '%N %t %E' 2>&1 | head -n1); see $ROOT/log/"
}

stop() {
  local f pid
  for f in "$ROOT/slurmd.pid" "$ROOT/slurmctld.pid"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

# Self-test of the mechanics finetune.sbatch relies on: `--signal`/`scancel --signal=USR1 --batch` reaches a trap in
# the batch shell while it waits on a background child, `scontrol requeue` from inside the job requeues it, the
# requeued job (hold lifted with StartTime=now) sees SLURM_RESTART_COUNT=1 and the output file is appended to.
check() {
  start
  local dir jobid state out
  dir=$(mktemp -d "${TMPDIR:-/tmp}/slurm-check.XXXXXX")
  cat >"$dir/job.sh" <<'EOF'
#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
echo "start restart_count=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo "done after requeue"; exit 0; fi
got=0
trap 'got=1; echo "trap USR1"' USR1
sleep 300 & child=$!
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true
  if [ "$got" = 1 ]; then kill "$child"; echo "requeueing"; scontrol requeue "$SLURM_JOB_ID"; exit 0; fi
done
EOF
  jobid=$(sbatch --parsable --chdir="$dir" --output="$dir/out.log" "$dir/job.sh")
  for _ in $(seq 60); do grep -q "^start" "$dir/out.log" 2>/dev/null && break; sleep 0.5; done
  sleep 1
  scancel --signal=USR1 --batch "$jobid"
  for _ in $(seq 60); do
    state=$(scontrol show job "$jobid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    [ "$(grep -c '^start' "$dir/out.log")" -ge 1 ] && [[ $state == PENDING ]] && break
    sleep 0.5
  done
  # lift the ~2-minute requeue hold only once the node has finished the old instance (else: "Job credential revoked")
  for _ in $(seq 120); do [[ $(sinfo -h -N -o '%t' | head -n1) == idle ]] && break; sleep 0.5; done
  sleep 2  # and not within the second of the requeue: credential times are compared in whole seconds
  scontrol update JobId="$jobid" StartTime=now
  for _ in $(seq 120); do
    state=$(scontrol show job "$jobid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    [[ $state == COMPLETED ]] && break
    sleep 0.5
  done
  out=$(cat "$dir/out.log")
  if [[ $state == COMPLETED ]] && grep -q "trap USR1" <<<"$out" && grep -q "start restart_count=1" <<<"$out" \
     && grep -q "done after requeue" <<<"$out"; then
    echo "slurm_cluster: check passed (job $jobid: USR1 trapped, requeued, restarted with SLURM_RESTART_COUNT=1)"
    rm -rf "$dir"
  else
    echo "slurm_cluster: check FAILED (job $jobid state $state); its output:" >&2; echo "$out" >&2; exit 1
  fi
}

case "${1:-start}" in
  # Any other failure while starting is also this machine's limit (tests skip, showing the command that failed).
  start) set -E; trap 'on_error $LINENO' ERR; start ;;
  stop) stop ;;
  status) command -v sinfo >/dev/null && node_ready ;;
  check) check ;;
  *) echo "usage: $0 start|status|check|stop" >&2; exit 64 ;;
esac
