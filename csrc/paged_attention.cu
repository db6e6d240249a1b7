// Paged KV cache: append_kv and split-K (flash-decoding) decode attention over a ring of pages.
//
// Layout (dsm_kernels.reference): pool [num_pages, page_size, H, D]; absolute position p of slot b lives in page
// block_table[b, (p / page_size) % pages_per_slot], row p % page_size; the query at seq_lens[b] - 1 sees the last
// `context` positions; seq_lens[b] == 0 gives zeros.
//
// Decode: block (b*H + h, split) streams `chunk` positions of the window. A group of D/8 lanes owns one key (each
// lane 8 columns = one 16-byte load), so a warp reads 32/(D/8) keys at once and a block of 4 warps keeps
// kUnroll of those in flight before any arithmetic (latency hiding at batch 1). Online softmax in fp32, base 2.
// The partial (m, l, acc) of each split goes to a workspace. With a counter buffer the last split of a (slot, head)
// to finish merges them (one launch; each counter is re-armed to 0 by its last arriver, so a buffer zeroed once
// serves every later launch, graph replays included); without one, a second kernel merges. With one split the
// block writes the output directly.
//
// fp8 KV cache (cache dtype code DSM_FP8_E4M3): append stores clamp(x, -448, 448) rounded to nearest even as e4m3,
// no scale (cvt.rn.satfinite: overflow saturates, NaN stays NaN), exactly dsm_kernels.reference.append_kv_ref;
// decode reads the cache as e4m3 (8 elements = one 8-byte load per lane) and q/out keep their own dtype.
#include "kv_cache.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;

using dsm::fp8;
using dsm::to_cache;

// 8 consecutive cache elements as fp32 (16-byte aligned loads for 16-bit types, 8-byte for fp8), through L2: the
// kernel before (a programmatic dependency) wrote this step's K/V (dsm::load_f32).
template <typename TC>
__device__ __forceinline__ void load8(const TC* __restrict__ p, float (&v)[8]) {
  dsm::load_f32<TC, 8, true, true>(p, v);
}
template <>
__device__ __forceinline__ void load8<fp8>(const fp8* __restrict__ p, float (&v)[8]) {
  const uint2 raw = __ldcg(reinterpret_cast<const uint2*>(p));
  const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[i], __NV_E4M3)));
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <typename TIn, typename TC>
__global__ void append_kv_kernel(const TIn* __restrict__ k, const TIn* __restrict__ v, TC* __restrict__ kc,
                                 TC* __restrict__ vc, const int64_t* __restrict__ slot_mapping, int HD,
                                 int page_size, int64_t stride_kb, int64_t stride_vb, int64_t stride_kcp,
                                 int64_t stride_kcs, int64_t stride_vcp, int64_t stride_vcs) {
  const int b = blockIdx.x;
  const int64_t row = slot_mapping[b];
  if (row < 0) return;
  const int64_t page = row / page_size, off = row % page_size;
  TC* krow = kc + page * stride_kcp + off * stride_kcs;
  TC* vrow = vc + page * stride_vcp + off * stride_vcs;
  for (int i = threadIdx.x; i < HD; i += blockDim.x) {
    krow[i] = to_cache<TC>(dsm::to_float(k[b * stride_kb + i]));
    vrow[i] = to_cache<TC>(dsm::to_float(v[b * stride_vb + i]));
  }
}

// out[d] for one (slot, head) from its num_splits partials (m, l, acc[D]); the block's threads stride over d. The
// loads go through L2 (__ldcg): in the last-arriver merge the partials were written by other blocks of the launch.
template <typename T, int D>
__device__ __forceinline__ void merge_splits(T* __restrict__ out, const float* part_m, const float* part_l,
                                             const float* part_acc, int num_splits) {
  float mm = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mm = fmaxf(mm, __ldcg(part_m + s));
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float ll = 0.f, aa = 0.f;
#pragma unroll 4
    for (int s = 0; s < num_splits; ++s) {
      const float a = exp2f(__ldcg(part_m + s) - mm);
      ll += __ldcg(part_l + s) * a;
      aa += __ldcg(part_acc + static_cast<int64_t>(s) * D + d) * a;
    }
    out[d] = dsm::from_float<T>(ll > 0.f ? aa / ll : 0.f);  // inactive slot -> 0
  }
}

