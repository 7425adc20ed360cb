#!/usr/bin/env bash
# Train on this machine with torchrun: one process per GPU, or NPROC CPU processes.
#   launch/local.sh                                  # defaults: 4 CPU processes (one Byzantine rank tolerated)
#   NPROC=4 launch/local.sh --config configs/attack_sign_flip.yaml train.max_steps=200
# Every argument goes through to `python -m fedgspo.train`.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 4)')
fi
exec torchrun --standalone --nproc_per_node="${NPROC}" -m fedgspo.train "$@"
