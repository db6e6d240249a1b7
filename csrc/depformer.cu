// Persistent depth transformer: one frame's dep_q codebook steps (DSM-SPEC §3) for 1..4 rows in ONE cooperative
// launch. Semantics: dsm_kernels.reference.depformer_frame_ref; the Triton twin is dsm_kernels/depformer.py.
//
// Why one launch: at batch 1 a codebook step is ~20 dependent GEMVs of 2-8 MB each (92.6 MB a codebook at the TTS
// shapes, 2.95 GB a frame). Launched one by one, each pays a launch gap and starts its weight stream only when it
// starts. Here one block per SM runs every phase of the frame in order, with a grid-wide barrier between two phases,
// and streams the weights of the next phases into a ring of shared memory (cp.async) while it computes and waits:
// weights do not depend on activations, so the HBM stream runs ahead of the dependent chain.
//
// Phases: the frame's input projections (every distinct depformer_in of z at once), then per codebook k:
// per layer: (1) RMSNorm + QKV (layer 0 first builds x = proj[k] + Emb_k(prev token)), and the attention over the
// steps 0..k of this frame: the last block to write a head's q/k/v rows (a counter per head) runs that head's
// attention, one warp per row; (2) out-projection + LayerScale + residual; (3) RMSNorm + linear_in + SiLU gate;
// (4) linear_out + LayerScale + residual; then the head (+ optional RMSNorm), whose last block samples every row
// (sample_row.cuh, the sampler kernel's code). 1 + dep_q (4 layers + 1) phases (545 at the TTS shapes), a grid
// barrier after each: the Triton kernels' last-program tricks, with barriers in place of launches.
//
// Work split: block g of G owns rows [N g / G, N (g + 1) / G) of a phase's N weight rows (the gate phase: pairs of
// rows c, hidden + c); a warp computes whole rows (dot products over K, reduced by shuffles). The residual stream x
// has one owner per column, the block that owns that row of the dim-wide phases, which alone writes it. Fixed split,
// no atomics in the arithmetic: deterministic, graph-replay stable.
//
// Numerics: as the Triton kernels, fp32 accumulation and rounding to the model dtype T wherever the reference's torch
// ops round (GEMM outputs, normed inputs, LayerScale products, residual adds, gate), so fp32 models match tightly.
#include <algorithm>
#include <cmath>

#include "sample_row.cuh"