template <typename T, typename TC, int D>
__global__ void __launch_bounds__(kWarps * 32) paged_decode_kernel(
    T* __restrict__ out, const T* __restrict__ q, const TC* __restrict__ k_cache, const TC* __restrict__ v_cache,
    const int32_t* __restrict__ block_table, const int32_t* __restrict__ seq_lens, int H, int page_size,
    int pages_per_slot, int context, float qk_scale, int num_splits, int chunk, float* __restrict__ part_m,
    float* __restrict__ part_l, float* __restrict__ part_acc, int* __restrict__ counters, int64_t stride_qb,
    int64_t stride_qh, int64_t stride_kp, int64_t stride_ks, int64_t stride_vp, int64_t stride_vs,
    int64_t stride_bt) {
  constexpr int kTpk = D / 8;          // lanes per key
  constexpr int kKpw = 32 / kTpk;      // keys per warp per step
  constexpr int kStep = kWarps * kKpw;  // keys per block per step
  const int bh = blockIdx.x, b = bh / H, h = bh % H, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / kTpk, t = lane % kTpk;
  dsm::pdl_launch_and_wait();  // q and the new K/V come from the kernel before

  // Every input may come from a kernel of this step, the one before included: loads go through L2 (dsm::load_f32).
  const int n = __ldcg(seq_lens + b);
  const int qpos = n - 1;
  const int lo = max(qpos - context + 1, 0);
  const int start = lo + split * chunk;
  const int end = min(start + chunk, n);  // n == 0 -> empty

  float qv[8];
  dsm::load_f32<T, 8, true, true>(q + b * stride_qb + h * stride_qh + t * 8, qv);
#pragma unroll
  for (int i = 0; i < 8; ++i) qv[i] *= qk_scale;
  const int32_t* bt = block_table + b * stride_bt;
  const int64_t col = static_cast<int64_t>(h) * D + t * 8;

  float m = -1e30f, l = 0.f, acc[8];  // finite start: a fully masked step gives exp2(-inf) = 0, never NaN
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;

  // The trip count is warp-uniform (the shuffles below need every lane); lanes past `end` load nothing.
  for (int wbase = start + warp * kKpw; wbase < end; wbase += kStep * kUnroll) {
    const int base = wbase + g;
    float kv[kUnroll][8], vv[kUnroll][8], s[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {  // issue all loads first
      const int p = base + j * kStep;
      if (p < end) {
        const int64_t page = __ldcg(bt + (p / page_size) % pages_per_slot);
        const int64_t r = p % page_size;
        load8<TC>(k_cache + page * stride_kp + r * stride_ks + col, kv[j]);
        load8<TC>(v_cache + page * stride_vp + r * stride_vs + col, vv[j]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) kv[j][i] = vv[j][i] = 0.f;
      }
    }
    float m_new = m;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot += qv[i] * kv[j][i];
#pragma unroll
      for (int off = kTpk / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      s[j] = base + j * kStep < end ? dot : -INFINITY;
      m_new = fmaxf(m_new, s[j]);
    }
    const float alpha = exp2f(m - m_new);
    l *= alpha;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= alpha;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const float p = exp2f(s[j] - m_new);
      l += p;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += p * vv[j][i];
    }
    m = m_new;
  }

  // Merge the kKpw key groups of the warp (lanes t, t + kTpk, ...), then the warps through shared memory.
#pragma unroll
  for (int off = kTpk; off < 32; off <<= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
    const float m_new = fmaxf(m, m_o), a = exp2f(m - m_new), a_o = exp2f(m_o - m_new);
    l = l * a + l_o * a_o;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = acc[i] * a + __shfl_xor_sync(0xffffffffu, acc[i], off) * a_o;
    m = m_new;
  }
  __shared__ float s_m[kWarps], s_l[kWarps], s_acc[kWarps][D];
  if (g == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[warp][t * 8 + i] = acc[i];
    if (t == 0) {
      s_m[warp] = m;
      s_l[warp] = l;
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float mm = s_m[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mm = fmaxf(mm, s_m[w]);
    float ll = 0.f, aa = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(s_m[w] - mm);
      ll += s_l[w] * a;
      aa += s_acc[w][d] * a;
    }
    if (num_splits == 1) {
      out[static_cast<int64_t>(bh) * D + d] = dsm::from_float<T>(ll > 0.f ? aa / ll : 0.f);
    } else {
      const int64_t idx = static_cast<int64_t>(bh) * num_splits + split;
      part_acc[idx * D + d] = aa;
      if (d == 0) {
        part_m[idx] = mm;
        part_l[idx] = ll;
      }
    }
  }
  if (num_splits == 1 || counters == nullptr) return;
  // Last arriver: every thread publishes its partial stores before thread 0 counts the block in.
  __shared__ bool s_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    s_last = atomicAdd(counters + bh, 1) == num_splits - 1;
    if (s_last) counters[bh] = 0;  // all splits have counted: re-arm for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const int64_t first = static_cast<int64_t>(bh) * num_splits;
  merge_splits<T, D>(out + static_cast<int64_t>(bh) * D, part_m + first, part_l + first, part_acc + first * D,
                     num_splits);
}

template <typename T, int D>
__global__ void paged_decode_merge_kernel(T* __restrict__ out, const float* __restrict__ part_m,
                                          const float* __restrict__ part_l, const float* __restrict__ part_acc,
                                          int num_splits) {
  const int64_t bh = blockIdx.x;
  dsm::pdl_launch_and_wait();
  merge_splits<T, D>(out + bh * D, part_m + bh * num_splits, part_l + bh * num_splits,
                     part_acc + bh * num_splits * D, num_splits);
}

template <typename T, typename TC, int D>
cudaError_t launch_decode(void* out, const void* q, const void* k_cache, const void* v_cache,
                          const int32_t* block_table, const int32_t* seq_lens, int B, int H, int page_size,
                          int pages_per_slot, int context, float scale, int num_splits, float* part_m,
                          float* part_l, float* part_acc, int* counters, int64_t stride_qb, int64_t stride_qh,
                          int64_t stride_kp, int64_t stride_ks, int64_t stride_vp, int64_t stride_vs,
                          int64_t stride_bt, int pdl, cudaStream_t stream) {
  const int chunk = (context + num_splits - 1) / num_splits;
  cudaError_t err = dsm::launch(
      paged_decode_kernel<T, TC, D>, dim3(B * H, num_splits), dim3(kWarps * 32), stream, pdl != 0,
      static_cast<T*>(out), static_cast<const T*>(q), static_cast<const TC*>(k_cache),
      static_cast<const TC*>(v_cache), block_table, seq_lens, H, page_size, pages_per_slot, context,
      scale * kLog2e, num_splits, chunk, part_m, part_l, part_acc, counters, stride_qb, stride_qh, stride_kp,
      stride_ks, stride_vp, stride_vs, stride_bt);
  if (err == cudaSuccess && num_splits > 1 && counters == nullptr) {
    err = dsm::launch(paged_decode_merge_kernel<T, D>, dim3(B * H), dim3(D), stream, pdl != 0, static_cast<T*>(out),
                      static_cast<const float*>(part_m), static_cast<const float*>(part_l),
                      static_cast<const float*>(part_acc), num_splits);
  }
  return err;
}

#define DSM_DECODE_PARAMS                                                                                    \
  void *out, const void *q, const void *k_cache, const void *v_cache, const int32_t *block_table,            \
      const int32_t *seq_lens, int B, int H, int page_size, int pages_per_slot, int context, float scale,   \
      int num_splits, float *part_m, float *part_l, float *part_acc, int *counters, int64_t stride_qb,      \
      int64_t stride_qh, int64_t stride_kp, int64_t stride_ks, int64_t stride_vp, int64_t stride_vs,        \
      int64_t stride_bt, int pdl, cudaStream_t stream
#define DSM_DECODE_ARGS                                                                                       \
  out, q, k_cache, v_cache, block_table, seq_lens, B, H, page_size, pages_per_slot, context, scale,          \
      num_splits, part_m, part_l, part_acc, counters, stride_qb, stride_qh, stride_kp, stride_ks, stride_vp, \
      stride_vs, stride_bt, pdl, stream

template <typename T, typename TC>
cudaError_t launch_decode_head_dim(int head_dim, DSM_DECODE_PARAMS) {
  switch (head_dim) {  // D/8 lanes per key must divide a warp
    case 16: return launch_decode<T, TC, 16>(DSM_DECODE_ARGS);
    case 32: return launch_decode<T, TC, 32>(DSM_DECODE_ARGS);
    case 64: return launch_decode<T, TC, 64>(DSM_DECODE_ARGS);
    case 128: return launch_decode<T, TC, 128>(DSM_DECODE_ARGS);
    case 256: return launch_decode<T, TC, 256>(DSM_DECODE_ARGS);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename TC>
cudaError_t decode_occupancy_head_dim(int head_dim, int* blocks) {
  constexpr int kThreads = kWarps * 32;
  switch (head_dim) {
    case 16: return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, paged_decode_kernel<T, TC, 16>, kThreads, 0);
    case 32: return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, paged_decode_kernel<T, TC, 32>, kThreads, 0);
    case 64: return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, paged_decode_kernel<T, TC, 64>, kThreads, 0);
    case 128:
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, paged_decode_kernel<T, TC, 128>, kThreads, 0);
    case 256:
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, paged_decode_kernel<T, TC, 256>, kThreads, 0);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" cudaError_t dsm_launch_append_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                                            const int64_t* slot_mapping, int B, int HD, int page_size, int in_dtype,
                                            int cache_dtype, int64_t stride_kb, int64_t stride_vb,
                                            int64_t stride_kcp, int64_t stride_kcs, int64_t stride_vcp,
                                            int64_t stride_vcs, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
