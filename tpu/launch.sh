#!/usr/bin/env bash
# Run tenure on a Cloud TPU VM or pod slice: every worker runs the same command, and
# jax.distributed.initialize() finds the other workers itself (TENURE_DISTRIBUTED=1).
#
#   tpu/launch.sh create            # make the TPU VM (all workers of the slice)
#   tpu/launch.sh ship              # copy this checkout to every worker and build .venv there
#   tpu/launch.sh run configs/quickstart.yaml mesh.fsdp=-1 mesh.data=1
#   tpu/launch.sh delete
#
# Settings come from the environment: TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-32), RUNTIME
# (TPU VM image). Written against the gcloud `compute tpus tpu-vm` commands; this
# repository's CI has no TPU or gcloud, so it is not exercised there.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

case "${1:-}" in
  create) tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  ship)
    git archive --format=tar.gz -o /tmp/tenure.tar.gz HEAD
    tpu scp /tmp/tenure.tar.gz "$TPU_NAME":~/tenure.tar.gz --worker=all
    on_all "mkdir -p ~/tenure && tar -xzf ~/tenure.tar.gz -C ~/tenure && cd ~/tenure && \
            make venv && .venv/bin/pip install -q 'jax[tpu]==0.12.0.1'" ;;
  run)
    shift
    on_all "cd ~/tenure && TENURE_DISTRIBUTED=1 .venv/bin/tenure train $*" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
