// Building blocks of the persistent kernels (depformer.cu, decoder.cu): one block of kThreads per SM runs a sequence
// of phases separated by grid barriers (dsm::grid_barrier). A phase is a GEMV over its weight rows for 1..kMaxRows
// batch rows; each block owns a contiguous share of the rows ("units": a row, or the two rows of a gate or RoPE pair).
//
// The weight stream: every weight byte a block reads goes through a ring of kStages shared-memory slots by cp.async,
// in chunks of whole units, kStages chunks ahead of the chunk being computed, across phase boundaries (weights do
// not depend on activations, so the stream runs ahead of the chain of dependent phases and its grid barriers). Each
// computed chunk frees a slot and issues the next chunk (one cp.async group per chunk, empty past the end), so that a
// wait for all but the kStages - 1 most recent groups is always the wait for the chunk at hand. A unit larger than a
// slot is read from global memory when computed (nothing copied for it).
#pragma once
#include <algorithm>

#include "common.cuh"
#include "kv_cache.cuh"
#include "sample_row.cuh"

namespace dsm::persistent {

constexpr int kThreads = dsm::sampling::kThreads;  // the sampler's block (a persistent kernel's block may sample)
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 4;   // chunks in flight in the weight ring
constexpr int kMaxRows = 4;  // batch rows: each lane keeps an accumulator per row in registers

__host__ __device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Element b of a per-row array, and its update, through compile-time indices only. Indexed with a run-time b, such
// an array lives on the stack (local memory) instead of in registers, and the GEMV's inner loop then stores each
// accumulator there as it goes (4 local stores per 16-byte weight load at 4 rows).
__device__ __forceinline__ float row_value(const float (&v)[kMaxRows], int b) {
  float r = v[0];
#pragma unroll
  for (int i = 1; i < kMaxRows; ++i) r = b == i ? v[i] : r;
  return r;
}
__device__ __forceinline__ void set_row(float (&v)[kMaxRows], int b, float x) {
#pragma unroll
  for (int i = 0; i < kMaxRows; ++i) v[i] = b == i ? x : v[i];
}

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

// Units of `r` a chunk holds: as many whole units as fit a slot (0: a unit is larger than a slot).
template <typename T>
__device__ __forceinline__ int chunk_units(const Rows& r, size_t slot_bytes) {
  return static_cast<int>(slot_bytes / (static_cast<size_t>(r.per) * r.K * sizeof(T)));
}

// Units [u0, u0 + n) of this block's share in a chunk: u0 from the share's start.
__device__ __forceinline__ int chunk_size(int per_chunk, int count, int u0) {
  return per_chunk > 0 ? min(per_chunk, count - u0) : 1;
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

// The block's weight stream (see the header): `rows_of(p)` gives phase p's Rows, for p < phases.
template <typename T, typename RowsOf>
struct WeightStream {
  RowsOf rows_of;
  int phases;
  char* ring;
  size_t slot_bytes;
  int issued = 0, consumed = 0;  // chunks
  int next_phase = 0, next_unit = 0;  // the producer's position

  // Issue the next chunk of the stream into its slot, as one cp.async group (empty past the end).
  __device__ void issue() {
    while (next_phase < phases) {
      const Rows r = rows_of(next_phase);
      const Share s = share_of(r);
      if (r.w == nullptr || next_unit >= s.count) {
        ++next_phase;
        next_unit = 0;
        continue;
      }
      const int per_chunk = chunk_units<T>(r, slot_bytes);
      const int n = chunk_size(per_chunk, s.count, next_unit);
      if (per_chunk > 0) {  // rows in unit-major order: unit i's row j at slot row i * per + j
        char* slot = ring + (issued % kStages) * slot_bytes;
        const int vecs = r.K * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces per row
        for (int i = threadIdx.x; i < n * r.per * vecs; i += kThreads) {
          const int row = i / vecs, v = i % vecs, u = s.lo + next_unit + row / r.per;
          const int64_t src_row = static_cast<int64_t>(u) * r.a + static_cast<int64_t>(row % r.per) * r.b;
          dsm::cp_async16(slot + static_cast<size_t>(row) * r.K * sizeof(T) + 16 * v,
                          r.w + src_row * r.K * static_cast<int64_t>(sizeof(T)) + 16 * v);
        }
      }
      next_unit += n;
      break;
    }
    dsm::cp_async_commit();
    ++issued;
  }

  __device__ void start() {
    for (int i = 0; i < kStages; ++i) issue();
  }

  // The GEMV of this block's units of phase p's rows `r` against xs [B, K] (T, shared memory), chunk by chunk: warps
  // take a chunk's units in turn and lane 0 calls epi(unit, acc0, acc1) with the dot products of the unit's rows.
  template <typename Epilogue>
  __device__ void gemv(const Rows& r, const T* xs, int B, Epilogue epi) {
    const Share s = share_of(r);
    const int per_chunk = chunk_units<T>(r, slot_bytes);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int u0 = 0; u0 < s.count;) {
      const int n = chunk_size(per_chunk, s.count, u0);
      dsm::cp_async_wait<kStages - 1>();  // this chunk's copies (each thread's own) ...
      __syncthreads();                    // ... and everyone else's
      const T* slot = reinterpret_cast<const T*>(ring + (consumed % kStages) * slot_bytes);
      for (int i = warp; i < n; i += kWarps) {
        const int u = s.lo + u0 + i;
        auto row = [&](int j) {
          return per_chunk > 0 ? slot + static_cast<size_t>(i * r.per + j) * r.K
                               : reinterpret_cast<const T*>(r.w) + (static_cast<int64_t>(u) * r.a + j * r.b) * r.K;
        };
        float acc0[kMaxRows] = {}, acc1[kMaxRows] = {};  // named, not [2][...]: registers, not the stack
        row_dot<T>(row(0), xs, r.K, B, acc0);
        if (r.per == 2) row_dot<T>(row(1), xs, r.K, B, acc1);
        if (lane == 0) epi(u, acc0, acc1);
      }
      __syncthreads();  // the slot is free
      ++consumed;
      issue();
      u0 += n;
    }
  }

  __device__ void finish() { dsm::cp_async_wait<0>(); }
};

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

// RMSNorm in place of B staged rows xs [B, K] whose per-thread sums of squares are `ss` (each thread normalizes the
// columns it staged, c = threadIdx.x + j kThreads): fp32 math, x * (alpha * rsqrt(eps + mean(x^2))), rounded to T,
// as torch.
template <typename T>
__device__ void rms_norm_staged(T* xs, int B, int K, const T* alpha, float eps, float (&ss)[kMaxRows], float* red) {
  block_sum_rows(ss, red);
  for (int b = 0; b < B; ++b) {
    const float inv = 1.f / sqrtf(eps + row_value(ss, b) / K);
    for (int c = threadIdx.x; c < K; c += kThreads)
      xs[b * K + c] = dsm::from_float<T>(dsm::to_float(xs[b * K + c]) * (dsm::to_float(alpha[c]) * inv));
  }
}

// Stage B input rows of K values into xs (T) from `src` (row stride K, read through L2: other blocks wrote them),
// then RMSNorm them in place when `alpha`.
template <typename T>
__device__ void stage_rows(const T* src, int B, int K, const T* alpha, float eps, T* xs, float* red) {
  float ss[kMaxRows] = {};
  for (int b = 0; b < B; ++b) {
    float s = 0.f;
    for (int c = threadIdx.x; c < K; c += kThreads) {
      const T v = __ldcg(src + static_cast<int64_t>(b) * K + c);
      xs[b * K + c] = v;
      s += dsm::to_float(v) * dsm::to_float(v);
    }
    set_row(ss, b, s);
  }
  if (alpha != nullptr) rms_norm_staged<T>(xs, B, K, alpha, eps, ss, red);  // else the caller's barrier publishes xs
}

// Stage B input rows into xs as stage_rows, LayerNormed: (x - mean) * rsqrt(var + eps) * weight + bias in fp32
// (biased variance, as torch's layer_norm), rounded to T.
template <typename T>
__device__ void stage_rows_layernorm(const T* src, int B, int K, const T* weight, const T* bias, float eps, T* xs,
                                     float* red) {
  float mean[kMaxRows] = {};
  for (int b = 0; b < B; ++b) {
    float s = 0.f;
    for (int c = threadIdx.x; c < K; c += kThreads) {
      const T v = __ldcg(src + static_cast<int64_t>(b) * K + c);
      xs[b * K + c] = v;
      s += dsm::to_float(v);
    }
    set_row(mean, b, s);
  }
  block_sum_rows(mean, red);
  float var[kMaxRows] = {};
  for (int b = 0; b < B; ++b) {
    const float mb = row_value(mean, b) / K;
    float s = 0.f;
    for (int c = threadIdx.x; c < K; c += kThreads) {
      const float d = dsm::to_float(xs[b * K + c]) - mb;
      s += d * d;
    }
    set_row(mean, b, mb);
    set_row(var, b, s);
  }
  block_sum_rows(var, red);
  for (int b = 0; b < B; ++b) {
    const float inv = 1.f / sqrtf(row_value(var, b) / K + eps), mb = row_value(mean, b);
    for (int c = threadIdx.x; c < K; c += kThreads)
      xs[b * K + c] = dsm::from_float<T>((dsm::to_float(xs[b * K + c]) - mb) * inv * dsm::to_float(weight[c]) +
                                         dsm::to_float(bias[c]));
  }
}

// One query's attention, kept by a warp: lane l holds elements d = l + 32 i < D (i < kPer) of the query and of the
// weighted sum, in fp32; keys are absorbed one at a time (online softmax), read through L2 (other blocks wrote them),
// of any cache element type (kv_cache.cuh).
template <int kPer>
struct WarpSoftmax {
  float m = -INFINITY, l = 0.f, acc[kPer] = {};

