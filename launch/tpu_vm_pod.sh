#!/usr/bin/env bash
# Pretrains on every host of an existing Cloud TPU VM pod slice; JAX finds its peers (--multihost).
# Usage: TPU_NAME=NAME ZONE=ZONE CHECKPOINT_DIR=gs://BUCKET/RUN launch/tpu_vm_pod.sh \
#          [pretrain.py flags]
# Variables (default):
#   TPU_NAME, ZONE    the slice and its zone (required)
#   PROJECT           its Google Cloud project (gcloud's configured project)
#   REPO_URL, BRANCH  what each worker clones or updates its clone to (this checkout's origin; main)
#   CONFIG, MESH      --config and --mesh of pretrain.py (llama3.1-8b; fsdp=-1)
#   CHECKPOINT_DIR    gs:// directory every worker writes and resumes from (required)
#   LOG_DIR           on each worker: its output, and worker 0's metrics.jsonl (/tmp/llama3_jax)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CHECKPOINT_DIR:?set CHECKPOINT_DIR=gs://...}"
REPO_URL=${REPO_URL:-$(git remote get-url origin 2>/dev/null || true)}
: "${REPO_URL:?set REPO_URL (no origin remote here)}"
BRANCH=${BRANCH:-main}
CONFIG=${CONFIG:-llama3.1-8b}
MESH=${MESH:-fsdp=-1}
LOG_DIR=${LOG_DIR:-/tmp/llama3_jax}

ssh_all=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then ssh_all+=(--project "$PROJECT"); fi
# Values go into commands run by each worker's shell: quote them for that shell.
extra=""
if (($#)); then printf -v extra ' %q' "$@"; fi
printf -v repo '%q' "$REPO_URL"
printf -v branch '%q' "$BRANCH"
printf -v config '%q' "$CONFIG"
printf -v mesh '%q' "$MESH"
printf -v checkpoint_dir '%q' "$CHECKPOINT_DIR"
printf -v log_dir '%q' "$LOG_DIR"

install="set -euo pipefail
if [[ -d llama3_jax/.git ]]; then
  git -C llama3_jax fetch -q origin $branch && git -C llama3_jax checkout -q FETCH_HEAD
else
  git clone -q --branch $branch $repo llama3_jax
fi
python3 -m pip install -q -U \"jax[tpu]\" -e llama3_jax"
run="set -euo pipefail
cd llama3_jax && mkdir -p $log_dir
python3 experiments/pretrain.py --multihost --config $config --mesh $mesh \
  --checkpoint_dir $checkpoint_dir --metrics_file $log_dir/metrics.jsonl$extra 2>&1 |
  tee $log_dir/pretrain.log"

"${ssh_all[@]}" --command "$install"
"${ssh_all[@]}" --command "$run"
