#!/usr/bin/env bash
# Generates from a checkpoint on a single-host NVIDIA GPU machine.
# Usage: launch/gpu_generate.sh CHECKPOINT_DIR "PROMPT" [extra generate.py flags]
set -euo pipefail
checkpoint=${1:?checkpoint dir}; prompt=${2:?prompt}; shift 2
cd "$(dirname "$0")/.."
python -m pip install -q -U "jax[cuda12]" -e .
python experiments/generate.py --checkpoint "$checkpoint" --prompt "$prompt" --dtype bfloat16 "$@"
