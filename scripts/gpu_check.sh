#!/usr/bin/env bash
# The one prepared script for a GPU session (H100/H200): build the CUDA extension, run the kernel tests on the GPU
# (CUDA backend + compiled Triton), validate, benchmark, and print a short table last. Logs and the benchmark rows
# go to $OUT (the device tool brings that folder back) and the rows are also appended to benchmarks/results.
# Budget: ~1 min build, ~2-3 min tests, ~4 min bench; each step has its own timeout so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 NO_TORCH_COMPILE=1
export MAX_JOBS=${MAX_JOBS:-16}
OUT=${OUT:-/tmp/dsm_gpu_check}
mkdir -p "$OUT"
STATUS=()

step() {  # step NAME TIMEOUT_S CMD...: run, keep the log, record rc and seconds, show the log's tail
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  STATUS+=("$(printf '%-14s rc=%-4s %4ss' "$name" "$rc" $((SECONDS - t0)))")
  tail -n 15 "$OUT/$name.log"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# The lent GPU image has no pytest, no moshi and no network. Prepare wheels here first and carry the folder
# (the device tool's `carry: [".wheels"]`; .wheels/ is git-ignored):
#   pip download -d .wheels --only-binary :all: --python-version 3.12 pytest pytest-timeout pluggy iniconfig packaging
#   pip download -d .wheels --no-deps moshi==0.2.13
# Without pytest the checks fall back to `python -m dsm_kernels.validate` alone; without moshi, `dsm bench` and the
# Mimi bench time dsm only.
WHEELS=${DSM_WHEELS:-.wheels}
if [ -d "$WHEELS" ]; then
  pip install --no-deps --no-index "$WHEELS"/*.whl >"$OUT/wheels.log" 2>&1
fi

# Editable install builds dsm_kernels/_C in place; if pip cannot (old setuptools, no `wheel`), build_ext --inplace.
if step build 300 pip install --no-deps --no-build-isolation -v -e . ||
  step build_inplace 300 python setup.py build_ext --inplace; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  step import 60 python -c "import dsm_kernels as k; import dsm_kernels._C; print(k.available_backends('cuda'))"
  if python -c "import pytest" 2>/dev/null; then
    # CUDA backend + graph-replay tests (the `gpu` marker), then the Triton tests, compiled for this GPU.
    step gpu_tests 240 python -m pytest -q -m gpu tests/kernels -p no:cacheprovider
    step triton_tests 240 python -m pytest -q -m "not gpu" -p no:cacheprovider \
      tests/kernels/test_embed.py tests/kernels/test_paged_attention.py tests/kernels/test_sampling.py
    # The model and the engine on the GPU: CUDA backend vs reference, CUDA graphs vs eager.
    step model_gpu_tests 240 python -m pytest -q -m gpu -p no:cacheprovider tests/test_engine.py tests/model
  else
    echo "no pytest on this machine: only dsm_kernels.validate checks the kernels"
  fi
  step validate 120 python -m dsm_kernels.validate
  step bench 330 python benchmarks/bench_kernels.py --out "$OUT/kernels.jsonl"
  cat "$OUT/kernels.jsonl" >>benchmarks/results/kernels.jsonl 2>/dev/null
  # Depth transformer frame (32 codebooks, TTS shapes): reference loop eager / CUDA graph vs Triton in a graph.
  step depformer_bench 240 python benchmarks/bench_depformer.py --batch 1 8 64 --out "$OUT/depformer.jsonl"
  cat "$OUT/depformer.jsonl" >>benchmarks/results/depformer.jsonl 2>/dev/null
  # End to end: the three released shapes on random weights, Mimi included, moshi beside when installed.
  step dsm_bench 300 python -m dsm.cli bench --batch 1,64 --steps 30 --warmup 5 --output "$OUT/bench.jsonl"
  step mimi_bench 180 python benchmarks/bench_mimi.py --batch 1 64 --out "$OUT/mimi.jsonl"
else
  echo "build failed; see $OUT/build.log"
  grep -E "error|Error" "$OUT/build.log" | head -40
fi

echo
echo "=== benchmark summary (ms; speedup = best torch baseline / best custom kernel)"
sed -n '/^kernel    shape/,$p' "$OUT/bench.log" 2>/dev/null
echo "=== dsm bench (engine step, Mimi included)"
sed -n '/^system/,$p' "$OUT/dsm_bench.log" 2>/dev/null
echo "=== steps"
printf '%s\n' "${STATUS[@]}"