namespace {

using dsm::sampling::SampleScratch;
using dsm::sampling::kThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;   // phases in flight in the shared-memory weight ring
constexpr int kMaxRows = 4;  // batch rows: accumulators live in registers
constexpr int kMaxHeadDim = 256;

enum Kind { kProj, kQkv, kOut, kIn, kFfo, kHead };

struct Phase {
  Kind kind;
  int k = 0, layer = 0;
  const char* w = nullptr;  // weight rows [n or 2 n (gate), K]
  int n = 0, K = 0;         // rows (gate: row pairs) and row length
  bool gate = false;
};

// The phase `p` of the frame, from the shapes and the table alone (every block derives the same).
__device__ __forceinline__ Phase phase_of(const DsmDepformerArgs& a, int p) {
  Phase ph;
  if (p == 0) {
    ph.kind = kProj;
    ph.w = static_cast<const char*>(a.in_proj);
    ph.n = a.n_in * a.dim;
    ph.K = a.d_model;
    return ph;
  }
  const int per_k = 4 * a.layers + 1, q = p - 1;
  ph.k = q / per_k;
  const int s = q % per_k;
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  if (s == 4 * a.layers) {
    ph.kind = kHead;
    ph.w = reinterpret_cast<const char*>(t[8 * a.layers]);
    ph.n = a.card;
    ph.K = a.dim;
    return ph;
  }
  ph.layer = s / 4;
  const int64_t* lw = t + 8 * ph.layer;
  switch (s % 4) {
    case 0: ph.kind = kQkv; ph.w = reinterpret_cast<const char*>(lw[0]); ph.n = 3 * a.dim; ph.K = a.dim; break;
    case 1: ph.kind = kOut; ph.w = reinterpret_cast<const char*>(lw[1]); ph.n = a.dim; ph.K = a.dim; break;
    case 2:
      ph.kind = kIn; ph.w = reinterpret_cast<const char*>(lw[2]); ph.n = a.hidden; ph.K = a.dim; ph.gate = true;
      break;
    default: ph.kind = kFfo; ph.w = reinterpret_cast<const char*>(lw[3]); ph.n = a.dim; ph.K = a.hidden; break;
  }
  return ph;
}

__device__ __forceinline__ int split_lo(int n, int g, int G) {
  return static_cast<int>(static_cast<int64_t>(n) * g / G);
}

// Weight row `li` of this block's list for phase `ph` (rows lo.. hi, then, for the gate, hidden + lo .. hidden + hi).
__device__ __forceinline__ int64_t block_row(const Phase& ph, int lo, int hi, int li) {
  return li < hi - lo ? lo + li : static_cast<int64_t>(ph.n) + lo + (li - (hi - lo));
}

// Rows of this block's list that the ring slot holds (the rest stream from global memory at compute time).
template <typename T>
__device__ __forceinline__ int rows_in_slot(const Phase& ph, int rows, size_t slot_bytes) {
  if (ph.w == nullptr) return 0;
  const size_t per = static_cast<size_t>(ph.K) * sizeof(T);
  return static_cast<int>(min(static_cast<size_t>(rows), slot_bytes / per));
}

// Issue the copies of phase p's weights into `slot`, as one cp.async group (empty past the frame's end).
template <typename T>
__device__ void prefetch(const DsmDepformerArgs& a, int p, int P, char* slot, size_t slot_bytes) {
  if (p < P) {
    const Phase ph = phase_of(a, p);
    const int lo = split_lo(ph.n, blockIdx.x, gridDim.x), hi = split_lo(ph.n, blockIdx.x + 1, gridDim.x);
    const int rows = rows_in_slot<T>(ph, (ph.gate ? 2 : 1) * (hi - lo), slot_bytes);
    const int vecs = ph.K * static_cast<int>(sizeof(T)) / 16;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < rows * vecs; i += kThreads) {
      const int li = i / vecs, v = i % vecs;
      const char* src = ph.w + block_row(ph, lo, hi, li) * ph.K * static_cast<int64_t>(sizeof(T)) + 16 * v;
      dsm::cp_async16(slot + static_cast<size_t>(li) * ph.K * sizeof(T) + 16 * v, src);
    }
  }
  dsm::cp_async_commit();
}

// Sum over the block of each row's value (B <= kMaxRows); every thread gets the sums.
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

__host__ __device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The scratch tensors in `a.work`, each 16-byte aligned: the frame's input projections [B, n_in dim], the residual
// stream x, q and the attention output [B, dim], the gated hidden [B, hidden], and this frame's K and V caches
// [layers, dep_q, B, dim].
enum WorkPart { kWorkProj, kWorkX, kWorkQ, kWorkAttn, kWorkGh, kWorkK, kWorkV, kWorkParts };

// Byte offset of part `part` (kWorkParts: the total size).
__host__ __device__ __forceinline__ size_t work_offset(int B, int dim, int hidden, int n_in, int layers, int dep_q,
                                                       size_t elem, int part) {
  const size_t b = static_cast<size_t>(B), cache = static_cast<size_t>(layers) * dep_q * b * dim;
  const size_t sizes[kWorkParts] = {b * n_in * dim, b * dim, b * dim, b * dim, b * hidden, cache, cache};
  size_t off = 0;
  for (int i = 0; i < part; ++i) off += align16(sizes[i] * elem);
  return off;
}

template <typename T>
struct Work {
  T *proj, *x, *q, *attn, *gh, *kc, *vc;
  __device__ explicit Work(const DsmDepformerArgs& a) {
    T** parts[kWorkParts] = {&proj, &x, &q, &attn, &gh, &kc, &vc};
    for (int i = 0; i < kWorkParts; ++i)
      *parts[i] = reinterpret_cast<T*>(static_cast<char*>(a.work) +
                                       work_offset(a.B, a.dim, a.hidden, a.n_in, a.layers, a.dep_q, sizeof(T), i));
  }
};

