#!/usr/bin/env bash
# The one prepared script for a GPU session (H100/H200): build the CUDA extension, validate every kernel backend
# against its reference, run the benchmarks (engine end to end with moshi beside, kernels, Mimi, depformer), the
# GPU tests, and print a short table last.
#
#   DSM_COMMIT=<local HEAD> bash scripts/gpu_check.sh   # DSM_GPU_DEADLINE=540 s of work by default, then the summary
#
# Pass the commit explicitly (compute it here with `git rev-parse --short HEAD` and put it in the device command):
# the lent machine's copy of .git can be older than the working tree it receives, and every row records a commit.
#   DSM_GPU_ONLY="validate tests_kernels" bash scripts/gpu_check.sh   # only the named steps (space separated)
#   DSM_GPU_SKIP="kbench kbench_compile" bash scripts/gpu_check.sh    # all but the named steps
#
# The device tool brings back at most 8 files from $OUT: the logs go to one tarball ($OUT/logs.tgz), and the JSON-lines
# files of the benchmarks' rows to another at the end ($OUT/rows.tgz), beside summary.txt. Steps run in order of
# value; each has a cap, and a step that would not fit before the deadline is skipped (and listed as skipped), so the
# summary always prints before the tool's timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 NO_TORCH_COMPILE=1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}  # the image has python3 (with torch), maybe no `python`
OUT=${OUT:-/tmp/dsm_gpu_check}
LOGS=$(mktemp -d /tmp/dsm_gpu_logs.XXXX)
DEADLINE=${DSM_GPU_DEADLINE:-540}
ONLY=${DSM_GPU_ONLY:-}
SKIP=${DSM_GPU_SKIP:-}
mkdir -p "$OUT"
STATUS=()

step() {  # step NAME CAP_S MIN_S CMD...: run with timeout min(CAP, time left), keep the log, record rc and seconds
  local name=$1 cap=$2 need=$3 t0=$SECONDS rc left
  shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  if [[ " $SKIP " == *" $name "* ]]; then return 0; fi
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$need" ]; then
    STATUS+=("$(printf '%-16s skipped (%ss left, needs %ss)' "$name" "$left" "$need")")
    return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (cap ${cap}s): $*"
  timeout -k 5 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  STATUS+=("$(printf '%-16s rc=%-4s %4ss' "$name" "$rc" $((SECONDS - t0)))")
  tail -n 8 "$LOGS/$name.log"
  return $rc
}

