#!/usr/bin/env bash
# Run one training job as N processes on this machine, the way N hosts of a TPU slice run it:
# each process is `python -m lstm_jax.main` with the same flags plus its place in the job.
# For trying the multi-host path without a pod, and for tests/test_multihost.py.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh N [--dry-run] [lstm_jax.main flags...]

Starts N processes of `python -m lstm_jax.main FLAGS` on this machine, joined into one job
through JAX's distributed runtime on 127.0.0.1 (CPU devices, gloo collectives). Each process
gets --coordinator_address, --num_processes and --process_id; process 0's coordinator listens
on 127.0.0.1 only (--coordinator_bind_address), so no other machine can join the job.
Process 0 writes to this terminal; the others (warnings and errors only) to
LOG_DIR/process-I.log. If one process fails, the others are stopped. SIGTERM or Ctrl-C to
this script is passed to every process: they stop after the same step, save, and exit;
running the same command again resumes.

Options:
  --dry-run   print the commands (with their environment) instead of running them
  -h, --help  this text

Environment (checked before anything starts; a bad value is one line and exit code 2):
  DEVICES_PER_PROCESS  CPU devices per process, a positive number (default 1)
  PORT                 coordinator port on 127.0.0.1, 1..65535 (default: a free one)
  LOG_DIR              where processes 1..N-1 log, a folder this script can create or write to
                       (default: a new temporary folder)
  PYTHON               interpreter, a command or an executable file (default: python3)

Example: 2 processes x 2 devices = a global batch over 4 devices
  DEVICES_PER_PROCESS=2 launch/local.sh 2 --flagfile=experiments/smoke.flags --workdir=/tmp/mh
EOF
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0
  exit 2
fi
num_processes=$1
shift
[[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
  die "N must be a positive number of processes, got '$num_processes'"
dry_run=false
main_flags=()
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    *) main_flags+=("$arg") ;;
  esac
done

python=${PYTHON:-python3}
devices=${DEVICES_PER_PROCESS:-1}
log_dir=${LOG_DIR:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The environment, checked here: a bad value would otherwise fail in every process (a traceback
# for DEVICES_PER_PROCESS=x2, a segfault for 0 or for a port JAX cannot listen on).
[[ $devices =~ ^[1-9][0-9]{0,3}$ ]] ||
  die "DEVICES_PER_PROCESS must be a positive number of CPU devices (1..9999), got '$devices'"
if [[ -n ${PORT:-} ]] && ! [[ $PORT =~ ^[1-9][0-9]{0,4}$ && $PORT -le 65535 ]]; then
  die "PORT must be a port number in 1..65535, got '$PORT'"
fi
type -P "$python" >/dev/null ||
  die "PYTHON must be an interpreter on PATH or an executable file, got '$python'"
if [[ -n $log_dir ]]; then
  # The nearest folder that exists must be one this script can write to (the rest is created).
  existing=$log_dir
  while [[ ! -e $existing ]]; do
    case $existing in
      */*) existing=${existing%/*}; existing=${existing:-/} ;;
      *) existing=. ;;
    esac
  done
  [[ -d $existing && -w $existing ]] ||
    die "LOG_DIR must be a folder this script can create or write to, got '$log_dir'" \
      "('$existing' is not a writable folder)"
fi

if [[ -z ${PORT:-} ]]; then
  if $dry_run; then
    PORT=PORT
  else
    PORT=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
if [[ -z $log_dir ]]; then
  if $dry_run; then log_dir=LOG_DIR; else log_dir=$(mktemp -d -t lstm_jax_local.XXXXXX); fi
fi

# The project from this checkout, whether or not it is pip-installed.
process_env=(
  "PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}"
  JAX_PLATFORMS=cpu
  "JAX_NUM_CPU_DEVICES=$devices"
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
)

command_for() {
  local id=$1
  command=(env "${process_env[@]}" "$python" -m lstm_jax.main
    "--coordinator_address=127.0.0.1:$PORT" "--coordinator_bind_address=127.0.0.1:$PORT"
    "--num_processes=$num_processes" "--process_id=$id"
    ${main_flags[@]+"${main_flags[@]}"})
}

if $dry_run; then
  for ((id = 0; id < num_processes; id++)); do
    command_for "$id"
    printf '%q ' "${command[@]}"
    if ((id > 0)); then printf '> %q 2>&1 &' "$log_dir/process-$id.log"; else printf '&'; fi
    printf '\n'
  done
  exit 0
fi

# Checked above as far as a dry run can; now for real (a read-only file system, say).
probe=
if ! mkdir -p "$log_dir" 2>/dev/null ||
  ! probe=$(mktemp "$log_dir/.write-test.XXXXXX" 2>/dev/null); then
  die "LOG_DIR must be a folder this script can create or write to, got '$log_dir'"
fi
rm -f "$probe"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
# A signal to this script becomes a SIGTERM to every process: JAX's preemption notice, so they
# all stop after the same step and save.
trap 'stop_all' TERM INT

for ((id = 0; id < num_processes; id++)); do
  command_for "$id"
  if ((id == 0)); then
    "${command[@]}" &
  else
    "${command[@]}" >"$log_dir/process-$id.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "local.sh: $num_processes processes (pids ${pids[*]}), $devices CPU device(s) each," \
  "coordinator 127.0.0.1:$PORT; processes 1..$((num_processes - 1)) log to $log_dir" >&2

remaining=$num_processes
while ((remaining > 0)); do
  finished_pid=
  status=0
  wait -n -p finished_pid || status=$?
  if [[ -z $finished_pid ]]; then
    # No process ended: a signal to this script interrupted the wait (the trap passed it on),
    # or none is left. Keep waiting while they save and exit.
    if ((status == 127)); then break; fi
    continue
  fi
  remaining=$((remaining - 1))
  if ((status != 0)); then
    echo "local.sh: process pid $finished_pid failed with exit code $status;" \
      "stopping the others." >&2
    stop_all
    wait || true
    for ((id = 1; id < num_processes; id++)); do
      echo "--- $log_dir/process-$id.log (last lines) ---" >&2
      tail -n 20 "$log_dir/process-$id.log" >&2 || true
    done
    exit "$status"
  fi
done
exit 0
