// Persistent temporal decode step: every layer of the temporal transformer, then the output RMSNorm and the text head,
// for 1..4 rows in ONE cooperative launch (semantics: dsm_kernels.decoder.decoder_step_composed on the reference ops).
//
// Why: at batch 1 the step is ~5 dependent GEMV launches a layer (93 a step for stt-1b), each paying a launch gap
// and a cold start of its weight stream. As in depformer.cu (same building blocks, persistent.cuh), one block per SM
// runs the phases in order with a grid barrier after each, and copies the next phases' weight rows into shared
// memory while it computes and waits. At these shapes a phase's weights (8-25 MB) exceed what the ring holds, so the
// ring covers the start of each phase and the rest streams at compute time: the gain is the launch gaps and the
// ramp-up of each weight stream, not a longer queue.
//
// Phases per layer (5, or 8 with a cross-attention, plus the head if any): (1) norm + QKV GEMV over pairs of rows, RoPE
// of the q and k pairs (interleaved), q to scratch, k and v into the paged cache at this step's slot; (2) paged
// attention of each (row, head) over its last `context` positions, split over warps across the grid, the last split
// of a (row, head) to finish merging them (a counter per pair); (3) out-projection + LayerScale + residual; with a
// cross-attention (TTS): (3a) LayerNorm + query GEMV, (3b) the same attention over every position of the row's
// condition pages, (3c) out + LayerScale + residual; (4) norm + linear_in + SiLU gate (or GELU); (5) linear_out +
// LayerScale + residual; last, the output RMSNorm (z) and the text head. The norms are RMSNorms, or LayerNorms where
// the table gives biases. Mimi's transformer (no head, LayerNorms, GELU) runs here too: its K/V ring is one page per
// stream of `context` slots, its two tokens of a step are two rows, and `starts` hides from the first the slot that
// the second overwrote (as the reference's ring mask does).
//
// Numerics: fp32 accumulation and rounding to the model dtype T where the reference's torch ops round. The K/V pages
// hold TC: T, or e4m3 (the fp8 cache option: written as the append op rounds, read upcast; kv_cache.cuh). The
// condition pages of the cross-attention are always T.
#include <algorithm>

#include "kv_cache.cuh"
#include "persistent.cuh"