// Stage the input rows of a GEMV phase into xs ([B, K] in T, as the reference's F.linear input), RMSNormed when
// `alpha`; layer 0's QKV builds the residual stream x = proj[k] + Emb_k(prev) and writes its owned columns.
template <typename T>
__device__ void stage_input(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, T* xs, float* red) {
  const int B = a.B, K = ph.K;
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  const T* alpha = nullptr;
  const T* src = nullptr;
  bool build = false;
  switch (ph.kind) {
    case kProj: src = static_cast<const T*>(a.z); break;
    case kQkv:
      alpha = reinterpret_cast<const T*>(t[8 * ph.layer + 4]);
      build = ph.layer == 0;
      src = w.x;
      break;
    case kOut: src = w.attn; break;
    case kIn: alpha = reinterpret_cast<const T*>(t[8 * ph.layer + 5]); src = w.x; break;
    case kFfo: src = w.gh; break;
    default: alpha = reinterpret_cast<const T*>(t[8 * a.layers + 1]); src = w.x; break;  // head
  }
  float ss[kMaxRows] = {0.f, 0.f, 0.f, 0.f};
  if (build) {
    const T* table = reinterpret_cast<const T*>(t[8 * a.layers + 2]);
    const T* text2 = static_cast<const T*>(a.text_emb2);
    const int64_t in_index = t[8 * a.layers + 3];
    const int own_lo = split_lo(a.dim, blockIdx.x, gridDim.x), own_hi = split_lo(a.dim, blockIdx.x + 1, gridDim.x);
    for (int b = 0; b < B; ++b) {
      const int64_t id = ph.k == 0 ? a.text_token[b] : __ldcg(a.tokens + static_cast<int64_t>(ph.k - 1) * B + b);
      const bool demux = ph.k == 0 && text2 != nullptr;
      const int64_t row = demux ? id % a.text_vocab : id, second = demux ? id / a.text_vocab - 1 : -1;
      for (int c = threadIdx.x; c < K; c += kThreads) {
        float e = 0.f;
        if (id >= 0) {
          e = dsm::to_float(table[row * a.dim + c]);
          if (second >= 0) e = dsm::to_float(dsm::from_float<T>(e + dsm::to_float(text2[second * a.dim + c])));
        }
        const float p = dsm::to_float(__ldcg(w.proj + static_cast<int64_t>(b) * a.n_in * a.dim + in_index * a.dim + c));
        const T xv = dsm::from_float<T>(p + e);
        xs[b * K + c] = xv;
        if (c >= own_lo && c < own_hi) w.x[b * a.dim + c] = xv;
        ss[b] += dsm::to_float(xv) * dsm::to_float(xv);
      }
    }
  } else {
    for (int b = 0; b < B; ++b)
      for (int c = threadIdx.x; c < K; c += kThreads) {
        const T xv = __ldcg(src + static_cast<int64_t>(b) * K + c);
        xs[b * K + c] = xv;
        ss[b] += dsm::to_float(xv) * dsm::to_float(xv);
      }
  }
  if (alpha == nullptr) return;  // the caller's barrier publishes xs
  block_sum_rows(ss, red);
  for (int b = 0; b < B; ++b) {
    const float inv = 1.f / sqrtf(a.eps + ss[b] / K);  // torch: x * (alpha * rsqrt(eps + mean(x^2))), in fp32
    for (int c = threadIdx.x; c < K; c += kThreads)
      xs[b * K + c] = dsm::from_float<T>(dsm::to_float(xs[b * K + c]) * (dsm::to_float(alpha[c]) * inv));
  }
}

// acc[b] = dot(weight row, xs[b]) over K, summed over the warp (every lane gets it): each lane takes 16-byte pieces,
// lane-strided; the row may be in the ring (shared memory) or still in global memory.
// 16 bytes at p (shared or global memory: a generic load) as fp32.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&v)[16 / sizeof(T)]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < static_cast<int>(16 / sizeof(T)); ++i) v[i] = dsm::to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ void row_dot(const T* wrow, const T* xs, int K, int B, float (&acc)[kMaxRows]) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x % 32;
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