finish() {
  {
    echo "=== kernel benchmark (ms; speedup = best torch baseline / best custom kernel)"
    for f in "$LOGS"/kbench*.log; do [ -f "$f" ] && sed -n '/^kernel    shape/,$p' "$f"; done
    echo "=== attention split-K sweep (ms, % of copy bandwidth)"
    grep -E "^attention.* (cuda|triton)(:s[0-9]+)? " "$LOGS/kbench_attn.log" 2>/dev/null | awk '{print $2, $3, $4, $5 " ms", $9}'
    echo "=== persistent kernels by grid size (:gN blocks; none = one per SM)"
    grep -E "^rvq .* (cuda|triton)(:g[0-9]+)? " "$LOGS/grids_rvq.log" 2>/dev/null | awk '{print $1, $3, $4, $5 " ms"}'
    grep -E "cuda_persistent" "$LOGS/grids_decoder.log" "$LOGS/grids_depformer.log" 2>/dev/null | cut -d: -f2-
    echo "=== attention by page size (pN) and KV dtype (ms, % of copy bandwidth)"
    grep -E "^attention +[a-z0-9.-]+(/p[0-9]+)?(/fp8)? +B=" "$LOGS/kbench_pages.log" 2>/dev/null | awk '{print $2, $3, $4, $5 " ms", $9}'
    echo "=== validate-kernels"
    grep -E "passed|FAIL" "$LOGS/validate.log" 2>/dev/null
    echo "=== dsm bench (engine step, Mimi included; moshi = LMGen step alone)"
    for f in "$LOGS"/bench_*.log; do [ -f "$f" ] && sed -n '/^system/,$p' "$f"; done
    echo "=== runtimes end to end (ms per frame, host included)"
    grep -h -A4 "^preset " "$LOGS/runtime.log" "$LOGS/runtime_tts.log" 2>/dev/null
    echo "=== runtime host work per step (ms, stand-in model; add to the capacity rows)"
    sed -n '/^runtime/,$p' "$LOGS/host.log" 2>/dev/null
    echo "=== servers under load (benchmarks/bench_serve.py; ms from the clients' side)"
    grep -hv "^starting" "$LOGS/serve_stt.log" "$LOGS/serve_tts.log" "$LOGS/serve_capacity.log" 2>/dev/null | tail -n 20
    echo "=== mimi / depformer"
    tail -n 20 "$LOGS/mimi.log" 2>/dev/null
    tail -n 22 "$LOGS/depformer.log" 2>/dev/null
    tail -n 20 "$LOGS/decoder.log" 2>/dev/null
    echo "=== profile (eager kernels per step)"
    grep -h -A8 "kernel calls per step" "$LOGS/profile.log" "$LOGS/profile_mimi.log" "$LOGS/profile_tts64.log" 2>/dev/null
    echo "=== tests"
    for f in "$LOGS"/tests*.log; do [ -f "$f" ] && grep -E "^FAILED|^ERROR|passed|failed" "$f" | tail -n 12; done
    echo "=== steps"
    printf '%s\n' "${STATUS[@]}"
  } | tee "$OUT/summary.txt"
  tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
  # the device tool brings back 8 files at most: the benchmarks' JSON rows travel as one tarball
  (cd "$OUT" && ls ./*.jsonl >/dev/null 2>&1 && tar -czf rows.tgz ./*.jsonl && rm -f ./*.jsonl)
}
trap finish EXIT

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${DSM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (from the copied .git: may be stale)}"
} 2>&1 | tee "$LOGS/env.log"

# The image has pytest but not moshi or soxr: carry them as wheels in .whl/ (git-ignored; see benchmarks/results/
# README.md) and install them into /tmp/site, which stays off the image's own site-packages.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    >"$LOGS/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Editable install builds dsm_kernels/_C in place; fall back to build_ext --inplace.
if step build 240 60 "$PY" -m pip install --no-deps --no-build-isolation -v -e . ||
  step build_inplace 240 60 "$PY" setup.py build_ext --inplace; then
  step import 60 5 "$PY" -c "import dsm_kernels as k, dsm_kernels._C; print(k.available_backends('cuda'))"
fi
B=("$PY" -m dsm.cli bench --steps 30 --warmup 5 --output "$OUT/bench.jsonl")
T=("$PY" -m pytest -q -rf -p no:cacheprovider -m gpu)
# correctness first: every backend against its reference, then the GPU tests (CUDA graphs vs eager included);
# the image has pytest-xdist: Triton compiles are CPU-bound, so the kernel tests run 8-wide
step validate 90 20 "$PY" -m dsm.cli validate-kernels
step tests_quick 60 20 "${T[@]}" -n 8 tests/kernels/test_fused.py tests/kernels/test_depformer.py tests/kernels/test_decoder.py \
  tests/kernels/test_persistent_sync.py
# the GEMV op tests and the model-vs-reference token tests run on the GPU whenever CUDA exists (not gpu-marked)
# (not the cases that emulate the CUDA kernels on the CPU: CPU CI runs those)
step tests_gemv 60 20 "$PY" -m pytest -q -rf -p no:cacheprovider -n 8 -k "not cuda_emu and not emulated" \
  tests/kernels/test_gemv.py tests/model/test_backends.py
# Mimi's kernels on the device (GEMV paths at one stream, cuBLAS at four, tf32x3 implicit-GEMM convs; codes by
# agreement, PCM within 1e-4)
step tests_mimi 90 20 "$PY" -m pytest -q -rf -p no:cacheprovider -n 8 tests/kernels/test_mimi_kernels.py \
  tests/kernels/test_conv_igemm.py
step tests_kernels 120 30 "${T[@]}" -n 8 tests/kernels
step tests_engine 100 30 "${T[@]}" tests/test_engine.py tests/test_cross_pages.py tests/model tests/test_mimi.py \
  tests/test_mimi_graph.py tests/test_stt.py tests/test_tts.py tests/test_host_copies.py
# then the numbers: engine end to end with moshi beside, depformer, Mimi, capacity, kernels
step bench_stt1b 120 40 "${B[@]}" --preset stt-1b-en_fr --batch 1,64 ||
  step bench_stt1b_eager 90 40 env DSM_NO_CUDA_GRAPH=1 "${B[@]}" --preset stt-1b-en_fr --batch 1,64
step bench_tts 150 50 "${B[@]}" --preset tts-1.6b-en_fr --batch 1,64
step bench_stt26 100 40 "${B[@]}" --preset stt-2.6b-en --batch 1,64
# A/B at batch 1: the same steps without the GEMV kernels (cuBLAS + fused glue), and without programmatic dependent
# launch; the rows carry the switch in their log name only, so read them beside bench_stt1b / bench_tts
step bench_nogemv 120 40 env DSM_GEMV=0 "${B[@]}" --no-reference --preset stt-1b-en_fr --preset tts-1.6b-en_fr \
  --batch 1 --output "$OUT/bench_nogemv.jsonl"
step bench_nopdl 90 40 env DSM_NO_PDL=1 "${B[@]}" --no-reference --preset stt-1b-en_fr --preset tts-1.6b-en_fr \
  --batch 1 --output "$OUT/bench_nopdl.jsonl"
# the steps on Triton instead of the persistent CUDA kernels (decode step, depth transformer; batch 1: their range)
step bench_triton 120 40 "${B[@]}" --no-reference --backend triton --preset stt-1b-en_fr --preset tts-1.6b-en_fr \
  --batch 1 --output "$OUT/bench_triton.jsonl"
step depformer 120 30 "$PY" benchmarks/bench_depformer.py --batch 1 4 8 64 --iters 20 --out "$OUT/depformer.jsonl"
# the decode step alone (stt-1b, stt-2.6b, tts layouts): Triton, the single ops with CUDA attention, the persistent kernel
step decoder 200 40 "$PY" benchmarks/bench_decoder.py --batch 1 4 --iters 20 --out "$OUT/decoder.jsonl"
# the persistent kernels' grid, by measurement: each runs one block per SM (132) and a grid barrier between phases;
# fewer blocks make each barrier cheaper but stream the weights through fewer SMs (RVQ: 2 MB a level, 32 levels)
step grids_rvq 60 20 "$PY" benchmarks/bench_kernels.py --kernels rvq --batch 1 4 --graph --no-compile \
  --providers torch triton cuda --grids 8 16 33 66 99 --out "$OUT/kernels.jsonl"
step grids_decoder 90 30 "$PY" benchmarks/bench_decoder.py --layout stt-1b tts-1.6b --batch 1 --iters 20 \
  --providers cuda_persistent --grids 33 66 99 --out "$OUT/decoder.jsonl"
step grids_depformer 90 30 "$PY" benchmarks/bench_depformer.py --batch 1 --iters 20 --providers cuda_persistent \
  --grids 33 66 99 --out "$OUT/depformer.jsonl"
# the GEMV kernel's bandwidth against cuBLAS + torch glue at the model's linears (the risk named in NOTES.md)
step kbench_gemv 90 30 "$PY" benchmarks/bench_kernels.py --kernels gemv --batch 1 4 --graph --no-compile \
  --providers torch triton --out "$OUT/kernels.jsonl"
# decode attention at the engine's shapes, with the split-K factor swept around the planner's choice (whole waves)
step kbench_attn 90 30 "$PY" benchmarks/bench_kernels.py --kernels attention --batch 1 64 400 --graph --no-compile \
  --providers cuda triton --attention-splits 1 2 3 4 6 --out "$OUT/kernels.jsonl"
# the page size, chosen by measurement (issue #4): decode attention at 16..128-position pages, bf16 and fp8 pools, at
# the planner's split counts (a page is a contiguous 4-64 KB run of a pool; a stream's ring wastes < 1 page)
step kbench_pages 90 30 "$PY" benchmarks/bench_kernels.py --kernels attention --batch 64 400 --graph --no-compile \
  --providers cuda triton --page-sizes 16 32 64 128 --kv-dtypes bf16 fp8 --out "$OUT/kernels.jsonl"
# the voice cross-attention over shared condition pages against the SDPA over dense per-stream K/V it replaced
step kbench_voice 60 15 "$PY" benchmarks/bench_kernels.py --kernels voice --batch 1 64 256 --graph --no-compile \
  --providers torch cuda triton --out "$OUT/kernels.jsonl"
# Mimi's wide convolutions alone: the tf32x3 implicit GEMMs against cuDNN's fp32 ones (the capacity lever at 64-400)
step kbench_conv 90 30 "$PY" benchmarks/bench_kernels.py --kernels conv convtr --batch 1 64 400 --graph --no-compile \
  --providers torch triton --out "$OUT/kernels.jsonl"
# ours (and its triton / nogemv / cudnn / tf32 variants) beside moshi, and each path's code agreement with the
# CPU fp32 reference
step mimi 180 30 "$PY" benchmarks/bench_mimi.py --batch 1 64 400 --steps 20 --warmup 5 --out "$OUT/mimi.jsonl"
step profile 90 20 "$PY" benchmarks/profile_step.py --batch 1
step profile_mimi 60 20 "$PY" benchmarks/profile_step.py --mimi --batch 1 --top 25
# run 2's TTS step at batch 64 (29 ms, no faster than moshi) was never profiled: where does it go?
step profile_tts64 90 30 "$PY" benchmarks/profile_step.py --preset tts-1.6b-en_fr --batch 64 --steps 2 --top 20
step bench_capacity 150 40 "${B[@]}" --no-reference --steps 20 --preset stt-1b-en_fr --batch 256 --capacity
step bench_capacity_fp8 150 40 "${B[@]}" --no-reference --steps 20 --kv-dtype fp8 --preset stt-1b-en_fr \
  --batch 1,1024 --capacity
step bench_capacity_tts 90 40 "${B[@]}" --no-reference --steps 20 --preset tts-1.6b-en_fr --batch 256
# the page size in the whole step (the persistent decode step and the append read pages too): stt-1b LM at 64 pages
step bench_pages 90 40 "${B[@]}" --no-reference --no-mimi --preset stt-1b-en_fr --batch 1,64 --page-size 64 \
  --output "$OUT/bench_pages.jsonl"
# the runtimes end to end (host work included) beside their stepper alone: what `dsm transcribe` / `dsm speak` get
step runtime 150 60 "$PY" benchmarks/bench_runtime.py --preset stt-1b-en_fr --streams 1 64 --frames-per-call 1 8 \
  --output "$OUT/runtime.jsonl"
step runtime_tts 150 60 "$PY" benchmarks/bench_runtime.py --preset tts-1.6b-en_fr --streams 1 64 \
  --output "$OUT/runtime.jsonl"
# a few streams on a runtime sized for many: Mimi steps the bucket of the open slots (128 rows here), not every slot
# (before: 1 stream on 512 slots paid Mimi's 512-row encode, ~28 ms a frame by run 2's slope)
step runtime_slots 150 60 "$PY" benchmarks/bench_runtime.py --preset stt-1b-en_fr --streams 1 64 --slots 512 \
  --frames-per-call 1 --output "$OUT/runtime.jsonl"
# the runtimes' host work per step on this machine's CPU (stand-in model steps): add it to the capacity rows above
step host 120 30 "$PY" benchmarks/bench_host.py --streams 64 256 700 --steps 20
# the servers under load over real sockets, measured from the clients (each step starts its server: graph capture)
step serve_stt 180 60 "$PY" benchmarks/bench_serve.py stt --clients 1 64 256 --seconds 10 --output "$OUT/serve.jsonl"
step serve_tts 150 60 "$PY" benchmarks/bench_serve.py tts --clients 1 16 64 \
  --text "Twelve short words make a sentence that takes a few seconds to say." --output "$OUT/serve.jsonl"
# the most live STT clients one server keeps up with (the issue's 700-stream goal, sockets and Mimi included)
step serve_capacity 300 120 "$PY" benchmarks/bench_serve.py stt --clients 256 --seconds 8 --capacity \
  --max-clients 768 --output "$OUT/serve.jsonl"
step kbench_graph 90 30 "$PY" benchmarks/bench_kernels.py --graph --no-compile --providers torch triton cuda \
  --out "$OUT/kernels.jsonl"
step kbench 90 30 "$PY" benchmarks/bench_kernels.py --no-compile --iters 50 --reference-max-batch 1 \
  --out "$OUT/kernels.jsonl"
step kbench_compile 90 40 "$PY" benchmarks/bench_kernels.py --providers compile --iters 50 --batch 64 \
  --out "$OUT/kernels.jsonl"