  template <typename T>
  __device__ __forceinline__ void absorb(const float (&q)[kPer], const T* k, const T* v, int D, float scale) {
    const int lane = threadIdx.x % 32;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < D) dot += q[i] * dsm::cache_ldcg(k + lane + 32 * i);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float score = dot * scale, m_new = fmaxf(m, score);
    const float corr = expf(m - m_new), pr = expf(score - m_new);
    l = l * corr + pr;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < D) acc[i] = acc[i] * corr + pr * dsm::cache_ldcg(v + lane + 32 * i);
    m = m_new;
  }
};

// A query of D elements from global memory (through L2) into a warp's registers, as WarpSoftmax holds it.
template <int kPer, typename T>
__device__ __forceinline__ void load_query(const T* q, int D, float (&out)[kPer]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kPer; ++i) out[i] = lane + 32 * i < D ? dsm::to_float(__ldcg(q + lane + 32 * i)) : 0.f;
}

// The FFN's gate rows: unit u is rows u (gate) and hidden + u (value) of linear_in [2 hidden, K].
__device__ __forceinline__ Rows gate_rows(const void* w, int hidden, int K) {
  return Rows{static_cast<const char*>(w), hidden, K, 2, 1, hidden};
}

// Epilogues with the reference's rounding points (each torch op rounds to T): silu(gate) * value of a gate pair ...
template <typename T>
__device__ __forceinline__ T silu_gate(float gate_acc, float value_acc) {
  const float g = dsm::to_float(dsm::from_float<T>(gate_acc));
  const T act = dsm::from_float<T>(g / (1.f + expf(-g)));
  return dsm::from_float<T>(dsm::to_float(act) * dsm::to_float(dsm::from_float<T>(value_acc)));
}

