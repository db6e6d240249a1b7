// One row's token, sampled by a whole block of kThreads threads: the body of the sampler kernel (sampling.cu, whose
// header explains the algorithm), also run by the persistent depth-transformer kernel (depformer.cu).
#pragma once
#include <climits>
#include <type_traits>

#include "common.cuh"

namespace dsm::sampling {

constexpr int kThreads = 512;
constexpr int kWarpsPerBlock = kThreads / 32;

// Low bits of the fp32 image that are zero for every value of T: dropped from the keys when there is no CFG mix.
template <typename T>
__host__ __device__ constexpr int narrow_key_shift() {
  return std::is_same<T, __nv_bfloat16>::value ? 16 : (std::is_same<T, __half>::value ? 13 : 0);
}

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

// A row whose values are all NaN (one NaN logit makes every sampling score NaN) leaves the argmax at its start index
// INT_MAX: token 0 instead, never an id past the vocabulary that the next step's embedding gather would read out of
// bounds with (a fault that would end every stream of the process).
__device__ __forceinline__ int64_t in_vocab(int i, int V) { return i < V ? i : 0; }

// The block's shared scratch, owned by the caller: static shared memory in the sampler kernel, a slice of the dynamic
// shared memory in the persistent kernel (whose blocks are all resident at once, also in the CPU emulation).
struct SampleScratch {
  float f[kWarpsPerBlock];
  uint32_t cnt[2][kWarpsPerBlock][8];  // per warp: 16 counts, two per word
  ArgMax a[kWarpsPerBlock];
};

// The token of one row (every thread returns it). `logits` and `null_logits` (or NULL) point at the row; the loads go
// through L2 (ld.global.cg): the persistent kernel samples logits that other blocks wrote in the same launch.
template <typename T, int kItems, int kShift>
__device__ __forceinline__ int64_t sample_row(const T* __restrict__ logits, const T* __restrict__ null_logits, int V,
                                              float cfg_coef, float t, int top_k, int64_t seed, int64_t step,
                                              SampleScratch& sh) {
  constexpr int kBits = 32 - kShift;          // the keys' range is [kKeyMin, kKeyMin + 2^kBits)
  constexpr int kPasses = (kBits + 3) / 4;     // radix 16
  constexpr int kKeyMin = INT_MIN >> kShift;
  static_assert(kItems * kThreads < 65536, "a 16-bit count must hold a whole row");
  static_assert(kItems < 256, "a byte counter must hold a thread's keys");
  float x[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = i * kThreads + threadIdx.x;
    if (c < V) {
      float v = dsm::to_float(__ldcg(logits + c));
      if (null_logits) {
        const float n = dsm::to_float(__ldcg(null_logits + c));
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
  const ArgMax greedy = block_argmax(best, sh.a);
  // block-uniform branch; greedy too where max(x) / t overflows (a tiny t): its limit, as the reference (the
  // softmax of inf - inf was NaN, and the argmax of NaN scores token 0, maybe outside the top-k)
  if (!(t > 0.f) || isinf(__fdiv_rn(greedy.v, t))) return in_vocab(greedy.i, V);

  // k-th largest key (see the header) as the offset `lo`, block-uniform; 0 keeps every token when top-k is off.
  uint32_t uk[kItems];  // the keys as offsets u
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int bits = x[i] == 0.f ? 0 : __float_as_int(x[i]);  // -0 == +0: one key, so a threshold at 0 keeps both
    const bool valid = i * kThreads + static_cast<int>(threadIdx.x) < V;
    const int key = (valid ? (bits >= 0 ? bits : bits ^ 0x7fffffff) : INT_MIN) >> kShift;  // arithmetic shift
    uk[i] = static_cast<uint32_t>(key) - static_cast<uint32_t>(kKeyMin);
  }
  uint32_t lo = 0;
  if (top_k > 0 && top_k < V) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll 1
    for (int pass = 0; pass < kPasses; ++pass) {
      const int s = max(kBits - 4 * (pass + 1), 0);  // the buckets' width is 2^s (fp16's last pass: 1)
      // bucket b = min((u - lo) >> s, 15) of the keys >= lo: threshold j counts the buckets >= j
      unsigned long long h0 = 0, h1 = 0;  // byte b of h0 (h1): keys of this thread in bucket b (8 + b)
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (uk[i] >= lo) {
          const uint32_t b = min((uk[i] - lo) >> s, 15u);
          const unsigned long long one = 1ull << (8 * (b & 7));
          if (b < 8) h0 += one; else h1 += one;
        }
      }
      // suffix sums: the count of threshold j is that of buckets >= j; two 16-bit counts per word (2w low, 2w + 1 high)
      uint32_t packed[8];
      uint32_t suffix = 0;
#pragma unroll
      for (int b = 15; b >= 0; --b) {
        suffix += static_cast<uint32_t>(((b < 8 ? h0 : h1) >> (8 * (b & 7))) & 0xff);
        packed[b / 2] = b & 1 ? suffix << 16 : packed[b / 2] | suffix;
      }
      // One barrier per pass: the per-warp counts alternate between two scratch buffers, and a buffer is rewritten
      // only two passes later, after every thread (having read it) passed the next pass's barrier.
      uint32_t(*const scratch)[8] = sh.cnt[pass & 1];
#pragma unroll
      for (int w = 0; w < 8; ++w) {
        packed[w] = __reduce_add_sync(0xffffffffu, packed[w]);
        if (lane == 0) scratch[warp][w] = packed[w];
      }
      __syncthreads();
      uint32_t total = 0;  // lane w < 8: the block's counts for thresholds 2w (low half) and 2w + 1 (high half)
      if (lane < 8) {
#pragma unroll
        for (int v = 0; v < kWarpsPerBlock; ++v) total += scratch[v][lane];
      }
      const bool ok0 = lane < 8 && static_cast<int>(total & 0xffffu) >= top_k;
      const bool ok1 = lane < 8 && static_cast<int>(total >> 16) >= top_k;
      // counts fall with j and j = 0 (lo itself) always qualifies: thresholds 0 .. n_ok - 1 qualify
      const int n_ok = __popc(__ballot_sync(0xffffffffu, ok0)) + __popc(__ballot_sync(0xffffffffu, ok1));
      lo += static_cast<uint32_t>(n_ok - 1) << s;
    }
  }

  // Softmax of x / t over all tokens (as the reference), then the exp race over kept tokens.
  const float mx = greedy.v / t;  // == max(x / t): correctly rounded division by t > 0 is monotone
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    x[i] = expf(x[i] / t - mx);  // a true division, as torch's CPU `x / t`
    sum += x[i];
  }
  sum = block_reduce(sum, [](float a, float b) { return a + b; }, sh.f);
  const uint32_t h = hash32(hash32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(step));
  best = ArgMax{-INFINITY, 0x7fffffff};
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int c = i * kThreads + threadIdx.x;
    if (c < V) {
      const float u = (static_cast<float>(hash32(h ^ static_cast<uint32_t>(c)) >> 8) + 0.5f) * (1.0f / 16777216.0f);
      const float score = uk[i] >= lo ? __fdiv_rn(__fdiv_rn(x[i], sum), -logf(u)) : -1.0f;
      best = better(best, ArgMax{score, c});
    }
  }
  return in_vocab(block_argmax(best, sh.a).i, V);
}

}  // namespace dsm::sampling
