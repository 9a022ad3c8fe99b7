#!/usr/bin/env bash
# Cloud TPU VM slices for lstm_jax, with gcloud: create a slice (a queued resource), set it up,
# run the same training command on every host, follow its log, stop it, delete the slice, and
# supervise a spot slice (recreate it when preempted, run the same command again to resume).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [options] [-- lstm_jax.main flags...]

Commands:
  create     request the slice as a queued resource and wait until it is ACTIVE
  setup      copy this checkout to every host and install it (Python 3.11 venv, jax[tpu], gcsfs)
  run        run `python -m lstm_jax.main FLAGS --workdir=WORKDIR` on every host (--worker=all);
             streams the log (process 0 speaks; the other hosts print warnings only). JAX
             finds the slice's hosts itself; process 0's coordinator listens only on worker
             0's internal IP (from the metadata server), port --coordinator-port
  logs       follow the training log of one host (--worker, default 0)
  stop       SIGTERM to the training process on every host: all stop after the same step,
             save a checkpoint and exit (run again to resume)
  status     print the queued resource's state
  delete     delete the slice (queued resource and TPU VMs); checkpoints on gs:// stay
  supervise  keep a run going until it finishes: create the slice if missing, set it up, run;
             when the slice is preempted (spot), delete it, create it again, set it up and run
             the same command, which resumes from the latest checkpoint in WORKDIR

Options (each may also come from the environment variable in brackets):
  --name NAME              queued resource and TPU VM name [TPU_NAME] (default: lstm-jax)
  --zone ZONE              [TPU_ZONE] (default: us-central2-b)
  --project PROJECT        [TPU_PROJECT] (default: gcloud's configured project)
  --accelerator-type TYPE  [TPU_ACCELERATOR_TYPE] (default: v4-16, 2 hosts x 4 chips)
  --runtime-version V      TPU VM image [TPU_RUNTIME_VERSION] (default: tpu-ubuntu2204-base,
                           for v4 and v5p; v5e: v2-alpha-tpuv5-lite; v6e: v2-alpha-tpuv6e)
  --network-tag TAG        (create) network tag of the slice's hosts, for firewall rules
                           [TPU_NETWORK_TAG] (default: lstm-jax; see docs/tpu.md)
  --spot                   spot capacity: much cheaper, may be preempted at any time
  --on-demand              on-demand capacity (the default)
  --workdir gs://B/PATH    [TPU_WORKDIR] run folder for run/supervise; must be on gs://, which
                           every host reads and writes (checkpoints, metrics.jsonl, flags.txt)
  --python PYTHON          interpreter for the venv on the hosts, python3 or python3.X
                           [TPU_PYTHON] (default: python3.11, installed with apt if missing)
  --coordinator-port PORT  (run, supervise) the port of JAX's coordinator on worker 0, 1..65535
                           [TPU_COORDINATOR_PORT] (default: 8482, JAX's own)
  --detach                 (run) start in the background on every host and return at once
  --worker N               (logs) which host's log to follow (default: 0)
  --max-failures N         (supervise) give up after N failed runs on a live slice (default: 3)
  --poll-seconds S         (create, supervise) seconds between state checks (default: 60)
  --dry-run                print the commands instead of running them
  -h, --help               this text

Example (2 hosts, spot, supervised; training flags after --):
  launch/tpu.sh supervise --spot --zone=us-central2-b --accelerator-type=v4-16 \
      --workdir=gs://my-bucket/dracula -- --hidden=512
EOF
}

# --- Options -------------------------------------------------------------------------------

name=${TPU_NAME:-lstm-jax}
zone=${TPU_ZONE:-us-central2-b}
project=${TPU_PROJECT:-}
accelerator_type=${TPU_ACCELERATOR_TYPE:-v4-16}
runtime_version=${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}
workdir=${TPU_WORKDIR:-}
remote_python=${TPU_PYTHON:-python3.11}
coordinator_port=${TPU_COORDINATOR_PORT:-8482}
network_tag=${TPU_NETWORK_TAG:-lstm-jax}
spot=false
detach=false
dry_run=false
worker=0
max_failures=3
poll_seconds=60
main_flags=()

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
case $1 in
  -h | --help) usage; exit 0 ;;
  create | setup | run | logs | stop | status | delete | supervise) command=$1; shift ;;
  *) die "unknown command '$1'; see launch/tpu.sh --help" ;;