namespace {

using namespace dsm::persistent;
constexpr int kMaxHeadDim = 128;  // the released models: 128 (stt-1b, tts) and 64 (stt-2.6b)

enum Kind { kQkv, kAttn, kOut, kCrossQ, kCrossAttn, kCrossOut, kIn, kFfo, kHead };

struct Phase {
  Kind kind;
  int layer = 0;
  Rows rows;
};

__device__ __forceinline__ int phases_per_layer(const DsmDecoderArgs& a) { return a.cross_k ? 8 : 5; }

__device__ __forceinline__ Phase phase_of(const DsmDecoderArgs& a, int p) {
  Phase ph;
  const int per = phases_per_layer(a);
  if (p == per * a.layers) {  // only with a head
    ph.kind = kHead;
    ph.rows = Rows{static_cast<const char*>(a.text_linear), a.vocab, a.dim};
    return ph;
  }
  ph.layer = p / per;
  const int64_t* lw = a.table + static_cast<int64_t>(ph.layer) * DSM_DEC_TABLE_STRIDE;
  const int qkv_rows = (a.heads + 2 * a.kv_heads) * a.head_dim, hd = a.heads * a.head_dim;
  int stage = p % per;
  if (per == 8 && stage >= 3 && stage < 6) {  // the cross-attention's phases
    ph.kind = stage == 3 ? kCrossQ : (stage == 4 ? kCrossAttn : kCrossOut);
    if (stage == 3) ph.rows = Rows{reinterpret_cast<const char*>(lw[10]), hd, a.dim};
    if (stage == 5) ph.rows = Rows{reinterpret_cast<const char*>(lw[11]), a.dim, hd};
    return ph;
  }
  if (per == 8 && stage >= 6) stage -= 3;
  switch (stage) {
    case 0:  // rows 2u and 2u + 1: a RoPE pair
      ph.kind = kQkv;
      ph.rows = Rows{reinterpret_cast<const char*>(lw[0]), qkv_rows / 2, a.dim, 2, 2, 1};
      break;
    case 1: ph.kind = kAttn; break;
    case 2: ph.kind = kOut; ph.rows = Rows{reinterpret_cast<const char*>(lw[1]), a.dim, a.heads * a.head_dim}; break;
    case 3:
      ph.kind = kIn;
      ph.rows = a.gelu ? Rows{reinterpret_cast<const char*>(lw[2]), a.hidden, a.dim}
                       : gate_rows(reinterpret_cast<const void*>(lw[2]), a.hidden, a.dim);
      break;
    default: ph.kind = kFfo; ph.rows = Rows{reinterpret_cast<const char*>(lw[3]), a.dim, a.hidden}; break;
  }
  return ph;
}

// Scratch in `a.work`: q and the attention output [B, H D] (T), the gated hidden [B, hidden] (T), and the attention
// splits' partials: (max, sum) [B H S, 2] and the weighted values [B H S, D] (fp32), S <= DSM_DEC_MAX_SPLITS.
enum WorkPart { kWorkQ, kWorkAttn, kWorkGh, kWorkML, kWorkAcc, kWorkParts };

__host__ __device__ __forceinline__ size_t work_offset(int B, int heads, int head_dim, int hidden, size_t elem,
                                                       int part) {
  const size_t bh = static_cast<size_t>(B) * heads, parts = bh * DSM_DEC_MAX_SPLITS;
  const size_t bytes[kWorkParts] = {bh * head_dim * elem, bh * head_dim * elem, static_cast<size_t>(B) * hidden * elem,
                                    parts * 2 * sizeof(float), parts * head_dim * sizeof(float)};
  size_t off = 0;
  for (int i = 0; i < part; ++i) off += align16(bytes[i]);
  return off;
}

template <typename T>
struct Work {
  T *q, *attn, *gh;
  float *ml, *acc;
  __device__ explicit Work(const DsmDecoderArgs& a) {
    char* base = static_cast<char*>(a.work);
    auto at = [&](int part) { return base + work_offset(a.B, a.heads, a.head_dim, a.hidden, sizeof(T), part); };
    q = reinterpret_cast<T*>(at(kWorkQ));
    attn = reinterpret_cast<T*>(at(kWorkAttn));
    gh = reinterpret_cast<T*>(at(kWorkGh));
    ml = reinterpret_cast<float*>(at(kWorkML));
    acc = reinterpret_cast<float*>(at(kWorkAcc));
  }
};

// Attention splits of one (row, head) over `context` positions: enough to give every warp of the grid work, each
// split >= 16 positions.
inline int attention_splits(const DsmDecoderArgs& a, int context, int grid) {
  const int by_len = (context + 15) / 16, by_warps = grid * kWarps / (a.B * a.heads);
  return std::max(1, std::min({by_len, by_warps, DSM_DEC_MAX_SPLITS}));
}

// The pre-norm of a layer's attention or FFN: a LayerNorm where the table gives its bias, else an RMSNorm.
template <typename T>
__device__ __forceinline__ void stage_normed(const T* x, int B, int K, int64_t weight, int64_t bias, float eps, T* xs,
                                             float* red) {
  if (bias != 0)
    stage_rows_layernorm<T>(x, B, K, reinterpret_cast<const T*>(weight), reinterpret_cast<const T*>(bias), eps, xs, red);
  else
    stage_rows<T>(x, B, K, reinterpret_cast<const T*>(weight), eps, xs, red);
}

template <typename T>
__device__ void stage_input(const DsmDecoderArgs& a, const Work<T>& w, const Phase& ph, T* xs, float* red) {
  const int64_t* lw = a.table + static_cast<int64_t>(ph.layer) * DSM_DEC_TABLE_STRIDE;
  const T* x = static_cast<const T*>(a.x);
  switch (ph.kind) {
    case kQkv: stage_normed<T>(x, a.B, a.dim, lw[4], lw[13], a.eps, xs, red); break;
    case kOut:
    case kCrossOut: stage_rows<T>(w.attn, a.B, a.heads * a.head_dim, nullptr, a.eps, xs, red); break;
    case kCrossQ:
      stage_rows_layernorm<T>(x, a.B, a.dim, reinterpret_cast<const T*>(lw[8]), reinterpret_cast<const T*>(lw[9]),
                              a.cross_eps, xs, red);
      break;
    case kIn: stage_normed<T>(x, a.B, a.dim, lw[5], lw[14], a.eps, xs, red); break;
    case kFfo: stage_rows<T>(w.gh, a.B, a.hidden, nullptr, a.eps, xs, red); break;
    case kHead: {  // z = RMSNorm(x), written by the owner of each column (this thread normed these columns)
      stage_rows<T>(x, a.B, a.dim, static_cast<const T*>(a.out_norm), a.out_eps, xs, red);
      const int lo = split_lo(a.dim, blockIdx.x, gridDim.x), hi = split_lo(a.dim, blockIdx.x + 1, gridDim.x);
      for (int b = 0; b < a.B; ++b)
        for (int c = threadIdx.x; c < a.dim; c += kThreads)
          if (c >= lo && c < hi) static_cast<T*>(a.z)[b * a.dim + c] = xs[b * a.dim + c];
      break;
    }
    default: break;
  }
}

template <typename T, typename TC, typename Stream>
__device__ void gemv_phase(const DsmDecoderArgs& a, const Work<T>& w, const Phase& ph, const T* xs, Stream& stream) {
  const int B = a.B, D = a.head_dim, HD = a.heads * D, KD = a.kv_heads * D;
  const int64_t* lw = a.table + static_cast<int64_t>(ph.layer) * DSM_DEC_TABLE_STRIDE;
  T* x = static_cast<T*>(a.x);
  stream.gemv(ph.rows, xs, B, [&](int u, const float (&acc0)[kMaxRows], const float (&acc1)[kMaxRows]) {
    for (int b = 0; b < B; ++b) {
      const float v0 = row_value(acc0, b), v1 = row_value(acc1, b);  // the unit's rows' dot products for row b
      switch (ph.kind) {
        case kQkv: {  // rows r, r + 1: RoPE of q and k pairs, then q to scratch, k and v into the pages
          const int r = 2 * u;
          const T y0 = dsm::from_float<T>(v0), y1 = dsm::from_float<T>(v1);
          T o0 = y0, o1 = y1;
          if (r < HD + KD && a.inv_freq != nullptr) {
            const float angle = __fmul_rn(a.inv_freq[(r % D) / 2], static_cast<float>(a.positions[b]));
            const float c = cosf(angle), s = sinf(angle), f0 = dsm::to_float(y0), f1 = dsm::to_float(y1);
            o0 = dsm::from_float<T>(__fsub_rn(__fmul_rn(f0, c), __fmul_rn(f1, s)));
            o1 = dsm::from_float<T>(__fadd_rn(__fmul_rn(f0, s), __fmul_rn(f1, c)));
          }
          if (r < HD) {
            w.q[b * HD + r] = o0;
            w.q[b * HD + r + 1] = o1;
          } else if (a.slot[b] >= 0) {
            const bool is_k = r < HD + KD;
            const int e = is_k ? r - HD : r - HD - KD;  // (kv head, d) of the pair; d even, so both in one head
            TC* cache = static_cast<TC*>(is_k ? a.k_cache : a.v_cache) + ph.layer * a.cache_layer_stride +
                        (a.slot[b] / a.page_size) * a.page_stride + (a.slot[b] % a.page_size) * a.slot_stride +
                        (e / D) * a.head_stride + e % D;
            cache[0] = dsm::to_cache<TC>(dsm::to_float(o0));  // TC == T: o0 itself
            cache[1] = dsm::to_cache<TC>(dsm::to_float(o1));
          }
          break;
        }
        case kIn: w.gh[b * a.hidden + u] = a.gelu ? gelu<T>(v0) : silu_gate<T>(v0, v1); break;
        case kCrossQ: w.q[b * HD + u] = dsm::from_float<T>(v0); break;
        case kOut:
        case kCrossOut:
        case kFfo:  // this block owns column u of x
          add_residual<T>(x + b * a.dim + u, v0,
                          reinterpret_cast<const T*>(lw[ph.kind == kOut ? 6 : (ph.kind == kFfo ? 7 : 12)]), u);
          break;
        default:  // head
          static_cast<T*>(a.logits)[static_cast<int64_t>(b) * a.vocab + u] = dsm::from_float<T>(v0);
          break;
      }
    }
  });
}

// What an attention phase reads: one layer's K/V pages of element type TK (and their strides), the rows' page tables,
// lengths and window.
template <typename TK>
struct Keys {
  const TK *k, *v;
  const int32_t *block_table, *seq_lens, *starts;
  int pages_per_row, page_size, context, kv_heads;
  int64_t page_stride, slot_stride, head_stride;
};

template <typename TC>  // this step's K/V pages
__device__ __forceinline__ Keys<TC> self_keys(const DsmDecoderArgs& a, const Phase& ph) {
  return {static_cast<const TC*>(a.k_cache) + ph.layer * a.cache_layer_stride,
          static_cast<const TC*>(a.v_cache) + ph.layer * a.cache_layer_stride, a.block_table, a.seq_lens, a.starts,
          a.pages_per_slot, a.page_size, a.context, a.kv_heads, a.page_stride, a.slot_stride, a.head_stride};
}

template <typename T>  // the condition's pages: contiguous [layers, pages, page_size, heads, D]
__device__ __forceinline__ Keys<T> cross_keys(const DsmDecoderArgs& a, const Phase& ph) {
  const int64_t hd = static_cast<int64_t>(a.heads) * a.head_dim;
  return {static_cast<const T*>(a.cross_k) + ph.layer * a.cross_layer_stride,
          static_cast<const T*>(a.cross_v) + ph.layer * a.cross_layer_stride, a.cross_block_table, a.cross_seq_lens,
          nullptr, a.cross_length / a.cross_page_size, a.cross_page_size, a.cross_length, a.heads,
          a.cross_page_size * hd, hd, a.head_dim};
}

// One warp's split of a (row, head): online softmax over its positions of the row's window, then its partial; the
// warp that completes the (row, head) merges every split's partial into the attention output.
template <typename T, typename TK>
__device__ void attention_phase(const DsmDecoderArgs& a, const Work<T>& w, const Keys<TK>& keys, int S) {
  const int D = a.head_dim, HD = a.heads * D, lane = threadIdx.x % 32;
  constexpr int kPer = kMaxHeadDim / 32;
  const TK* kc = keys.k;
  const TK* vc = keys.v;
  const int items = a.B * a.heads * S;
  for (int item = blockIdx.x * kWarps + threadIdx.x / 32; item < items; item += gridDim.x * kWarps) {
    const int s = item % S, h = (item / S) % a.heads, b = item / (S * a.heads);
    const int hk = h / (a.heads / keys.kv_heads);
    const int n = keys.seq_lens[b];
    const int start = min(n, max(max(0, n - keys.context), keys.starts ? keys.starts[b] : 0)), m = n - start;
    const int p0 = start + static_cast<int>(static_cast<int64_t>(m) * s / S);
    const int p1 = start + static_cast<int>(static_cast<int64_t>(m) * (s + 1) / S);
    float q[kPer];
    load_query<kPer>(w.q + b * HD + h * D, D, q);
    WarpSoftmax<kPer> sm;
    for (int p = p0; p < p1; ++p) {
      const int64_t at =
          keys.block_table[b * keys.pages_per_row + (p / keys.page_size) % keys.pages_per_row] * keys.page_stride +
          (p % keys.page_size) * keys.slot_stride + hk * keys.head_stride;
      sm.absorb(q, kc + at, vc + at, D, a.scale);
    }
    // this split's partial, then the arrival: every lane fences its own writes
    if (lane == 0) {
      w.ml[2 * item] = sm.m;
      w.ml[2 * item + 1] = sm.l;
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < D) w.acc[static_cast<int64_t>(item) * D + d] = sm.acc[i];
    }
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      last = arrive_last(a.sync + 2 + b * a.heads + h, 1, S);
      __threadfence();
    }
    if (!__shfl_sync(0xffffffffu, last, 0)) continue;
    const int first = item - s;  // the (row, head)'s split 0
    float M = -INFINITY;
    for (int t = 0; t < S; ++t) M = fmaxf(M, __ldcg(w.ml + 2 * (first + t)));
    float L = 0.f, out[kPer] = {};
    for (int t = 0; t < S; ++t) {
      const float mt = __ldcg(w.ml + 2 * (first + t));
      if (mt == -INFINITY) continue;  // an empty split
      const float f = expf(mt - M);
      L += __ldcg(w.ml + 2 * (first + t) + 1) * f;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int d = lane + 32 * i;
        if (d < D) out[i] += __ldcg(w.acc + static_cast<int64_t>(first + t) * D + d) * f;
      }
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < D) w.attn[b * HD + h * D + d] = dsm::from_float<T>(L > 0.f ? out[i] / L : 0.f);  // n = 0: zeros
    }
  }
}

