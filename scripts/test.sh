#!/usr/bin/env bash
# The test command (README): the whole suite on CPU; GPU-marked tests run only where CUDA exists.
# Two pytest-xdist workers (DSM_TEST_WORKERS; 0 runs in this process): most tests are bound by one Python thread (the
# Triton interpreter, tiny models), so a 2-core CI runner finishes in ~2/3 of the serial time.
set -euo pipefail
export TRITON_INTERPRET=${TRITON_INTERPRET:-1} NO_TORCH_COMPILE=1 HF_HUB_OFFLINE=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
exec python -m pytest -q -x --durations=15 -n "${DSM_TEST_WORKERS:-2}" --dist worksteal "$@"
