#!/usr/bin/env bash
# The test command (README): the whole suite on CPU; GPU-marked tests run only where CUDA exists.
set -euo pipefail
export TRITON_INTERPRET=${TRITON_INTERPRET:-1} NO_TORCH_COMPILE=1 HF_HUB_OFFLINE=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
exec python -m pytest -q -x --durations=15 "$@"