template <typename T, typename TC>
__global__ void __launch_bounds__(kThreads, 1) decoder_kernel(const DsmDecoderArgs a, size_t slot_bytes, int splits,
                                                               int cross_splits) {
  const Work<T> w(a);
  // shared memory: row sums | staged inputs xs [B, max K] | ring slots
  char* smem = dsm::dynamic_smem();
  float* red = reinterpret_cast<float*>(smem);
  T* xs = reinterpret_cast<T*>(smem + align16(kWarps * kMaxRows * sizeof(float)));
  const int k_max = max(a.dim, max(a.heads * a.head_dim, a.hidden));
  char* ring = reinterpret_cast<char*>(xs) + align16(static_cast<size_t>(a.B) * k_max * sizeof(T));

  const int P = phases_per_layer(a) * a.layers + (a.vocab > 0);
  auto rows_of = [&](int p) { return phase_of(a, p).rows; };
  WeightStream<T, decltype(rows_of)> stream{rows_of, P, ring, slot_bytes};
  stream.start();
  for (int p = 0; p < P; ++p) {
    const Phase ph = phase_of(a, p);
    if (ph.kind == kAttn) {
      attention_phase<T>(a, w, self_keys<TC>(a, ph), splits);
    } else if (ph.kind == kCrossAttn) {
      attention_phase<T>(a, w, cross_keys<T>(a, ph), cross_splits);
    } else {
      stage_input<T>(a, w, ph, xs, red);
      gemv_phase<T, TC>(a, w, ph, xs, stream);  // its chunks' barriers publish xs
    }
    if (p + 1 < P) dsm::grid_barrier(a.sync, p + 1);
  }
  stream.finish();
  dsm::grid_exit(a.sync);
}

