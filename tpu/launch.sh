#!/usr/bin/env bash
# Run tenure on a Cloud TPU VM or pod slice: every worker runs the same command, and
# jax.distributed.initialize() finds the other workers itself (TENURE_DISTRIBUTED=1).
#
#   tpu/launch.sh create            # make the TPU VM (all workers of the slice)
#   tpu/launch.sh status            # its state (with QUEUED=1: the queued resource's)
#   tpu/launch.sh ship              # copy this checkout to every worker and build .venv there
#   tpu/launch.sh preflight configs/quickstart.yaml mesh.fsdp=-1 mesh.data=1
#   tpu/launch.sh run configs/quickstart.yaml mesh.fsdp=-1 mesh.data=1
#   tpu/launch.sh delete
#   tpu/launch.sh --dry-run create  # print every gcloud command instead of running it
#
# Settings come from the environment: TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-32), RUNTIME
# (TPU VM image), PROJECT (optional gcloud project). QUEUED=1 asks for capacity through a
# queued resource (QR_ID, default "$TPU_NAME-qr"; SPOT=1 for spot capacity, RESERVED=1 for a
# reservation) instead of creating the VM at once. TENURE_HANG_TIMEOUT (seconds) is passed to
# the workers. Written against the gcloud `compute tpus tpu-vm` and `compute tpus
# queued-resources` commands; this repository's CI has no TPU or gcloud, so only --dry-run is
# tested there.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi

usage() { sed -n '2,20p' "$0"; exit "${1:-2}"; }
[[ $# -ge 1 ]] || usage
[[ "$1" == "-h" || "$1" == "--help" || "$1" == "help" ]] && usage 0  # help needs no settings

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
QUEUED=${QUEUED:-0}
QR_ID=${QR_ID:-$TPU_NAME-qr}
HANG_TIMEOUT=${TENURE_HANG_TIMEOUT:-60}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project="$PROJECT")
fi

# Runs a command, or with --dry-run prints it (shell-quoted, one line) without running it.
do_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local quoted
    printf -v quoted '%q ' "$@"
    echo "${quoted% }"
  else
    "$@"
  fi
}

tpu() { do_cmd gcloud compute tpus tpu-vm "$@" --zone="$ZONE" "${PROJECT_FLAG[@]}"; }
queued() { do_cmd gcloud compute tpus queued-resources "$@" --zone="$ZONE" "${PROJECT_FLAG[@]}"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

# The arguments after the subcommand as one shell-quoted string for the remote command line.
remote_args() {
  local quoted
  printf -v quoted '%q ' "$@"
  echo "${quoted% }"
}

command=$1
shift
case "$command" in
  create)
    if [[ "$QUEUED" == 1 ]]; then
      capacity=()
      if [[ "${SPOT:-0}" == 1 ]]; then capacity=(--spot); fi
      if [[ "${RESERVED:-0}" == 1 ]]; then capacity=(--reserved); fi
      queued create "$QR_ID" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" \
        --runtime-version="$RUNTIME" "${capacity[@]}"
    else
      tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    fi ;;
  status)
    if [[ "$QUEUED" == 1 ]]; then
      queued describe "$QR_ID"
    else
      tpu describe "$TPU_NAME"
    fi ;;
  ship)
    do_cmd git archive --format=tar.gz -o /tmp/tenure.tar.gz HEAD
    tpu scp /tmp/tenure.tar.gz "$TPU_NAME":~/tenure.tar.gz --worker=all
    on_all "mkdir -p ~/tenure && tar -xzf ~/tenure.tar.gz -C ~/tenure && cd ~/tenure && make venv && .venv/bin/pip install -q 'jax[tpu]==0.12.0.1'" ;;
  preflight)
    on_all "cd ~/tenure && TENURE_DISTRIBUTED=1 TENURE_HANG_TIMEOUT=$HANG_TIMEOUT .venv/bin/tenure launch --preflight $(remote_args "$@")" ;;
  run)
    on_all "cd ~/tenure && TENURE_DISTRIBUTED=1 TENURE_HANG_TIMEOUT=$HANG_TIMEOUT .venv/bin/tenure train $(remote_args "$@")" ;;
  delete)
    if [[ "$QUEUED" == 1 ]]; then
      queued delete "$QR_ID" --force --quiet
    else
      tpu delete "$TPU_NAME" --quiet
    fi ;;
  *) usage ;;
esac
