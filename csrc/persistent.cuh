// Building blocks of the persistent kernels (depformer.cu, decoder.cu): one block of kThreads per SM runs a sequence
// of phases separated by grid barriers (dsm::grid_barrier). A phase is a GEMV over its weight rows for 1..kMaxRows
// batch rows; each block owns a contiguous share of the rows, which it copies into a ring of kStages shared-memory
// slots kStages phases ahead (cp.async), since weights do not depend on activations: the weight stream runs ahead of
// the chain of dependent phases. Rows that do not fit a slot stream from global memory when the phase computes.
#pragma once
#include <algorithm>

#include "common.cuh"
#include "sample_row.cuh"

namespace dsm::persistent {

constexpr int kThreads = dsm::sampling::kThreads;  // the sampler's block (a persistent kernel's block may sample)
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;   // phases in flight in the weight ring
constexpr int kMaxRows = 4;  // batch rows: each lane keeps an accumulator per row in registers

__host__ __device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Block g's share [lo, hi) of n units: [n g / G, n (g + 1) / G).
__device__ __forceinline__ int split_lo(int n, int g, int G) {
  return static_cast<int>(static_cast<int64_t>(n) * g / G);
}

// A phase's weight rows [*, K], owned by unit: unit u is `per` rows, row j of it at u * a + j * b (per = 1: row u;
// a gate: rows u and units + u; an interleaved RoPE pair: rows 2 u and 2 u + 1). No weights: w == nullptr.
struct Rows {
  const char* w = nullptr;
  int units = 0, K = 0, per = 1;
  int64_t a = 1, b = 0;
};

struct Share {  // this block's units of a phase
  int lo, count;
};
__device__ __forceinline__ Share share_of(const Rows& r) {
  const int lo = split_lo(r.units, blockIdx.x, gridDim.x);
  return {lo, split_lo(r.units, blockIdx.x + 1, gridDim.x) - lo};
}

// Weight row of entry `li` of the block's list: the first rows of its units, then their second rows.
__device__ __forceinline__ int64_t list_row(const Rows& r, Share s, int li) {
  return static_cast<int64_t>(s.lo + li % s.count) * r.a + static_cast<int64_t>(li / s.count) * r.b;
}

// Entries of the block's list that a ring slot of `slot_bytes` holds.
template <typename T>
__device__ __forceinline__ int rows_in_slot(const Rows& r, Share s, size_t slot_bytes) {
  if (r.w == nullptr || s.count <= 0) return 0;
  return static_cast<int>(min(static_cast<size_t>(r.per) * s.count, slot_bytes / (static_cast<size_t>(r.K) * sizeof(T))));
}

// Issue the cp.async copies of the block's rows of `r` into `slot` and commit them as one group (an empty group for a
// phase without weights or past the end, so that every phase owns exactly one group).
template <typename T>
__device__ void prefetch_rows(const Rows& r, char* slot, size_t slot_bytes) {
  const Share s = share_of(r);
  const int rows = rows_in_slot<T>(r, s, slot_bytes);
  const int vecs = r.K * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces per row
  for (int i = threadIdx.x; i < rows * vecs; i += kThreads) {
    const int li = i / vecs, v = i % vecs;
    dsm::cp_async16(slot + static_cast<size_t>(li) * r.K * sizeof(T) + 16 * v,
                    r.w + list_row(r, s, li) * r.K * static_cast<int64_t>(sizeof(T)) + 16 * v);
  }
  dsm::cp_async_commit();
}

// 16 bytes at p (shared or global memory: a generic load) as fp32.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16 / sizeof(T)]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) v[i] = dsm::to_float(e[i]);
}

// acc[b] = dot(weight row, xs[b]) over K for b < B, summed over the warp (every lane gets it): each lane takes
// 16-byte pieces, lane-strided; the row may be in the ring (shared memory) or still in global memory. The order of
// the sum depends on K only: the same bits whichever block computes the row.
template <typename T>
__device__ __forceinline__ void row_dot(const T* wrow, const T* xs, int K, int B, float (&acc)[kMaxRows]) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x % 32;
  // unrolled so that a lane has 4 loads of a global-memory row in flight (16 warps: 32 KB a block), not one
#pragma unroll 4
  for (int c0 = lane * kVec; c0 < K; c0 += 32 * kVec) {
    float wv[kVec];
    load16<T>(wrow + c0, wv);
#pragma unroll
    for (int b = 0; b < kMaxRows; ++b) {
      if (b < B) {
        float xv[kVec];
        load16<T>(xs + b * K + c0, xv);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[b] += wv[i] * xv[i];
      }
    }
  }
#pragma unroll
  for (int b = 0; b < kMaxRows; ++b)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], off);
}