// The GEMV of a phase with its epilogue: warps take the block's rows (pairs for the gate) in turn.
template <typename T>
__device__ void gemv_phase(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, const T* xs,
                           const char* slot, size_t slot_bytes) {
  const int B = a.B, K = ph.K;
  const int lo = split_lo(ph.n, blockIdx.x, gridDim.x), hi = split_lo(ph.n, blockIdx.x + 1, gridDim.x);
  const int in_slot = rows_in_slot<T>(ph, (ph.gate ? 2 : 1) * (hi - lo), slot_bytes);
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto row_ptr = [&](int li) {
    return li < in_slot ? reinterpret_cast<const T*>(slot) + static_cast<size_t>(li) * K
                        : reinterpret_cast<const T*>(ph.w) + block_row(ph, lo, hi, li) * K;
  };
  for (int i = warp; i < hi - lo; i += kWarps) {
    const int r = lo + i;
    float acc[kMaxRows] = {0.f, 0.f, 0.f, 0.f};
    row_dot<T>(row_ptr(i), xs, K, B, acc);
    float acc2[kMaxRows] = {0.f, 0.f, 0.f, 0.f};
    if (ph.gate) row_dot<T>(row_ptr(hi - lo + i), xs, K, B, acc2);
    if (lane != 0) continue;
    for (int b = 0; b < B; ++b) {
      const T y = dsm::from_float<T>(acc[b]);
      switch (ph.kind) {
        case kProj: w.proj[static_cast<int64_t>(b) * ph.n + r] = y; break;
        case kQkv: {
          T* dst = r < a.dim ? w.q + b * a.dim + r
                             : (r < 2 * a.dim ? w.kc : w.vc) +
                                   ((static_cast<int64_t>(ph.layer) * a.dep_q + ph.k) * B + b) * a.dim + r % a.dim;
          *dst = y;
          break;
        }
        case kIn: {  // silu(gate) * value, each rounded as torch's bf16 ops
          const float g = dsm::to_float(y);
          const T act = dsm::from_float<T>(g / (1.f + expf(-g)));
          w.gh[b * a.hidden + r] = dsm::from_float<T>(dsm::to_float(act) * dsm::to_float(dsm::from_float<T>(acc2[b])));
          break;
        }
        case kOut:
        case kFfo: {  // x += LayerScale(y); this block owns column r of x
          const T* scale = reinterpret_cast<const T*>(t[8 * ph.layer + (ph.kind == kOut ? 6 : 7)]);
          const T ys = scale ? dsm::from_float<T>(dsm::to_float(scale[r]) * dsm::to_float(y)) : y;
          T* xp = w.x + b * a.dim + r;
          *xp = dsm::from_float<T>(dsm::to_float(__ldcg(xp)) + dsm::to_float(ys));
          break;
        }
        default:  // head
          static_cast<T*>(a.logits)[(static_cast<int64_t>(ph.k) * B + b) * a.card + r] = y;
          break;
      }
    }
  }
}

// Attention of row b's query in head h over this frame's steps 0..k: one warp, online softmax in fp32.
template <typename T>
__device__ void attend(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, float scale, int h, int b) {
  const int B = a.B, D = a.dim / a.heads, lane = threadIdx.x % 32;
  constexpr int kPer = kMaxHeadDim / 32;
  float q[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    q[i] = d < D ? dsm::to_float(__ldcg(w.q + b * a.dim + h * D + d)) : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int s = 0; s <= ph.k; ++s) {
    const int64_t base = ((static_cast<int64_t>(ph.layer) * a.dep_q + s) * B + b) * a.dim + h * D;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dot += q[i] * dsm::to_float(__ldcg(w.kc + base + d));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float score = dot * scale, m_new = fmaxf(m, score);
    const float corr = expf(m - m_new), pr = expf(score - m_new);
    l = l * corr + pr;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < D) acc[i] = acc[i] * corr + pr * dsm::to_float(__ldcg(w.vc + base + d));
    }
    m = m_new;
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < D) w.attn[b * a.dim + h * D + d] = dsm::from_float<T>(acc[i] / l);
  }
}

