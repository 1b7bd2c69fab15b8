#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, and cl-bidsapp run through it the way users do.
#
#   .ci/slurm.sh               the CI stages (each prints its duration):
#                              install slurm-wlm + munge, start the cluster, a 3-participant
#                              phantom dataset (sub-03's UNI deliberately truncated) through
#                              `cl-bidsapp-slurm submit --wait` (array, then the group job),
#                              check sub-03 is reported failed and the group job ran after the
#                              array, then Nipype's SLURM plugin (--use-plugin) on one subject;
#                              the daemons are stopped by PID whatever happens.
#   .ci/slurm.sh start DIR     start a cluster whose config, key, state and logs live in DIR;
#                              prints the SLURM_CONF to export (tests use this)
#   .ci/slurm.sh stop DIR      stop it (by the PID files in DIR)
#
# Needs root (SlurmUser=root, no systemd, no cgroups: proctrack/linuxproc, task/none).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}

free_port() {
  "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

start_cluster() {  # start_cluster DIR
  local dir; dir=$(realpath -m "$1")
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 0755 "$dir" "$dir/munge"       # munged refuses a socket folder that is not o+x
  if [ ! -s "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 0400 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  local mem_mb; mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  local cpus; cpus=$(getconf _NPROCESSORS_ONLN)   # not nproc: it obeys OMP_NUM_THREADS
  cat > "$dir/slurm.conf" <<EOF
ClusterName=clci
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N localhost
  local i
  for i in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -q -E '^(idle|mix|alloc)'; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "the SLURM node did not come up; logs:" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  stop_cluster "$dir"
  return 1
}

stop_cluster() {  # stop_cluster DIR: cancel what still runs, then every daemon by its PID file
  local dir=$1 pidfile pid i
  if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    # jobs first: slurmd reaps their slurmstepd processes only while it runs
    SLURM_CONF=$dir/slurm.conf scancel --quiet --full --user "$(id -un)" 2>/dev/null || true
    for i in $(seq 1 50); do
      [ -z "$(SLURM_CONF=$dir/slurm.conf squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

case "${1:-ci}" in
  start) start_cluster "${2:?usage: .ci/slurm.sh start DIR}"; exit ;;
  stop) stop_cluster "${2:?usage: .ci/slurm.sh stop DIR}"; exit ;;
  ci) ;;
  *) echo "usage: .ci/slurm.sh [start DIR | stop DIR]" >&2; exit 64 ;;
esac

# ----------------------------------------------------------------------------- CI stages
T_START=$(date +%s)
SCRATCH=${CL_CI_SCRATCH:-$(mktemp -d /tmp/cl-slurm.XXXXXX)}
CLUSTER=$SCRATCH/cluster
export PATH=$ROOT/.venv/bin:$PATH
export OMP_NUM_THREADS=1
export LOGNAME=${LOGNAME:-${USER:-$(id -un)}}   # Nipype's SLURM plugin needs it (CI has none)
# offline: the group level's template is the marked stand-in (see docs/containers.md)
export TEMPLATEFLOW_HOME=$SCRATCH/templateflow

stage() {  # stage NAME COMMAND...
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "::: slurm: ${name}"
  "$@"
  echo "::: slurm: ${name} took $(( $(date +%s) - t0 )) s"
}