esac

while [[ $# -gt 0 ]]; do
  option=$1
  value=
  if [[ $option == --*=* ]]; then
    value=${option#*=}
    option=${option%%=*}
  fi
  takes_value=true
  case $option in
    --spot | --on-demand | --detach | --dry-run | -h | --help | --) takes_value=false ;;
  esac
  if $takes_value && [[ $1 != *=* ]]; then
    [[ $# -ge 2 ]] || die "$option needs a value"
    value=$2
    shift
  fi
  shift
  case $option in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --project) project=$value ;;
    --accelerator-type) accelerator_type=$value ;;
    --runtime-version) runtime_version=$value ;;
    --workdir) workdir=$value ;;
    --python) remote_python=$value ;;
    --coordinator-port) coordinator_port=$value ;;
    --network-tag) network_tag=$value ;;
    --worker) worker=$value ;;
    --max-failures) max_failures=$value ;;
    --poll-seconds) poll_seconds=$value ;;
    --spot) spot=true ;;
    --on-demand) spot=false ;;
    --detach) detach=true ;;
    --dry-run) dry_run=true ;;
    -h | --help) usage; exit 0 ;;
    --) main_flags=("$@"); break ;;
    *) die "unknown option '$option' (training flags go after --); see launch/tpu.sh --help" ;;
  esac
done

for flag in ${main_flags[@]+"${main_flags[@]}"}; do
  # After --, it would reach lstm_jax.main while the commands really run.
  [[ $flag == --dry-run ]] && die "--dry-run goes before --, with the launch options"
done
# Options and their environment variables, checked before any gcloud command: one line each.
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and -"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die "--zone must be a zone such as us-central2-b, got '$zone'"
[[ -z $project || $project =~ ^[a-z][-a-z0-9.:]*[a-z0-9]$ ]] ||
  die "--project must be a project ID (lower-case letters, digits and -), got '$project'"