// Arrival of this block's `rows` outputs at `counter`, which completes when `total` have arrived: true for the block
// that completes it (it re-arms the counter). The writes before it are published by the fence (the programming
// guide's last-block pattern); the completing block reads them through L2 after its own fence. Thread 0 only.
__device__ __forceinline__ bool arrive_last(unsigned* counter, int rows, int total) {
  if (rows <= 0) return false;  // a block with no rows never completes a counter (it could arrive after all others)
  if (atomicAdd(counter, static_cast<unsigned>(rows)) + rows != static_cast<unsigned>(total)) return false;
  atomicExch(counter, 0u);
  return true;
}

// After the QKV GEMV: heads whose 3 D rows are all written get their attention from the block that wrote the last.
template <typename T>
__device__ void attend_finished_heads(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, float scale,
                                      int* heads_done) {
  const int D = a.dim / a.heads;
  const int lo = split_lo(ph.n, blockIdx.x, gridDim.x), hi = split_lo(ph.n, blockIdx.x + 1, gridDim.x);
  __syncthreads();  // every q/k/v row of this block is written
  if (threadIdx.x == 0) {
    __threadfence();
    int n = 0;
    for (int h = 0; h < a.heads; ++h) {
      int rows = 0;  // this block's rows among head h's q, k and v rows
      for (int sec = 0; sec < 3; ++sec) {
        const int r0 = sec * a.dim + h * D;
        rows += max(0, min(hi, r0 + D) - max(lo, r0));
      }
      if (arrive_last(a.sync + 2 + h, rows, 3 * D)) heads_done[n++] = h;
    }
    heads_done[a.heads] = n;
    __threadfence();
  }
  __syncthreads();
  const int items = heads_done[a.heads] * a.B;
  for (int item = threadIdx.x / 32; item < items; item += kWarps)
    attend<T>(a, w, ph, scale, heads_done[item / a.B], item % a.B);
}

// After the head GEMV: the block that wrote the last logits samples every row's token.
template <typename T, int kItems>
__device__ void sample_if_last(const DsmDepformerArgs& a, const Phase& ph, SampleScratch& scratch, int* flag) {
  const int lo = split_lo(ph.n, blockIdx.x, gridDim.x), hi = split_lo(ph.n, blockIdx.x + 1, gridDim.x);
  __syncthreads();  // every logit row of this block is written
  if (threadIdx.x == 0) {
    __threadfence();
    *flag = arrive_last(a.sync + 2 + a.heads, hi - lo, a.card);
    __threadfence();
  }
  __syncthreads();
  if (!*flag) return;
  constexpr int kShift = dsm::sampling::narrow_key_shift<T>();
  for (int b = 0; b < a.B; ++b) {
    const T* row = static_cast<const T*>(a.logits) + (static_cast<int64_t>(ph.k) * a.B + b) * a.card;
    const int64_t token = dsm::sampling::sample_row<T, kItems, kShift>(
        row, nullptr, a.card, 1.f, a.temperature[b], a.top_k, a.seeds[b], a.steps[b] + ph.k, scratch);
    if (threadIdx.x == 0) a.tokens[static_cast<int64_t>(ph.k) * a.B + b] = token;
  }
}

template <typename T, int kItems>
__global__ void __launch_bounds__(kThreads, 1) depformer_kernel(const DsmDepformerArgs a, float scale, size_t slot_bytes) {
  const Work<T> w(a);
  // shared memory: sampler scratch | row sums | finished heads (+ count) | staged inputs xs [B, max K] | ring slots
  char* smem = dsm::dynamic_smem();
  SampleScratch& sample_scratch = *reinterpret_cast<SampleScratch*>(smem);
  float* red = reinterpret_cast<float*>(smem + align16(sizeof(SampleScratch)));
  int* heads_done = reinterpret_cast<int*>(reinterpret_cast<char*>(red) + align16(kWarps * kMaxRows * sizeof(float)));
  T* xs = reinterpret_cast<T*>(reinterpret_cast<char*>(heads_done) + align16((a.heads + 1) * sizeof(int)));
  const int k_max = max(a.d_model, max(a.dim, a.hidden));
  char* ring = reinterpret_cast<char*>(xs) + align16(static_cast<size_t>(a.B) * k_max * sizeof(T));

  const int P = 1 + a.dep_q * (4 * a.layers + 1);
  for (int p = 0; p < kStages; ++p) prefetch<T>(a, p, P, ring + p * slot_bytes, slot_bytes);
  for (int p = 0; p < P; ++p) {
    const Phase ph = phase_of(a, p);
    char* slot = ring + (p % kStages) * slot_bytes;
    stage_input<T>(a, w, ph, xs, red);
    dsm::cp_async_wait<kStages - 1>();  // this phase's weights are in its slot
    __syncthreads();
    gemv_phase<T>(a, w, ph, xs, slot, slot_bytes);
    if (ph.kind == kQkv) attend_finished_heads<T>(a, w, ph, scale, heads_done);
    if (ph.kind == kHead) sample_if_last<T, kItems>(a, ph, sample_scratch, heads_done);
    __syncthreads();  // the slot is free
    prefetch<T>(a, p + kStages, P, slot, slot_bytes);
    if (p + 1 < P) dsm::grid_barrier(a.sync);
  }
  dsm::cp_async_wait<0>();
}