// ... GELU (erf form, torch's default) of a row ...
template <typename T>
__device__ __forceinline__ T gelu(float acc) {
  const float y = dsm::to_float(dsm::from_float<T>(acc));
  return dsm::from_float<T>(y * 0.5f * (1.f + erff(y * 0.70710678118654752f)));
}

// ... and x += LayerScale(y) at column c of the residual stream (scale NULL: none); the caller owns the column.
template <typename T>
__device__ __forceinline__ void add_residual(T* xp, float acc, const T* scale, int c) {
  const T y = dsm::from_float<T>(acc);
  const T ys = scale ? dsm::from_float<T>(dsm::to_float(scale[c]) * dsm::to_float(y)) : y;
  *xp = dsm::from_float<T>(dsm::to_float(__ldcg(xp)) + dsm::to_float(ys));
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

inline int device_attribute(cudaDeviceAttr attr) {  // of the current device; 0 when it cannot be read
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) return 0;
  return value;
}

// Bytes of the largest share of a phase of `units` units (`per` rows of K elements each) a block of G streams.
inline size_t share_bytes(int units, int K, int per, int G, size_t elem) {
  return static_cast<size_t>((units + G - 1) / G) * per * K * elem;
}

// How a persistent kernel launches: `grid` blocks, all resident at once (0: it cannot run), each with `smem` bytes of
// shared memory: the kernel's `fixed` bytes, then kStages ring slots of `slot` bytes, each as large as the largest
// share of one phase's weights (`largest_share(G)`) or as the device's limit allows.
struct Plan {
  int grid = 0;
  size_t slot = 0, smem = 0;
};

template <typename Kernel, typename LargestShare>
Plan plan_launch(Kernel kernel, int blocks, size_t fixed, LargestShare largest_share) {
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int G = blocks > 0 ? blocks : sms;  // one block per SM by default
  if (G < 1 || fixed + kStages * 16 > static_cast<size_t>(optin)) return {};
  Plan plan;
  plan.slot = std::min(align16(largest_share(G)), (optin - fixed) / kStages / 16 * 16);
  plan.smem = fixed + kStages * plan.slot;
  int per_sm = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem)) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem) != cudaSuccess)
    return {};
  plan.grid = per_sm >= 1 && G <= per_sm * sms ? G : 0;  // else the cooperative launch would refuse it
  return plan;
}

}  // namespace dsm::persistent