cleanup() {
  local rc=$?
  stop_cluster "$CLUSTER"
  if [ "$rc" != 0 ] && [ -d "$CLUSTER/log" ]; then tail -n 15 "$CLUSTER"/log/*.log || true; fi
  [ "${CL_CI_KEEP:-0}" = 1 ] && echo "kept $SCRATCH" || rm -rf "$SCRATCH"
  exit "$rc"
}
trap cleanup EXIT

install_slurm() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
  slurmctld -V
}

cluster() {
  eval "$(start_cluster "$CLUSTER")"
  sinfo
}

phantoms() {  # 3 participants; sub-03's UNI cut in half so that its participant level fails
  "$PY" -m cl_bidsapp.hpc.templates seed "$TEMPLATEFLOW_HOME" --source stand-in
  cl-bidsapp-simulate "$SCRATCH/bids" --n-subjects 3 --voxel-size 2 --seed 1
  local uni; uni=$(ls "$SCRATCH"/bids/sub-03/anat/*_UNIT1.nii.gz)
  head -c "$(( $(stat -c %s "$uni") / 2 ))" "$uni" > "$uni.part" && mv "$uni.part" "$uni"
  "$PY" -c "from cl_bidsapp.models.testing import make_tiny_model as m; print(m('$SCRATCH/model', folds=(0,), patch=(32, 32, 32), features=(4, 8, 16)))" \
    > "$SCRATCH/model.path"
  ls "$SCRATCH"/bids
}

APP_OPTS=()
array_and_group() {
  APP_OPTS=(--model "$(cat "$SCRATCH/model.path")" --no-tta --skip-bids-validation
            --omp-nthreads 1)
  local rc=0
  # a work folder with a space: sbatch must get its #SBATCH paths quoted
  cl-bidsapp-slurm submit "$SCRATCH/bids" "$SCRATCH/out" -w "$SCRATCH/work dir" \
    --cpus-per-task 1 --mem 3G --time 30:00 --wait --poll 1 -- "${APP_OPTS[@]}" \
    | tee "$SCRATCH/report.txt" || rc=$?
  [ "$rc" = 1 ] || { echo "expected exit 1 (one participant failed), got $rc" >&2; return 1; }
}

check_report() {
  local report=$SCRATCH/report.txt job_dir
  grep -E '^  ok +sub-01$' "$report"
  grep -E '^  ok +sub-02$' "$report"
  grep -E '^  FAILED +sub-03 +exit 65' "$report"
  grep -E '^1 of 3 participant\(s\) failed: 03$' "$report"
  job_dir=$(sed -n 's/^job folder: //p' "$report")
  # the group job started only after every array task had finished
  "$PY" - "$job_dir" <<'EOF'
import json, sys
from pathlib import Path
status = Path(sys.argv[1]) / "status"
tasks = [json.loads(p.read_text()) for p in status.glob("sub-*.json")]
group = json.loads((status / "group.json").read_text())
assert len(tasks) == 3, tasks
last = max(t["finished"] for t in tasks)
assert group["started"] >= last, (group, last)
print(f"group job started {group['started']} after the last task ended {last}; "
      f"group exit code {group['exit_code']}")
EOF
  local group_code
  group_code=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['exit_code'])" \
    "$job_dir/status/group.json")
  if [ "$group_code" = 64 ] && grep -q "not available yet" "$job_dir"/logs/group-*.log; then
    echo "NOTE: this version has no group level yet; the group job ran, in order"
  elif [ "$group_code" != 0 ]; then
    echo "the group level failed (exit $group_code):" >&2
    cat "$job_dir"/logs/group-*.log >&2
    return 1
  else
    grep -E 'group level \(job [0-9]+\): ok' "$report" || cl-bidsapp-slurm status "$job_dir" \
      | grep -E 'group level \(job [0-9]+\): ok'
  fi
  ls "$SCRATCH"/out/sub-01/anat/*_seg-CL_dseg.nii.gz "$SCRATCH"/out/sub-02/anat/*_seg-CL_dseg.nii.gz
}

nipype_plugin() {  # Nipype's own SLURM plugin: every workflow node becomes a SLURM job
  cat > "$SCRATCH/slurm-plugin.yml" <<EOF
plugin: SLURM
plugin_args:
  sbatch_args: --cpus-per-task=1 --mem=3G --time=30:00
  max_jobs: 4
EOF
  cl-bidsapp "$SCRATCH/bids" "$SCRATCH/out-plugin" participant --participant-label 01 \
    -w "$SCRATCH/work-plugin" --use-plugin "$SCRATCH/slurm-plugin.yml" "${APP_OPTS[@]}"
  ls "$SCRATCH"/out-plugin/sub-01/anat/*_seg-CL_dseg.nii.gz
  local n; n=$(find "$SCRATCH/work-plugin" -name 'slurm-*.out' | wc -l)
  echo "Nipype submitted $n SLURM job(s)"
  [ "$n" -gt 0 ]
}

stage "install slurm-wlm and munge" install_slurm
stage "start a one-node cluster" cluster
stage "3-participant phantom dataset (sub-03 broken)" phantoms
stage "cl-bidsapp-slurm: array + group job" array_and_group
stage "failure report and job order" check_report
stage "Nipype SLURM plugin on one subject" nipype_plugin
echo "::: slurm: total $(( $(date +%s) - T_START )) s"