// The largest share of one phase's weight bytes a block streams (its rows, both rows of a gate pair).
size_t max_block_bytes(const DsmDepformerArgs& a, int G, size_t elem) {
  auto share = [&](int n, int K, int per) { return static_cast<size_t>((n + G - 1) / G) * per * K * elem; };
  return std::max({share(a.n_in * a.dim, a.d_model, 1), share(3 * a.dim, a.dim, 1), share(a.dim, a.dim, 1),
                   share(a.hidden, a.dim, 2), share(a.dim, a.hidden, 1), share(a.card, a.dim, 1)});
}

template <typename T, int kItems>
cudaError_t launch(const DsmDepformerArgs& a, cudaStream_t stream) {
  auto kernel = depformer_kernel<T, kItems>;
  int device = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const int G = a.blocks > 0 ? a.blocks : sms;
  const int k_max = std::max({a.d_model, a.dim, a.hidden});
  const size_t fixed = align16(sizeof(SampleScratch)) + align16(kWarps * kMaxRows * sizeof(float)) +
                       align16((a.heads + 1) * sizeof(int)) + align16(static_cast<size_t>(a.B) * k_max * sizeof(T));
  if (fixed + kStages * 16 > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
  const size_t slot = std::min(align16(max_block_bytes(a, G, sizeof(T))), (optin - fixed) / kStages / 16 * 16);
  const size_t smem = fixed + kStages * slot;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1 || G > per_sm * sms) return cudaErrorInvalidValue;  // the cooperative launch would refuse it
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(a.dim / a.heads)));  // as D**-0.5
  return dsm::launch_cooperative(kernel, dim3(G), dim3(kThreads), smem, stream, a, scale, slot);
}

}  // namespace

extern "C" size_t dsm_depformer_work_bytes(int B, int dim, int hidden, int n_in, int layers, int dep_q, int dtype) {
  return work_offset(B, dim, hidden, n_in, layers, dep_q, dtype == DSM_F32 ? 4 : 2, kWorkParts);
}

extern "C" cudaError_t dsm_launch_depformer_frame(const DsmDepformerArgs* args, cudaStream_t stream) {
  const DsmDepformerArgs& a = *args;
  if (a.B < 1 || a.B > kMaxRows || a.heads < 1 || a.dim % a.heads != 0 || a.dim / a.heads > kMaxHeadDim ||
      a.card < 1 || a.dep_q < 1 || a.layers < 1 || a.n_in < 1)
    return cudaErrorInvalidValue;
  const int vec = a.dtype == DSM_F32 ? 4 : 8;  // 16-byte weight rows: the ring copies and vector loads
  if (a.dim % vec != 0 || a.hidden % vec != 0 || a.d_model % vec != 0) return cudaErrorInvalidValue;
  const int items = (a.card + kThreads - 1) / kThreads;
  DSM_DISPATCH_DTYPE(a.dtype, T, {
    if (items <= 4) return launch<T, 4>(a, stream);
    if (items <= 8) return launch<T, 8>(a, stream);
    if (items <= 16) return launch<T, 16>(a, stream);
    return cudaErrorInvalidValue;
  });
  return cudaErrorInvalidValue;
}
