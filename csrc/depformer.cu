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

#include "persistent.cuh"

namespace {

using namespace dsm::persistent;
using dsm::sampling::SampleScratch;
constexpr int kMaxHeadDim = 256;

enum Kind { kProj, kQkv, kOut, kIn, kFfo, kHead };

struct Phase {
  Kind kind;
  int k = 0, layer = 0;
  Rows rows;
};

// The phase `p` of the frame, from the shapes and the table alone (every block derives the same).
__device__ __forceinline__ Phase phase_of(const DsmDepformerArgs& a, int p) {
  Phase ph;
  if (p == 0) {
    ph.kind = kProj;
    ph.rows = Rows{static_cast<const char*>(a.in_proj), a.n_in * a.dim, a.d_model};
    return ph;
  }
  const int per_k = 4 * a.layers + 1, q = p - 1;
  ph.k = q / per_k;
  const int s = q % per_k;
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  if (s == 4 * a.layers) {
    ph.kind = kHead;
    ph.rows = Rows{reinterpret_cast<const char*>(t[8 * a.layers]), a.card, a.dim};
    return ph;
  }
  ph.layer = s / 4;
  const int64_t* lw = t + 8 * ph.layer;
  switch (s % 4) {
    case 0: ph.kind = kQkv; ph.rows = Rows{reinterpret_cast<const char*>(lw[0]), 3 * a.dim, a.dim}; break;
    case 1: ph.kind = kOut; ph.rows = Rows{reinterpret_cast<const char*>(lw[1]), a.dim, a.dim}; break;
    case 2: ph.kind = kIn; ph.rows = gate_rows(reinterpret_cast<const void*>(lw[2]), a.hidden, a.dim); break;
    default: ph.kind = kFfo; ph.rows = Rows{reinterpret_cast<const char*>(lw[3]), a.dim, a.hidden}; break;
  }
  return ph;
}

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

// Layer 0's input: the residual stream x = proj[k] + Emb_k(prev token) (the text token at k = 0, demuxed), built by
// every block into xs; each block writes the columns of x it owns, then its RMSNorm.
template <typename T>
__device__ void stage_codebook_input(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, const T* alpha,
                                     T* xs, float* red) {
  const int B = a.B, K = a.dim;
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  const T* table = reinterpret_cast<const T*>(t[8 * a.layers + 2]);
  const T* text2 = static_cast<const T*>(a.text_emb2);
  const int64_t in_index = t[8 * a.layers + 3];
  const int own_lo = split_lo(a.dim, blockIdx.x, gridDim.x), own_hi = split_lo(a.dim, blockIdx.x + 1, gridDim.x);
  float ss[kMaxRows] = {};
  for (int b = 0; b < B; ++b) {
    float s = 0.f;
    const int64_t id = ph.k == 0 ? a.text_token[b] : __ldcg(a.tokens + static_cast<int64_t>(b) * a.dep_q + ph.k - 1);
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
      s += dsm::to_float(xv) * dsm::to_float(xv);
    }
    set_row(ss, b, s);
  }
  rms_norm_staged<T>(xs, B, K, alpha, a.eps, ss, red);
}

// Stage the input rows of a GEMV phase into xs ([B, K] in T, as the reference's F.linear input), RMSNormed where the
// reference norms them.
template <typename T>
__device__ void stage_input(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, T* xs, float* red) {
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  switch (ph.kind) {
    case kProj: stage_rows<T>(static_cast<const T*>(a.z), a.B, a.d_model, nullptr, a.eps, xs, red); break;
    case kQkv: {
      const T* alpha = reinterpret_cast<const T*>(t[8 * ph.layer + 4]);
      if (ph.layer == 0) stage_codebook_input<T>(a, w, ph, alpha, xs, red);
      else stage_rows<T>(w.x, a.B, a.dim, alpha, a.eps, xs, red);
      break;
    }
    case kOut: stage_rows<T>(w.attn, a.B, a.dim, nullptr, a.eps, xs, red); break;
    case kIn: stage_rows<T>(w.x, a.B, a.dim, reinterpret_cast<const T*>(t[8 * ph.layer + 5]), a.eps, xs, red); break;
    case kFfo: stage_rows<T>(w.gh, a.B, a.hidden, nullptr, a.eps, xs, red); break;
    default: stage_rows<T>(w.x, a.B, a.dim, reinterpret_cast<const T*>(t[8 * a.layers + 1]), a.eps, xs, red); break;
  }
}