[[ $accelerator_type =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator-type must be a TPU type such as v4-16 or v5litepod-8, got '$accelerator_type'"
[[ $runtime_version =~ ^[a-z0-9][-a-z0-9.]*$ ]] ||
  die "--runtime-version must be a TPU VM image such as tpu-ubuntu2204-base, got '$runtime_version'"
# Also a word of the hosts' setup script: nothing there but a Python package name.
[[ $remote_python =~ ^python3(\.[0-9]+)?$ ]] ||
  die "--python must be python3 or python3.X (an apt package), got '$remote_python'"
[[ $network_tag =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--network-tag must be lower-case letters, digits and - (at most 63), got '$network_tag'"
[[ $coordinator_port =~ ^[1-9][0-9]{0,4}$ && $coordinator_port -le 65535 ]] ||
  die "--coordinator-port must be a port number in 1..65535, got '$coordinator_port'"
[[ $worker =~ ^[0-9]+$ ]] || die "--worker must be a host number"
[[ $max_failures =~ ^[1-9][0-9]*$ ]] || die "--max-failures must be a positive number"
[[ $poll_seconds =~ ^[1-9][0-9]*$ ]] || die "--poll-seconds must be a positive number"
if [[ $command == run || $command == supervise ]]; then
  [[ $workdir == gs://?* ]] ||
    die "--workdir=gs://BUCKET/PATH is needed: every host must read and write the same folder"
  for flag in ${main_flags[@]+"${main_flags[@]}"}; do
    case $flag in
      --workdir | --workdir=*) die "give the workdir as tpu.sh --workdir, not as a training flag" ;;
      --restart | --restart=true)
        [[ $command == supervise ]] &&
          die "--restart under supervise would discard the checkpoints after every preemption" ;;
    esac
  done
fi

# --- Printing and running commands -----------------------------------------------------------

# One argument as a shell word that pastes back exactly.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

show() {
  local separator=
  local arg
  for arg in "$@"; do
    printf '%s' "$separator"
    quote "$arg"
    separator=' '
  done
  printf '\n'
}

# Run a command, or with --dry-run print it.
run() {
  if $dry_run; then
    show "$@"
  else
    "$@"
  fi
}

note() {
  if $dry_run; then echo "# $*"; else echo "tpu.sh: $*" >&2; fi
}

location=(--zone="$zone")
[[ -n $project ]] && location+=(--project="$project")
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all)

# --- Remote scripts (run by each host's login shell, bash on TPU VM images) -------------------

# Expanded by the hosts' shells, not here.
# shellcheck disable=SC2016
remote_dir='$HOME/lstm_jax' venv='$HOME/lstm_jax_venv' log_file='$HOME/lstm_jax_train.log'
# shellcheck disable=SC2016
pid_file='$HOME/lstm_jax_train.pid'
archive_name=lstm_jax.tar.gz

setup_script() {
  local python=$remote_python
  printf '%s' "set -eu; " \
    "command -v $python >/dev/null || { sudo apt-get update -qq && " \
    "sudo apt-get install -y -qq $python $python-venv; }; " \
    "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf \$HOME/$archive_name -C $remote_dir; " \
    "[ -x $venv/bin/python ] || $python -m venv $venv; " \
    "$venv/bin/pip install -q --upgrade pip; " \
    "$venv/bin/pip install -q -e \"${remote_dir}[tpu,gcs]\"; " \
    "$venv/bin/python -c \"import jax, lstm_jax; print(jax.__version__)\""
}

# The coordinator (process 0, on worker 0) listens on the host's internal IP only, not on every
# interface as JAX would: the other hosts reach it there (JAX finds worker 0 by that address in
# the metadata), nothing outside the VPC can. The other hosts ignore the flag. The metadata
# server, not `hostname -I`, whose first address may be another interface's (docker0).
# shellcheck disable=SC2016
internal_ip='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/ip)'

train_script() {
  local flags
  flags=$(printf ' %q' ${main_flags[@]+"${main_flags[@]}"} "--workdir=$workdir")
  # The bind address first: one among the training flags overrides it (absl: the last wins).
  local train="$venv/bin/python -m lstm_jax.main \"--coordinator_bind_address=\$ip:$coordinator_port\"$flags"
  # A pid file per host lets `stop` reach the process, and stops a second run from starting
  # beside the first (two jobs in one workdir would overwrite each other's checkpoints).
  printf '%s' "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then " \
    "echo \"lstm_jax already runs on \$(hostname) (pid \$(cat $pid_file)); " \
    "launch/tpu.sh stop first\" >&2; exit 1; fi; cd $remote_dir; " \
    "ip=$internal_ip; [ -n \"\$ip\" ] || { echo \"\$(hostname): no internal IP from the " \
    "metadata server; not starting the JAX coordinator on every interface\" >&2; exit 1; }; " \
    "export JAX_COORDINATOR_PORT=$coordinator_port; "
  if $detach; then
    printf '%s' "nohup $train >>$log_file 2>&1 </dev/null & echo \$! >$pid_file"
  else
    printf '%s' "set -o pipefail; { $train & echo \$! >$pid_file; wait \$!; } 2>&1 " \
      "| tee -a $log_file"
  fi
}

stop_script() {
  printf '%s' "if [ -f $pid_file ]; then kill -TERM \"\$(cat $pid_file)\" 2>/dev/null || true; fi"
}

# --- Steps -----------------------------------------------------------------------------------

describe_state() {
  gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

create_slice() {
  local capacity=()
  $spot && capacity=(--spot)
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${location[@]}" \
    --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" \
    --tags="$network_tag" ${capacity[@]+"${capacity[@]}"}
  wait_until_active
}

wait_until_active() {
  if $dry_run; then
    note "then, every $poll_seconds s until the state is ACTIVE:"
    show gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
      --format='value(state.state)'
    return
  fi
  local state previous=
  while true; do
    state=$(describe_state)
    if [[ $state != "$previous" ]]; then
      note "$name is ${state:-not found}"
      previous=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | "") return 1 ;;
    esac
    sleep "$poll_seconds"
  done
}

setup_hosts() {
  local root archive
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive=${TMPDIR:-/tmp}/$archive_name
  # The files git knows about (committed or not, minus ignored ones such as runs/).
  if $dry_run; then
    echo "git -C $(quote "$root") ls-files -z --cached --others --exclude-standard" \
      "| tar -C $(quote "$root") --null -T - -czf $(quote "$archive")"
  else
    git -C "$root" ls-files -z --cached --others --exclude-standard |
      tar -C "$root" --null -T - -czf "$archive"
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$name:$archive_name" "${location[@]}" --worker=all
  run "${ssh_all[@]}" --command="$(setup_script)"
}

run_training() {
  run "${ssh_all[@]}" --command="$(train_script)"
}

delete_slice() {
  run gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
}

# Phrases train.py logs at the end of a complete run (pinned by tests/test_cli.py); a run that
# exits 0 without them was stopped by a signal (maintenance, `stop`) and must be resumed.
finished_pattern='Finished [0-9]+ steps|already holds the final step'

supervise() {
  if $dry_run; then
    note "supervise: check the slice every $poll_seconds s:"
    show gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
      --format='value(state.state)'
    note "if it is SUSPENDED or FAILED (preempted), delete it first:"
    delete_slice
    note "if it is missing (or was deleted), create it and set it up:"
    create_slice
    setup_hosts
    note "then run, and again after every preemption (the run resumes from $workdir):"
    echo "$(show "${ssh_all[@]}" --command="$(train_script)") | tee RUN_LOG"
    note "until RUN_LOG ends with 'Finished N steps'; give up after $max_failures failed runs" \
      "on a live slice."
    return
  fi
  local failures=0 attempt=0 state needs_setup=true status run_log
  while true; do
    state=$(describe_state)
    case $state in
      ACTIVE) ;;
      SUSPENDED | SUSPENDING | FAILED)
        note "$name is $state (preempted or failed): deleting it to create it again."
        delete_slice
        continue
        ;;
      "")
        create_slice || { sleep "$poll_seconds"; continue; }
        needs_setup=true
        ;;
      *)
        note "$name is $state; waiting."
        sleep "$poll_seconds"
        continue
        ;;
    esac
    if $needs_setup; then
      setup_hosts || { sleep "$poll_seconds"; continue; }
      needs_setup=false
    fi
    attempt=$((attempt + 1))
    run_log=$(mktemp -t lstm_jax_run.XXXXXX)
    note "run $attempt (log copy: $run_log)"
    status=0
    run_training 2>&1 | tee "$run_log" || status=$?
    if grep -Eq "$finished_pattern" "$run_log"; then
      note "training finished; checkpoints are in $workdir. Delete the slice with" \
        "launch/tpu.sh delete --name=$name --zone=$zone"
      return 0
    fi
    if [[ $(describe_state) == ACTIVE && $status -ne 0 ]]; then
      failures=$((failures + 1))
      note "run failed (exit $status) on a live slice ($failures of $max_failures)."
      if ((failures >= max_failures)); then
        note "giving up; see $run_log"
        return 1
      fi
    else
      failures=0
    fi
    sleep 10
  done
}

case $command in
  create) create_slice ;;
  setup) setup_hosts ;;
  run) run_training ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker="$worker" \
      --command="tail -n 200 -F $log_file"
    ;;
  stop) run "${ssh_all[@]}" --command="$(stop_script)" ;;
  status)
    run gcloud compute tpus queued-resources describe "$name" "${location[@]}"
    ;;
  delete) delete_slice ;;
  supervise) supervise ;;
esac