#define DSM_APPEND_LAUNCH(TIn, TC)                                                                                 \
  return dsm::launch(append_kv_kernel<TIn, TC>, dim3(B), dim3(128), stream, false, static_cast<const TIn*>(k),   \
                     static_cast<const TIn*>(v), static_cast<TC*>(k_cache), static_cast<TC*>(v_cache), slot_mapping, \
                     HD, page_size, stride_kb, stride_vb, stride_kcp, stride_kcs, stride_vcp, stride_vcs)
  if (cache_dtype == DSM_FP8_E4M3) {
    DSM_DISPATCH_DTYPE(in_dtype, TIn, DSM_APPEND_LAUNCH(TIn, fp8));
  } else {
    DSM_DISPATCH_DTYPE(in_dtype, TIn, DSM_DISPATCH_DTYPE(cache_dtype, TC, DSM_APPEND_LAUNCH(TIn, TC)));
  }
#undef DSM_APPEND_LAUNCH
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t dsm_launch_paged_decode_attention(
    void* out, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_table,
    const int32_t* seq_lens, int B, int H, int head_dim, int dtype, int cache_dtype, int page_size,
    int pages_per_slot, int context, float scale, int num_splits, float* part_m, float* part_l, float* part_acc,
    int* counters, int64_t stride_qb, int64_t stride_qh, int64_t stride_kp, int64_t stride_ks, int64_t stride_vp,
    int64_t stride_vs, int64_t stride_bt, int pdl, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (num_splits < 1) return cudaErrorInvalidValue;
  DSM_DISPATCH_DTYPE(dtype, T, {
    if (cache_dtype == dtype) return launch_decode_head_dim<T, T>(head_dim, DSM_DECODE_ARGS);
    if (cache_dtype == DSM_FP8_E4M3) return launch_decode_head_dim<T, fp8>(head_dim, DSM_DECODE_ARGS);
    return cudaErrorInvalidValue;
  });
  return cudaErrorInvalidValue;
}
#undef DSM_DECODE_ARGS
#undef DSM_DECODE_PARAMS

extern "C" cudaError_t dsm_paged_decode_blocks_per_sm(int head_dim, int dtype, int cache_dtype, int* blocks) {
  *blocks = 0;
  DSM_DISPATCH_DTYPE(dtype, T, {
    if (cache_dtype == dtype) return decode_occupancy_head_dim<T, T>(head_dim, blocks);
    if (cache_dtype == DSM_FP8_E4M3) return decode_occupancy_head_dim<T, fp8>(head_dim, blocks);
    return cudaErrorInvalidValue;
  });
  return cudaErrorInvalidValue;
}