// The GEMV of the block's units of `r` against xs [B, K] (T, shared memory): warps take the units in turn and lane 0
// calls epi(unit, acc0, acc1) with acc0[b] / acc1[b] the dot products of the unit's first / second row.
template <typename T, typename Epilogue>
__device__ void gemv_units(const Rows& r, const T* xs, int B, const char* slot, size_t slot_bytes, Epilogue epi) {
  const Share s = share_of(r);
  const int in_slot = rows_in_slot<T>(r, s, slot_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto row = [&](int li) {
    return li < in_slot ? reinterpret_cast<const T*>(slot) + static_cast<size_t>(li) * r.K
                        : reinterpret_cast<const T*>(r.w) + list_row(r, s, li) * r.K;
  };
  for (int i = warp; i < s.count; i += kWarps) {
    float acc0[kMaxRows] = {}, acc1[kMaxRows] = {};  // named, not [2][...]: registers, not the stack
    row_dot<T>(row(i), xs, r.K, B, acc0);
    if (r.per == 2) row_dot<T>(row(s.count + i), xs, r.K, B, acc1);
    if (lane == 0) epi(s.lo + i, acc0, acc1);
  }
}

// Sum over the block of each batch row's value; every thread gets the sums. `red`: kWarps * kMaxRows floats.
__device__ __forceinline__ void block_sum_rows(float (&v)[kMaxRows], float* red) {
#pragma unroll
  for (int b = 0; b < kMaxRows; ++b)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[b] += __shfl_xor_sync(0xffffffffu, v[b], off);
  __syncthreads();  // red may still be read by the previous reduction
  if (threadIdx.x % 32 == 0)
#pragma unroll
    for (int b = 0; b < kMaxRows; ++b) red[(threadIdx.x / 32) * kMaxRows + b] = v[b];
  __syncthreads();
#pragma unroll
  for (int b = 0; b < kMaxRows; ++b) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += red[w * kMaxRows + b];
    v[b] = s;
  }
}

// Stage B input rows of K values into xs (T) from `src` (row stride K, read through L2: other blocks wrote them),
// then RMSNorm them in place when `alpha` (fp32 math: x * (alpha * rsqrt(eps + mean(x^2))), rounded to T, as torch).
template <typename T>
__device__ void stage_rows(const T* src, int B, int K, const T* alpha, float eps, T* xs, float* red) {
  float ss[kMaxRows] = {};
  for (int b = 0; b < B; ++b)
    for (int c = threadIdx.x; c < K; c += kThreads) {
      const T v = __ldcg(src + static_cast<int64_t>(b) * K + c);
      xs[b * K + c] = v;
      ss[b] += dsm::to_float(v) * dsm::to_float(v);
    }
  if (alpha == nullptr) return;  // the caller's __syncthreads publishes xs
  block_sum_rows(ss, red);
  for (int b = 0; b < B; ++b) {
    const float inv = 1.f / sqrtf(eps + ss[b] / K);
    for (int c = threadIdx.x; c < K; c += kThreads)
      xs[b * K + c] = dsm::from_float<T>(dsm::to_float(xs[b * K + c]) * (dsm::to_float(alpha[c]) * inv));
  }
}

// Arrival of `n` items at `counter`, which completes when `total` have arrived: true for the caller that completes
// it (which re-arms it to 0). The caller fences its writes before; the completer fences before reading the others'
// (the programming guide's last-block pattern). One thread per arrival.
__device__ __forceinline__ bool arrive_last(unsigned* counter, int n, int total) {
  if (n <= 0) return false;  // nothing to add: it could arrive after all others and take the counter for done
  if (atomicAdd(counter, static_cast<unsigned>(n)) + n != static_cast<unsigned>(total)) return false;
  atomicExch(counter, 0u);
  return true;
}

// Shared memory of a persistent kernel: `fixed` bytes of the kernel's own, then kStages ring slots, each of the
// largest share of one phase's weight bytes a block of the G-block grid streams (capped by the device's limit).
struct Smem {
  size_t slot, total;
};
inline Smem smem_plan(size_t fixed, size_t largest_share, int optin) {
  if (fixed + kStages * 16 > static_cast<size_t>(optin)) return {0, 0};
  const size_t slot = std::min(align16(largest_share), (optin - fixed) / kStages / 16 * 16);
  return {slot, fixed + kStages * slot};
}

// The grid of a persistent kernel: `blocks` (0 = one per SM), all resident at once with `smem` bytes each, or 0.
template <typename Kernel>
int resident_grid(Kernel kernel, int blocks, size_t smem) {
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
    return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess) return 0;
  const int G = blocks > 0 ? blocks : sms;
  return per_sm >= 1 && G <= per_sm * sms ? G : 0;  // else the cooperative launch would refuse it
}

inline int optin_smem() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  return cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess ? optin : 0;
}

inline int device_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess ? sms : 0;
}

}  // namespace dsm::persistent