template <typename T, typename TC>
cudaError_t launch(const DsmDecoderArgs& a, cudaStream_t stream) {
  auto kernel = decoder_kernel<T, TC>;
  const int k_max = std::max({a.dim, a.heads * a.head_dim, a.hidden});
  const size_t fixed = align16(kWarps * kMaxRows * sizeof(float)) + align16(static_cast<size_t>(a.B) * k_max * sizeof(T));
  const Plan plan = plan_launch(kernel, a.blocks, fixed, [&](int G) {
    auto share = [&](int units, int K, int per) { return share_bytes(units, K, per, G, sizeof(T)); };
    return std::max({share((a.heads + 2 * a.kv_heads) * a.head_dim / 2, a.dim, 2),
                     share(a.dim, a.heads * a.head_dim, 1), share(a.hidden, a.dim, a.gelu ? 1 : 2),
                     share(a.dim, a.hidden, 1), share(a.vocab, a.dim, 1)});
  });
  if (plan.grid == 0) return cudaErrorInvalidValue;
  return dsm::launch_cooperative(kernel, dim3(plan.grid), dim3(kThreads), plan.smem, stream, a, plan.slot,
                                 attention_splits(a, a.context, plan.grid),
                                 a.cross_k ? attention_splits(a, a.cross_length, plan.grid) : 1);
}

}  // namespace