// The GEMV of a phase with its epilogue (lane 0 of the warp that computed the unit).
template <typename T, typename Stream>
__device__ void gemv_phase(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, const T* xs, Stream& stream) {
  const int B = a.B;
  const int64_t* t = a.table + static_cast<int64_t>(ph.k) * DSM_DEP_TABLE_STRIDE(a.layers);
  stream.gemv(ph.rows, xs, B, [&](int r, const float (&acc0)[kMaxRows], const float (&acc1)[kMaxRows]) {
    for (int b = 0; b < B; ++b) {
      const float v0 = row_value(acc0, b), v1 = row_value(acc1, b);  // the unit's rows' dot products for row b
      const T y = dsm::from_float<T>(v0);
      switch (ph.kind) {
        case kProj: w.proj[static_cast<int64_t>(b) * ph.rows.units + r] = y; break;
        case kQkv: {
          T* dst = r < a.dim ? w.q + b * a.dim + r
                             : (r < 2 * a.dim ? w.kc : w.vc) +
                                   ((static_cast<int64_t>(ph.layer) * a.dep_q + ph.k) * B + b) * a.dim + r % a.dim;
          *dst = y;
          break;
        }
        case kIn: w.gh[b * a.hidden + r] = silu_gate<T>(v0, v1); break;
        case kOut:
        case kFfo:  // this block owns column r of x
          add_residual<T>(w.x + b * a.dim + r, v0,
                          reinterpret_cast<const T*>(t[8 * ph.layer + (ph.kind == kOut ? 6 : 7)]), r);
          break;
        default:  // head
          static_cast<T*>(a.logits)[(static_cast<int64_t>(ph.k) * B + b) * a.card + r] = y;
          break;
      }
    }
  });
}

// Attention of row b's query in head h over this frame's steps 0..k: one warp, online softmax in fp32.
template <typename T>
__device__ void attend(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, float scale, int h, int b) {
  const int B = a.B, D = a.dim / a.heads, lane = threadIdx.x % 32;
  constexpr int kPer = kMaxHeadDim / 32;
  float q[kPer];
  load_query<kPer>(w.q + b * a.dim + h * D, D, q);
  WarpSoftmax<kPer> sm;
  for (int s = 0; s <= ph.k; ++s) {
    const int64_t base = ((static_cast<int64_t>(ph.layer) * a.dep_q + s) * B + b) * a.dim + h * D;
    sm.absorb(q, w.kc + base, w.vc + base, D, scale);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + 32 * i < D) w.attn[b * a.dim + h * D + lane + 32 * i] = dsm::from_float<T>(sm.acc[i] / sm.l);
}

// After the QKV GEMV: heads whose 3 D rows are all written get their attention from the block that wrote the last.
template <typename T>
__device__ void attend_finished_heads(const DsmDepformerArgs& a, const Work<T>& w, const Phase& ph, float scale,
                                      int* heads_done) {
  const int D = a.dim / a.heads;
  const Share own = share_of(ph.rows);
  const int lo = own.lo, hi = own.lo + own.count;
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
  __syncthreads();  // every logit row of this block is written
  if (threadIdx.x == 0) {
    __threadfence();
    *flag = arrive_last(a.sync + 2 + a.heads, share_of(ph.rows).count, a.card);
    __threadfence();
  }
  __syncthreads();
  if (!*flag) return;
  constexpr int kShift = dsm::sampling::narrow_key_shift<T>();
  for (int b = 0; b < a.B; ++b) {
    const T* row = static_cast<const T*>(a.logits) + (static_cast<int64_t>(ph.k) * a.B + b) * a.card;
    const int64_t token = dsm::sampling::sample_row<T, kItems, kShift>(
        row, nullptr, a.card, 1.f, a.temperature[b], a.top_k, a.seeds[b],
        a.steps[b] * a.step_scale + a.step_offset + ph.k, scratch);
    if (threadIdx.x == 0) a.tokens[static_cast<int64_t>(b) * a.dep_q + ph.k] = token;
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
  auto rows_of = [&](int p) { return phase_of(a, p).rows; };
  WeightStream<T, decltype(rows_of)> stream{rows_of, P, ring, slot_bytes};
  stream.start();
  for (int p = 0; p < P; ++p) {
    const Phase ph = phase_of(a, p);
    stage_input<T>(a, w, ph, xs, red);
    gemv_phase<T>(a, w, ph, xs, stream);  // its chunks' barriers publish xs
    if (ph.kind == kQkv) attend_finished_heads<T>(a, w, ph, scale, heads_done);
    if (ph.kind == kHead) sample_if_last<T, kItems>(a, ph, sample_scratch, heads_done);
    if (p + 1 < P) dsm::grid_barrier(a.sync, p + 1);
  }
  stream.finish();
  dsm::grid_exit(a.sync);
}

template <typename T, int kItems>
cudaError_t launch(const DsmDepformerArgs& a, cudaStream_t stream) {
  auto kernel = depformer_kernel<T, kItems>;
  const int k_max = std::max({a.d_model, a.dim, a.hidden});
  const size_t fixed = align16(sizeof(SampleScratch)) + align16(kWarps * kMaxRows * sizeof(float)) +
                       align16((a.heads + 1) * sizeof(int)) + align16(static_cast<size_t>(a.B) * k_max * sizeof(T));
  const Plan plan = plan_launch(kernel, a.blocks, fixed, [&](int G) {
    auto share = [&](int units, int K, int per) { return share_bytes(units, K, per, G, sizeof(T)); };
    return std::max({share(a.n_in * a.dim, a.d_model, 1), share(3 * a.dim, a.dim, 1), share(a.dim, a.dim, 1),
                     share(a.hidden, a.dim, 2), share(a.dim, a.hidden, 1), share(a.card, a.dim, 1)});
  });
  if (plan.grid == 0) return cudaErrorInvalidValue;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(a.dim / a.heads)));  // as D**-0.5
  return dsm::launch_cooperative(kernel, dim3(plan.grid), dim3(kThreads), plan.smem, stream, a, scale, plan.slot);
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
