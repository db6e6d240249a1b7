// Sampler: one block per row, the row in registers (kItems per thread, strided for coalescing). CFG mix without FMA
// contraction (the reference's rounding), greedy argmax, top-k threshold by 33-step bisection on the
// order-preserving int32 image of the logits (exact k-th largest, no sort, no data-dependent trip count), then the
// exp race argmax(p / -log u) over kept tokens with the reference's counter-based hash noise. No host sync.
#include <climits>

#include "common.cuh"

namespace {

constexpr int kThreads = 512;
constexpr int kWarpsPerBlock = kThreads / 32;

__device__ __forceinline__ uint32_t hash32(uint32_t x) {  // lowbias32, as dsm_kernels.reference._hash32
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Block-wide reductions through one shared scratch of kWarpsPerBlock slots; every thread gets the result.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarpsPerBlock; ++w) v = op(v, scratch[w]);
  return v;
}

// (value, index) argmax, lowest index on ties (torch.argmax).
struct ArgMax {
  float v;
  int i;
};
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}
__device__ __forceinline__ ArgMax block_argmax(ArgMax a, ArgMax* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    ArgMax o{__shfl_xor_sync(0xffffffffu, a.v, off), __shfl_xor_sync(0xffffffffu, a.i, off)};
    a = better(a, o);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = a;
  __syncthreads();
  a = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarpsPerBlock; ++w) a = better(a, scratch[w]);
  return a;
}

template <typename T, int kItems>
__global__ void __launch_bounds__(kThreads) sample_kernel(int64_t* __restrict__ out, const T* __restrict__ logits,
                                                          const T* __restrict__ null_logits, int V, int64_t stride_l,
                                                          int64_t stride_n, float cfg_coef,
                                                          const float* __restrict__ temperature, int top_k,
                                                          const int64_t* __restrict__ seeds,
                                                          const int64_t* __restrict__ steps) {
  __shared__ float s_f[kWarpsPerBlock];
  __shared__ int s_cnt[2][kWarpsPerBlock];
  __shared__ long long s_ll[kWarpsPerBlock];
  __shared__ ArgMax s_a[kWarpsPerBlock];
  const int64_t row = blockIdx.x;
  float x[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = i * kThreads + threadIdx.x;
    if (c < V) {
      float v = dsm::to_float(logits[row * stride_l + c]);
      if (null_logits) {
        const float n = dsm::to_float(null_logits[row * stride_n + c]);
        v = __fadd_rn(n, __fmul_rn(__fsub_rn(v, n), cfg_coef));  // no FMA: same rounding as the reference
      }
      x[i] = v;
    } else {
      x[i] = -INFINITY;
    }
  }
  ArgMax best{-INFINITY, 0x7fffffff};
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = i * kThreads + threadIdx.x;
    if (c < V) best = better(best, ArgMax{x[i], c});
  }
  const ArgMax greedy = block_argmax(best, s_a);
  const float t = temperature[row];
  if (!(t > 0.f)) {  // block-uniform branch
    if (threadIdx.x == 0) out[row] = greedy.i;
    return;
  }

  // k-th largest logit: largest threshold `lo` with count(key >= lo) >= k, by bisection over int32 keys.
  int key[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int bits = __float_as_int(x[i]);
    key[i] = (i * kThreads + static_cast<int>(threadIdx.x) < V) ? (bits >= 0 ? bits : bits ^ 0x7fffffff) : INT_MIN;
  }
  long long lo = INT_MIN;
  const bool use_top_k = top_k > 0 && top_k < V;
  if (use_top_k) {
    long long kmin = INT_MAX, kmax = INT_MIN;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (i * kThreads + static_cast<int>(threadIdx.x) < V) {
        kmin = min(kmin, static_cast<long long>(key[i]));
        kmax = max(kmax, static_cast<long long>(key[i]));
      }
    }
    lo = block_reduce(kmin, [](long long a, long long b) { return a < b ? a : b; }, s_ll);
    long long hi = block_reduce(kmax, [](long long a, long long b) { return a > b ? a : b; }, s_ll) + 1;
    // <= 33 rounds with lo/hi block-uniform. One barrier per round: the per-warp counts alternate between two
    // scratch rows, and a row is rewritten only two rounds later, after every thread passed the next barrier.
    for (int round = 0; hi - lo > 1; ++round) {
      const long long mid = lo + (hi - lo) / 2;
      unsigned cnt = 0;
#pragma unroll
      for (int i = 0; i < kItems; ++i) cnt += key[i] >= mid;
      cnt = __reduce_add_sync(0xffffffffu, cnt);
      int* row_scratch = s_cnt[round & 1];
      if (threadIdx.x % 32 == 0) row_scratch[threadIdx.x / 32] = static_cast<int>(cnt);
      __syncthreads();
      int total = 0;
#pragma unroll
      for (int w = 0; w < kWarpsPerBlock; ++w) total += row_scratch[w];
      if (total >= top_k) lo = mid; else hi = mid;
    }
  }

  // Softmax of x / t over all tokens (as the reference), then the exp race over kept tokens.
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    x[i] = x[i] / t;  // a true division, as torch's CPU `x / t`
    mx = fmaxf(mx, x[i]);
  }
  mx = block_reduce(mx, [](float a, float b) { return fmaxf(a, b); }, s_f);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    x[i] = expf(x[i] - mx);
    sum += x[i];
  }
  sum = block_reduce(sum, [](float a, float b) { return a + b; }, s_f);
  const uint32_t h = hash32(hash32(static_cast<uint32_t>(seeds[row])) ^ static_cast<uint32_t>(steps[row]));
  best = ArgMax{-INFINITY, 0x7fffffff};
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = i * kThreads + threadIdx.x;
    if (c < V) {
      const float u = (static_cast<float>(hash32(h ^ static_cast<uint32_t>(c)) >> 8) + 0.5f) * (1.0f / 16777216.0f);
      const float score = key[i] >= lo ? __fdiv_rn(__fdiv_rn(x[i], sum), -logf(u)) : -1.0f;
      best = better(best, ArgMax{score, c});
    }
  }
  const ArgMax sampled = block_argmax(best, s_a);
  if (threadIdx.x == 0) out[row] = sampled.i;
}

