#!/usr/bin/env bash
# Start the same qdllm-jax run on every host of a Cloud TPU pod slice (or a single TPU VM).
#
#   launch/pod_launch.sh TPU_NAME ZONE [PROJECT] -- --config configs/llada8b.py \
#       --config.model_path=/mnt/ckpt/LLaDA-8B-Base --config.calib.source=/mnt/data/c4-train.00000-of-01024.json.gz \
#       --workdir /mnt/runs/llada8b-w2
#
# Every host runs `python -m qdllm_jax.launch <args> --config.distributed=True` from the repository copy at
# $REPO_DIR (default ~/qdllm-jax). jax.distributed.initialize() then finds the other hosts through the TPU
# metadata server; process 0 writes the workdir, so --workdir, model_path and the calibration file must be on
# storage every host sees at the same path (a mounted bucket or filestore), or be copied to each host first.
#
# Environment:
#   REPO_DIR     repository path on the TPU VMs (default ~/qdllm-jax)
#   SYNC=1       copy this checkout to every host first (gcloud compute tpus tpu-vm scp --worker=all)
#   SETUP=1      pip install the package (and jax[tpu]) on every host first
#   DRY_RUN=1    print the gcloud commands instead of running them
#   LOG=path     remote log file (default $HOME/qdllm-launch.log on each host); the command runs in the foreground and
#                streams every host's output, prefixed by gcloud with the worker number
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0"
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT_FLAG=()
if [[ $# -gt 0 && $1 != "--" ]]; then PROJECT_FLAG=(--project "$1"); shift; fi
if [[ $# -gt 0 && $1 == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then echo "pod_launch.sh: no launch arguments after --; expected e.g. --config configs/llada8b.py" >&2; exit 2; fi

REPO_DIR=${REPO_DIR:-'~/qdllm-jax'}
LOG=${LOG:-\$HOME/qdllm-launch.log}
run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

if [[ ${SYNC:-0} == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  ssh_all "mkdir -p $REPO_DIR"
  run gcloud compute tpus tpu-vm scp --recurse "$here"/. "$TPU_NAME":"$REPO_DIR" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
      --worker=all
fi
if [[ ${SETUP:-0} == 1 ]]; then
  ssh_all "cd $REPO_DIR && pip install -U 'jax[tpu]' && pip install -e ."
fi

args=$(printf '%q ' "$@")
ssh_all "cd $REPO_DIR && export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 && \
python3 -m qdllm_jax.launch $args --config.distributed=True 2>&1 | tee -a $LOG"