extern "C" size_t dsm_decoder_work_bytes(int B, int heads, int head_dim, int hidden, int dtype) {
  return work_offset(B, heads, head_dim, hidden, dtype == DSM_F32 ? 4 : 2, kWorkParts);
}

extern "C" cudaError_t dsm_launch_decoder_step(const DsmDecoderArgs* args, cudaStream_t stream) {
  const DsmDecoderArgs& a = *args;
  const int vec = a.dtype == DSM_F32 ? 4 : 8;  // 16-byte weight rows: the ring copies and vector loads
  if (a.B < 1 || a.B > kMaxRows || a.layers < 1 || a.heads < 1 || a.kv_heads < 1 || a.heads % a.kv_heads != 0 ||
      a.head_dim < 2 || a.head_dim % 2 != 0 || a.head_dim > kMaxHeadDim || a.vocab < 0 || a.context < 1 ||
      (a.vocab > 0 && (a.out_norm == nullptr || a.text_linear == nullptr || a.z == nullptr || a.logits == nullptr)) ||
      a.page_size < 1 || a.pages_per_slot < 1 || a.dim % vec != 0 || a.hidden % vec != 0 ||
      (a.heads * a.head_dim) % vec != 0 ||
      (a.cross_k != nullptr && (a.cross_page_size < 1 || a.cross_length < 1 || a.cross_length % a.cross_page_size)))
    return cudaErrorInvalidValue;
  if (a.cache_dtype == DSM_FP8_E4M3) {
    DSM_DISPATCH_DTYPE(a.dtype, T, { return launch<T, dsm::fp8>(a, stream); });
  } else if (a.cache_dtype == a.dtype) {
    DSM_DISPATCH_DTYPE(a.dtype, T, { return launch<T, T>(a, stream); });
  }
  return cudaErrorInvalidValue;
}
