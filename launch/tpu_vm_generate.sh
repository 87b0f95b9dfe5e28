#!/usr/bin/env bash
# Generates from a checkpoint on every worker of a Cloud TPU VM (the checkpoint path must be
# readable from each worker, e.g. a mounted bucket).
# Usage: launch/tpu_vm_generate.sh TPU_NAME ZONE CHECKPOINT_DIR "PROMPT"
set -euo pipefail
tpu=${1:?tpu name}; zone=${2:?zone}; checkpoint=${3:?checkpoint dir}; prompt=${4:?prompt}
repo=$(git -C "$(dirname "$0")/.." remote get-url origin)
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  [ -d llama3_jax ] || git clone $repo llama3_jax
  cd llama3_jax && git pull -q
  python3 -m pip install -q -U 'jax[tpu]' -e .
  python3 experiments/generate.py --checkpoint '$checkpoint' --prompt '$prompt' --dtype bfloat16"