template <typename T>
cudaError_t launch(int64_t* out, const void* logits, const void* null_logits, int B, int V, int64_t stride_l,
                   int64_t stride_n, float cfg_coef, const float* temperature, int top_k, const int64_t* seeds,
                   const int64_t* steps, cudaStream_t stream) {
  const T* l = static_cast<const T*>(logits);
  const T* n = static_cast<const T*>(null_logits);
  const int items = (V + kThreads - 1) / kThreads;
#define DSM_SAMPLE(ITEMS)                                                                                        \
  sample_kernel<T, ITEMS><<<B, kThreads, 0, stream>>>(out, l, n, V, stride_l, stride_n, cfg_coef, temperature, \
                                                      top_k, seeds, steps)
  if (items <= 4) DSM_SAMPLE(4);
  else if (items <= 8) DSM_SAMPLE(8);
  else if (items <= 16) DSM_SAMPLE(16);
  else if (items <= 32) DSM_SAMPLE(32);
  else return cudaErrorInvalidValue;
#undef DSM_SAMPLE
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t dsm_launch_sample_tokens(int64_t* out, const void* logits, const void* null_logits, int dtype,
                                                int B, int V, int64_t stride_l, int64_t stride_n, float cfg_coef,
                                                const float* temperature, int top_k, const int64_t* seeds,
                                                const int64_t* steps, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  DSM_DISPATCH_DTYPE(dtype, T, {
    return launch<T>(out, logits, null_logits, B, V, stride_l, stride_n, cfg_coef, temperature, top_k, seeds, steps,
                     stream);
  });
  return cudaErrorInvalidValue;
}
