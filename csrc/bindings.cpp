// torch bindings of the dsm CUDA kernels: TORCH_LIBRARY schemas with out-parameters (usable as torch.ops.dsm.* inside
// captured CUDA graphs, writing into preallocated buffers), shape/dtype checks, and calls into the torch-free
// launchers of csrc/*.cu on the current stream.
#include <Python.h>  // first, as CPython asks
// clang-format off
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
// clang-format on
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>
#include <string>

#include "checks.h"
#include "dsm_cuda.h"

namespace {

int dsm_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DSM_F32;
    case at::kHalf: return DSM_F16;
    case at::kBFloat16: return DSM_BF16;
    default: TORCH_CHECK(false, "dsm: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
  return -1;
}

// KV cache element code: the tensor's DsmDtype, or DSM_FP8_E4M3.
int kv_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat8_e4m3fn ? DSM_FP8_E4M3 : dsm_dtype(t); }

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// Programmatic dependent launch: on sm_90+ devices unless DSM_NO_PDL=1 (as dsm_kernels.gemv_kernels.use_pdl).
int use_pdl(const at::Tensor& t) {
  const char* off = std::getenv("DSM_NO_PDL");
  if (off != nullptr && std::string(off) == "1") return 0;
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device());
  return major >= 9 ? 1 : 0;
}

void multistream_embed(at::Tensor& out, const at::Tensor& tokens, const at::Tensor& text_table,
                       const at::Tensor& audio_tables, const std::optional<at::Tensor>& text_table2,
                       const std::optional<at::Tensor>& cond) {
  DSM_CHECK_CUDA(out);
  DSM_CHECK_DIM(tokens, 2);
  DSM_CHECK_DIM(text_table, 2);
  DSM_CHECK_DIM(audio_tables, 3);
  DSM_CHECK_DTYPE(tokens, at::kLong);
  const int64_t B = tokens.size(0), K = tokens.size(1), D = text_table.size(1);
  TORCH_CHECK(K >= 1 && K <= 64, "dsm: 1..64 token columns supported, got ", K);
  TORCH_CHECK(audio_tables.size(0) >= K - 1 && audio_tables.size(2) == D, "dsm: audio_tables must be [>=K-1, V, D]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == B && out.size(1) == D, "dsm: out must be [B, D]");
  TORCH_CHECK(audio_tables.scalar_type() == text_table.scalar_type(), "dsm: tables must share a dtype");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&tokens, &text_table, &audio_tables}) DSM_CHECK_SAME_DEVICE(out, (*t));
  DSM_CHECK_LAST_CONTIGUOUS(text_table);
  DSM_CHECK_LAST_CONTIGUOUS(audio_tables);
  DSM_CHECK_LAST_CONTIGUOUS(out);
  const void* t2 = nullptr;
  int64_t stride_t2 = 0;
  if (text_table2) {
    TORCH_CHECK(text_table2->sizes() == text_table.sizes() && text_table2->scalar_type() == text_table.scalar_type(),
                "dsm: text_table2 must match text_table");
    DSM_CHECK_SAME_DEVICE(out, (*text_table2));
    DSM_CHECK_LAST_CONTIGUOUS((*text_table2));
    t2 = text_table2->data_ptr();
    stride_t2 = text_table2->stride(0);
  }
  const float* c = nullptr;
  int64_t stride_c = 0;
  if (cond) {
    DSM_CHECK_DTYPE((*cond), at::kFloat);
    TORCH_CHECK(cond->dim() == 2 && cond->size(0) == B && cond->size(1) == D, "dsm: cond must be [B, D]");
    DSM_CHECK_SAME_DEVICE(out, (*cond));
    DSM_CHECK_LAST_CONTIGUOUS((*cond));
    c = cond->data_ptr<float>();
    stride_c = cond->stride(0);
  }
  const c10::cuda::CUDAGuard guard(out.device());
  DSM_CUDA_OK(dsm_launch_multistream_embed(
      tokens.data_ptr<int64_t>(), tokens.stride(0), tokens.stride(1), static_cast<int>(B), static_cast<int>(K),
      text_table.data_ptr(), t2, audio_tables.data_ptr(), c, out.data_ptr(), dsm_dtype(text_table), dsm_dtype(out),
      D, text_table.size(0), text_table.stride(0), stride_t2, audio_tables.stride(0), audio_tables.stride(1),
      stride_c, out.stride(0), stream_of(out)));
}

void check_pool(const at::Tensor& cache, int64_t H, int64_t D, const char* name) {
  TORCH_CHECK(cache.dim() == 4 && cache.size(2) == H && cache.size(3) == D, "dsm: ", name,
              " must be [num_pages, page_size, H, D]");
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(2) == D, "dsm: ", name, " heads and head_dim must be contiguous");
}

void append_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slot_mapping) {
  DSM_CHECK_CUDA(k_cache);
  DSM_CHECK_DIM(k, 3);
  const int64_t B = k.size(0), H = k.size(1), D = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(), "dsm: v must match k");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == D && v.stride(2) == 1 && v.stride(1) == D,
              "dsm: k/v heads and head_dim must be contiguous");
  check_pool(k_cache, H, D, "k_cache");
  check_pool(v_cache, H, D, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "dsm: v_cache must match k_cache");
  DSM_CHECK_DTYPE(slot_mapping, at::kLong);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == B && slot_mapping.is_contiguous(),
              "dsm: slot_mapping must be a contiguous [B] tensor");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&v_cache, &k, &v, &slot_mapping}) DSM_CHECK_SAME_DEVICE(k_cache, (*t));
  const c10::cuda::CUDAGuard guard(k_cache.device());
  DSM_CUDA_OK(dsm_launch_append_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                   slot_mapping.data_ptr<int64_t>(), static_cast<int>(B), static_cast<int>(H * D),
                                   static_cast<int>(k_cache.size(1)), dsm_dtype(k), kv_dtype(k_cache), k.stride(0),
                                   v.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                                   v_cache.stride(1), stream_of(k_cache)));
}

void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t context, double scale,
                            int64_t num_splits, const std::optional<at::Tensor>& counters) {
  DSM_CHECK_CUDA(out);
  DSM_CHECK_DIM(q, 3);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 16 || D == 32 || D == 64 || D == 128 || D == 256, "dsm: head_dim 16/32/64/128/256 supported, got ",
              D);
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && out.scalar_type() == q.scalar_type(),
              "dsm: out must be a contiguous tensor like q");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) % 8 == 0 && q.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              "dsm: q rows must be 16-byte aligned with contiguous head_dim");
  check_pool(k_cache, H, D, "k_cache");
  check_pool(v_cache, H, D, "v_cache");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == q.scalar_type() || k_cache.scalar_type() == at::kFloat8_e4m3fn),
              "dsm: the caches must share q's dtype or both be float8_e4m3fn");
  TORCH_CHECK(k_cache.stride(1) % 8 == 0 && v_cache.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0,
              "dsm: cache rows must be 16-byte aligned");
  DSM_CHECK_DTYPE(block_table, at::kInt);
  DSM_CHECK_DTYPE(seq_lens, at::kInt);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B && block_table.stride(1) == 1,
              "dsm: block_table must be [B, pages_per_slot] with contiguous rows");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.is_contiguous(), "dsm: seq_lens must be [B]");
  TORCH_CHECK(num_splits >= 1 && context >= 1, "dsm: need num_splits >= 1 and context >= 1");
  int* cnt = nullptr;
  if (counters && num_splits > 1) {
    DSM_CHECK_DTYPE((*counters), at::kInt);
    TORCH_CHECK(counters->is_contiguous() && counters->numel() >= B * H, "dsm: counters must hold >= B*H = ", B * H,
                " contiguous int32, got ", counters->numel());
    DSM_CHECK_SAME_DEVICE(out, (*counters));
    cnt = counters->data_ptr<int32_t>();
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache, &block_table, &seq_lens}) DSM_CHECK_SAME_DEVICE(out, (*t));
  const c10::cuda::CUDAGuard guard(out.device());
  // Split-K workspace from the caching allocator (graph-capture safe); untouched with a single split.
  const int64_t parts = num_splits > 1 ? B * H * num_splits : 1;
  at::Tensor ml = at::empty({2, parts}, q.options().dtype(at::kFloat));
  at::Tensor acc = at::empty({parts, num_splits > 1 ? D : 1}, q.options().dtype(at::kFloat));
  DSM_CUDA_OK(dsm_launch_paged_decode_attention(
      out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr<int32_t>(),
      seq_lens.data_ptr<int32_t>(), static_cast<int>(B), static_cast<int>(H), static_cast<int>(D), dsm_dtype(q),
      kv_dtype(k_cache), static_cast<int>(k_cache.size(1)), static_cast<int>(block_table.size(1)), static_cast<int>(context),
      static_cast<float>(scale), static_cast<int>(num_splits), ml.data_ptr<float>(), ml.data_ptr<float>() + parts,
      acc.data_ptr<float>(), cnt, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
      v_cache.stride(1), block_table.stride(0), use_pdl(out), stream_of(out)));
}

int64_t paged_decode_blocks_per_sm(const at::Tensor& q, const at::Tensor& k_cache) {
  DSM_CHECK_CUDA(q);
  const c10::cuda::CUDAGuard guard(q.device());
  int blocks = 0;
  DSM_CUDA_OK(dsm_paged_decode_blocks_per_sm(static_cast<int>(q.size(-1)), dsm_dtype(q), kv_dtype(k_cache), &blocks));
  return blocks;
}

void sample_tokens(at::Tensor& out, const at::Tensor& logits, const std::optional<at::Tensor>& null_logits,
                   double cfg_coef, const at::Tensor& temperature, int64_t top_k, const at::Tensor& seeds,
                   const at::Tensor& steps, int64_t step_scale, int64_t step_offset) {
  DSM_CHECK_CUDA(out);
  DSM_CHECK_DIM(logits, 2);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1 && V <= 16384, "dsm: vocab 1..16384 supported, got ", V);
  DSM_CHECK_LAST_CONTIGUOUS(logits);
  DSM_CHECK_DTYPE(out, at::kLong);
  DSM_CHECK_DTYPE(temperature, at::kFloat);
  DSM_CHECK_DTYPE(seeds, at::kLong);
  DSM_CHECK_DTYPE(steps, at::kLong);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &temperature, &seeds, &steps})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->is_contiguous(), "dsm: out/temperature/seeds/steps must be [B]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&logits, &temperature, &seeds, &steps}) DSM_CHECK_SAME_DEVICE(out, (*t));
  const void* nl = nullptr;
  int64_t stride_n = 0;
  if (null_logits) {
    TORCH_CHECK(null_logits->sizes() == logits.sizes() && null_logits->scalar_type() == logits.scalar_type(),
                "dsm: null_logits must match logits");
    DSM_CHECK_LAST_CONTIGUOUS((*null_logits));
    DSM_CHECK_SAME_DEVICE(out, (*null_logits));
    nl = null_logits->data_ptr();
    stride_n = null_logits->stride(0);
  }
  const c10::cuda::CUDAGuard guard(out.device());
  DSM_CUDA_OK(dsm_launch_sample_tokens(out.data_ptr<int64_t>(), logits.data_ptr(), nl, dsm_dtype(logits),
                                       static_cast<int>(B), static_cast<int>(V), logits.stride(0), stride_n,
                                       static_cast<float>(cfg_coef), temperature.data_ptr<float>(),
                                       static_cast<int>(top_k), seeds.data_ptr<int64_t>(), steps.data_ptr<int64_t>(),
                                       step_scale, step_offset, stream_of(out)));
}

// A persistent kernel's scratch (uninitialised) and its barrier and counter words (at 0: the barrier counts arrivals
// from 0, the counters start re-armed), on `like`'s device, set in the launch arguments `a`. The words are the
// caller's `counters` when given (the kernels leave them at 0, so a caller that keeps them launches no memset before
// each launch), else zeroed here. The returned tensors must outlive the launch call (the caching allocator then keeps
// their memory for the stream's work).
template <typename Args>
std::pair<at::Tensor, at::Tensor> persistent_scratch(Args& a, const at::Tensor& like, size_t work_bytes,
                                                     int64_t sync_words, const std::optional<at::Tensor>& counters) {
  at::Tensor work = at::empty({static_cast<int64_t>(work_bytes)}, like.options().dtype(at::kByte));
  at::Tensor sync;
  if (counters) {
    DSM_CHECK_DTYPE((*counters), at::kInt);
    DSM_CHECK_SAME_DEVICE(like, (*counters));
    TORCH_CHECK(counters->is_contiguous() && counters->numel() >= sync_words, "dsm: counters must hold >= ",
                sync_words, " contiguous int32 at 0, got ", counters->numel());
    sync = *counters;
  } else {
    sync = at::zeros({sync_words}, like.options().dtype(at::kInt));
  }
  a.work = work.data_ptr();
  a.sync = reinterpret_cast<unsigned*>(sync.data_ptr<int>());
  return {work, sync};
}

// The persistent depth-transformer frame (csrc/depformer.cu). dims: heads, hidden, card, dep_q, layers, n_in,
// text_vocab, top_k, step_scale, step_offset (codebook k's noise counter: steps * step_scale + step_offset + k),
// blocks (0: one per SM). The weights are reached through `table` (dsm_kernels.cuda_ops builds it from tensors it
// checked); the tensors here are checked for shape, dtype and device.
void depformer_frame(at::Tensor& tokens, at::Tensor& logits, const at::Tensor& table, const at::Tensor& in_proj,
                     const std::optional<at::Tensor>& text_emb2, const at::Tensor& z, const at::Tensor& text_token,
                     const at::Tensor& temperature, const at::Tensor& seeds, const at::Tensor& steps,
                     at::IntArrayRef dims, double eps, const std::optional<at::Tensor>& counters) {
  DSM_CHECK_CUDA(tokens);
  TORCH_CHECK(dims.size() == 11, "dsm: depformer_frame dims must be 11 ints, got ", dims.size());
  DSM_CHECK_DIM(z, 2);
  DSM_CHECK_DIM(in_proj, 2);
  const int64_t B = z.size(0), d_model = z.size(1), n_in = dims[5], dep_q = dims[3], card = dims[2];
  TORCH_CHECK(n_in >= 1 && in_proj.size(0) % n_in == 0 && in_proj.size(1) == d_model,
              "dsm: in_proj must be [n_in * dim, d_model] with d_model = z.size(1)");
  const int64_t dim = in_proj.size(0) / n_in, layers = dims[4];
  TORCH_CHECK(z.scalar_type() == in_proj.scalar_type() && logits.scalar_type() == z.scalar_type(),
              "dsm: z, in_proj and logits must share the model dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.numel() == dep_q * (8 * layers + 4),
              "dsm: table must hold dep_q * (8 layers + 4) int64");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == B && tokens.size(1) == dep_q && tokens.is_contiguous(),
              "dsm: tokens must be [B, dep_q] contiguous");
  DSM_CHECK_DTYPE(tokens, at::kLong);
  TORCH_CHECK(logits.dim() == 3 && logits.size(0) == dep_q && logits.size(1) == B && logits.size(2) == card &&
                  logits.is_contiguous(), "dsm: logits must be [dep_q, B, card] contiguous");
  DSM_CHECK_DTYPE(text_token, at::kLong);
  DSM_CHECK_DTYPE(temperature, at::kFloat);
  DSM_CHECK_DTYPE(seeds, at::kLong);
  DSM_CHECK_DTYPE(steps, at::kLong);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&text_token, &temperature, &seeds, &steps})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->is_contiguous(),
                "dsm: text_token/temperature/seeds/steps must be [B]");
  TORCH_CHECK(z.is_contiguous() && in_proj.is_contiguous() && table.is_contiguous(),
              "dsm: z, in_proj and table must be contiguous");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&logits, &table, &in_proj, &z, &text_token,
                                                                       &temperature, &seeds, &steps})
    DSM_CHECK_SAME_DEVICE(tokens, (*t));
  if (text_emb2) DSM_CHECK_SAME_DEVICE(tokens, (*text_emb2));
  const c10::cuda::CUDAGuard guard(tokens.device());
  DsmDepformerArgs a{};
  a.B = static_cast<int>(B);
  a.dim = static_cast<int>(dim);
  a.heads = static_cast<int>(dims[0]);
  a.hidden = static_cast<int>(dims[1]);
  a.card = static_cast<int>(card);
  a.dep_q = static_cast<int>(dep_q);
  a.layers = static_cast<int>(layers);
  a.d_model = static_cast<int>(d_model);
  a.n_in = static_cast<int>(n_in);
  a.text_vocab = static_cast<int>(dims[6]);
  a.top_k = static_cast<int>(dims[7]);
  a.step_scale = static_cast<int>(dims[8]);
  a.step_offset = static_cast<int>(dims[9]);
  a.blocks = static_cast<int>(dims[10]);
  a.dtype = dsm_dtype(z);
  a.eps = static_cast<float>(eps);
  // barrier + arrival counters
  const auto scratch = persistent_scratch(
      a, z, dsm_depformer_work_bytes(a.B, a.dim, a.hidden, a.n_in, a.layers, a.dep_q, a.dtype), 3 + dims[0],
      counters);
  a.table = table.data_ptr<int64_t>();
  a.in_proj = in_proj.data_ptr();
  a.text_emb2 = text_emb2 ? text_emb2->data_ptr() : nullptr;
  a.z = z.data_ptr();
  a.text_token = text_token.data_ptr<int64_t>();
  a.temperature = temperature.data_ptr<float>();
  a.seeds = seeds.data_ptr<int64_t>();
  a.steps = steps.data_ptr<int64_t>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.logits = logits.data_ptr();
  DSM_CUDA_OK(dsm_launch_depformer_frame(&a, stream_of(tokens)));
}

// The persistent decode step (csrc/decoder.cu). dims: heads, kv_heads, hidden, layers, page_size, context, gelu,
// blocks (0: one per SM). Without text_linear (Mimi's transformer) there is no head: out_norm, z and logits are None.
// The caches may be strided views ([layers, pages, page_size, kv_heads, D], unit stride in D) of x's dtype or e4m3.
// The layer weights are reached through `table` (dsm_kernels.cuda_ops builds it from tensors it checked); the tensors
// here are checked for shape, dtype and device.
void decoder_step(at::Tensor& x, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& logits,
                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& table,
                  const std::optional<at::Tensor>& out_norm, const std::optional<at::Tensor>& text_linear,
                  const std::optional<at::Tensor>& inv_freq, const at::Tensor& positions, const at::Tensor& slot,
                  const at::Tensor& seq_lens, const std::optional<at::Tensor>& starts, const at::Tensor& block_table,
                  const std::optional<at::Tensor>& cross_k,
                  const std::optional<at::Tensor>& cross_v, const std::optional<at::Tensor>& cross_block_table,
                  const std::optional<at::Tensor>& cross_seq_lens, at::IntArrayRef dims, double eps, double out_eps,
                  double scale, double cross_eps, const std::optional<at::Tensor>& counters) {
  DSM_CHECK_CUDA(x);
  TORCH_CHECK(dims.size() == 8, "dsm: decoder_step dims must be 8 ints, got ", dims.size());
  DSM_CHECK_DIM(x, 2);
  DSM_CHECK_DIM(k_cache, 5);
  DSM_CHECK_DIM(block_table, 2);
  const bool head = text_linear.has_value();
  TORCH_CHECK(head == out_norm.has_value() && head == z.has_value() && head == logits.has_value(),
              "dsm: decoder_step takes text_linear, out_norm, z and logits together, or none of them");
  const int64_t B = x.size(0), dim = x.size(1), layers = dims[3], vocab = head ? text_linear->size(0) : 0;
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.size(0) == layers && k_cache.size(2) == dims[4] && k_cache.size(3) == dims[1] &&
                  k_cache.stride(4) == 1,
              "dsm: k_cache/v_cache must be [layers, pages, page_size, kv_heads, D] alike, unit stride in D");
  TORCH_CHECK(x.is_contiguous() && table.is_contiguous() && block_table.is_contiguous(),
              "dsm: decoder_step tensors must be contiguous");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == x.scalar_type() || k_cache.scalar_type() == at::kFloat8_e4m3fn),
              "dsm: k_cache/v_cache must hold x's dtype, or both float8_e4m3fn");
  std::vector<const at::Tensor*> same_dtype;
  if (head) {
    DSM_CHECK_DIM((*text_linear), 2);
    TORCH_CHECK(text_linear->is_contiguous() && z->sizes() == x.sizes() && z->is_contiguous() && logits->dim() == 2 &&
                    logits->size(0) == B && logits->size(1) == vocab && logits->is_contiguous() &&
                    text_linear->size(1) == dim,
                "dsm: z must be like x, logits [B, vocab], text_linear [vocab, dim], all contiguous");
    same_dtype.insert(same_dtype.end(), {&(*z), &(*logits), &(*out_norm), &(*text_linear)});
  }
  for (const at::Tensor* t : same_dtype)
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dsm: decoder_step tensors must share x's dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.numel() == layers * DSM_DEC_TABLE_STRIDE,
              "dsm: table must hold layers * ", DSM_DEC_TABLE_STRIDE, " int64");
  DSM_CHECK_DTYPE(positions, at::kLong);
  DSM_CHECK_DTYPE(slot, at::kLong);
  DSM_CHECK_DTYPE(seq_lens, at::kInt);
  DSM_CHECK_DTYPE(block_table, at::kInt);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&positions, &slot, &seq_lens})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->is_contiguous(), "dsm: positions/slot/seq_lens must be [B]");
  TORCH_CHECK(block_table.size(0) == B, "dsm: block_table must be [B, pages_per_slot]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k_cache, &v_cache, &table, &positions, &slot,
                                                                       &seq_lens, &block_table})
    DSM_CHECK_SAME_DEVICE(x, (*t));
  for (const at::Tensor* t : same_dtype) DSM_CHECK_SAME_DEVICE(x, (*t));
  if (starts) {
    DSM_CHECK_DTYPE((*starts), at::kInt);
    TORCH_CHECK(starts->dim() == 1 && starts->size(0) == B && starts->is_contiguous(), "dsm: starts must be [B]");
    DSM_CHECK_SAME_DEVICE(x, (*starts));
  }
  if (inv_freq) {
    DSM_CHECK_DTYPE((*inv_freq), at::kFloat);
    TORCH_CHECK(inv_freq->numel() * 2 == k_cache.size(4), "dsm: inv_freq must hold head_dim / 2 values");
    DSM_CHECK_SAME_DEVICE(x, (*inv_freq));
  }
  const bool cross = cross_k.has_value();
  if (cross) {
    TORCH_CHECK(cross_v && cross_block_table && cross_seq_lens, "dsm: decoder_step takes all four cross tensors or none");
    DSM_CHECK_DIM((*cross_k), 5);
    DSM_CHECK_DIM((*cross_block_table), 2);
    TORCH_CHECK(cross_v->sizes() == cross_k->sizes() && cross_k->size(0) == layers && cross_k->size(3) == dims[0] &&
                    cross_k->size(4) == k_cache.size(4) && cross_k->is_contiguous() && cross_v->is_contiguous() &&
                    cross_k->scalar_type() == x.scalar_type() && cross_v->scalar_type() == x.scalar_type(),
                "dsm: cross_k/cross_v must be contiguous [layers, pages, page_size, heads, D] of x's dtype");
    DSM_CHECK_DTYPE((*cross_block_table), at::kInt);
    DSM_CHECK_DTYPE((*cross_seq_lens), at::kInt);
    TORCH_CHECK(cross_block_table->size(0) == B && cross_block_table->is_contiguous() &&
                    cross_seq_lens->numel() == B && cross_seq_lens->is_contiguous(),
                "dsm: cross_block_table must be [B, pages] and cross_seq_lens [B], contiguous");
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&(*cross_k), &(*cross_v),
                                                                         &(*cross_block_table), &(*cross_seq_lens)})
      DSM_CHECK_SAME_DEVICE(x, (*t));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  DsmDecoderArgs a{};
  a.B = static_cast<int>(B);
  a.dim = static_cast<int>(dim);
  a.heads = static_cast<int>(dims[0]);
  a.kv_heads = static_cast<int>(dims[1]);
  a.head_dim = static_cast<int>(k_cache.size(4));
  a.hidden = static_cast<int>(dims[2]);
  a.vocab = static_cast<int>(vocab);
  a.layers = static_cast<int>(layers);
  a.dtype = dsm_dtype(x);
  a.cache_dtype = kv_dtype(k_cache);
  a.page_size = static_cast<int>(dims[4]);
  a.pages_per_slot = static_cast<int>(block_table.size(1));
  a.context = static_cast<int>(dims[5]);
  a.gelu = static_cast<int>(dims[6]);
  a.blocks = static_cast<int>(dims[7]);
  a.eps = static_cast<float>(eps);
  a.out_eps = static_cast<float>(out_eps);
  a.scale = static_cast<float>(scale);
  a.cross_eps = static_cast<float>(cross_eps);
  if (cross) {
    a.cross_k = cross_k->data_ptr();
    a.cross_v = cross_v->data_ptr();
    a.cross_layer_stride = cross_k->stride(0);
    a.cross_block_table = cross_block_table->data_ptr<int>();
    a.cross_seq_lens = cross_seq_lens->data_ptr<int>();
    a.cross_page_size = static_cast<int>(cross_k->size(2));
    a.cross_length = static_cast<int>(cross_block_table->size(1) * cross_k->size(2));
  }
  a.table = table.data_ptr<int64_t>();
  a.out_norm = head ? out_norm->data_ptr() : nullptr;
  a.text_linear = head ? text_linear->data_ptr() : nullptr;
  a.inv_freq = inv_freq ? inv_freq->data_ptr<float>() : nullptr;
  a.positions = positions.data_ptr<int64_t>();
  a.slot = slot.data_ptr<int64_t>();
  a.seq_lens = seq_lens.data_ptr<int>();
  a.starts = starts ? starts->data_ptr<int>() : nullptr;
  a.block_table = block_table.data_ptr<int>();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.cache_layer_stride = k_cache.stride(0);
  a.page_stride = k_cache.stride(1);
  a.slot_stride = k_cache.stride(2);
  a.head_stride = k_cache.stride(3);
  a.x = x.data_ptr();
  a.z = head ? z->data_ptr() : nullptr;
  a.logits = head ? logits->data_ptr() : nullptr;
  // barrier + attention counters
  const auto scratch = persistent_scratch(a, x, dsm_decoder_work_bytes(a.B, a.heads, a.head_dim, a.hidden, a.dtype),
                                          2 + B * dims[0], counters);
  DSM_CUDA_OK(dsm_launch_decoder_step(&a, stream_of(x)));
}

// Mimi's residual-VQ encode for 1..4 rows (csrc/rvq.cu). dims: max_levels (the largest group's level count), blocks
// (0: one per SM).
void rvq_encode(at::Tensor& out, const at::Tensor& x, const at::Tensor& books, const at::Tensor& level_ranges,
                at::IntArrayRef dims, const std::optional<at::Tensor>& counters) {
  DSM_CHECK_CUDA(x);
  TORCH_CHECK(dims.size() == 2, "dsm: rvq_encode dims must be 2 ints, got ", dims.size());
  DSM_CHECK_DIM(x, 3);
  DSM_CHECK_DIM(books, 3);
  DSM_CHECK_DIM(out, 3);
  DSM_CHECK_DTYPE(x, at::kFloat);
  DSM_CHECK_DTYPE(books, at::kFloat);
  DSM_CHECK_DTYPE(out, at::kLong);
  DSM_CHECK_DTYPE(level_ranges, at::kInt);
  const int64_t D = books.size(2) - 2, G = level_ranges.size(0);
  TORCH_CHECK(books.is_contiguous() && level_ranges.is_contiguous() && level_ranges.dim() == 2 &&
                  level_ranges.size(1) == 2 && x.size(1) == G * D && out.size(0) == x.size(0) &&
                  out.size(2) == x.size(2),
              "dsm: rvq_encode takes x [B, G * D, T], books [L, K, D + 2] and level_ranges [G, 2] contiguous, "
              "out [B, n_q, T]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &books, &level_ranges})
    DSM_CHECK_SAME_DEVICE(x, (*t));
  const c10::cuda::CUDAGuard guard(x.device());
  DsmRvqArgs a{};
  a.N = static_cast<int>(x.size(0) * x.size(2));
  a.T = static_cast<int>(x.size(2));
  a.D = static_cast<int>(D);
  a.K = static_cast<int>(books.size(1));
  a.groups = static_cast<int>(G);
  a.max_levels = static_cast<int>(dims[0]);
  a.blocks = static_cast<int>(dims[1]);
  a.x = x.data_ptr<float>();
  a.sxb = x.stride(0);
  a.sxc = x.stride(1);
  a.sxt = x.stride(2);
  a.books = books.data_ptr<float>();
  a.level_ranges = level_ranges.data_ptr<int>();
  a.out = out.data_ptr<int64_t>();
  a.sob = out.stride(0);
  a.sol = out.stride(1);
  a.sot = out.stride(2);
  const auto scratch = persistent_scratch(a, x, dsm_rvq_work_bytes(), 2, counters);  // the grid barrier
  DSM_CUDA_OK(dsm_launch_rvq_encode(&a, stream_of(x)));
}

}  // namespace

TORCH_LIBRARY(dsm, m) {
  m.def("multistream_embed(Tensor! out, Tensor tokens, Tensor text_table, Tensor audio_tables, Tensor? text_table2, "
        "Tensor? cond) -> ()");
  m.def("append_kv(Tensor! k_cache, Tensor! v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def("paged_decode_attention(Tensor! out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor seq_lens, int context, float scale, int num_splits, Tensor(a!)? counters) -> ()");
  m.def("paged_decode_blocks_per_sm(Tensor q, Tensor k_cache) -> int");
  m.def("sample_tokens(Tensor! out, Tensor logits, Tensor? null_logits, float cfg_coef, Tensor temperature, "
        "int top_k, Tensor seeds, Tensor steps, int step_scale, int step_offset) -> ()");
  m.def("depformer_frame(Tensor! tokens, Tensor! logits, Tensor table, Tensor in_proj, Tensor? text_emb2, "
        "Tensor z, Tensor text_token, Tensor temperature, Tensor seeds, Tensor steps, int[] dims, float eps, "
        "Tensor(b!)? counters) -> ()");
  m.def("decoder_step(Tensor! x, Tensor(a!)? z, Tensor(b!)? logits, Tensor! k_cache, Tensor! v_cache, Tensor table, "
        "Tensor? out_norm, Tensor? text_linear, Tensor? inv_freq, Tensor positions, Tensor slot, Tensor seq_lens, "
        "Tensor? starts, Tensor block_table, Tensor? cross_k, Tensor? cross_v, Tensor? cross_block_table, Tensor? cross_seq_lens, "
        "int[] dims, float eps, float out_eps, float scale, float cross_eps, Tensor(c!)? counters) -> ()");
  m.def("rvq_encode(Tensor! out, Tensor x, Tensor books, Tensor level_ranges, int[] dims, Tensor(a!)? counters) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(dsm, CUDA, m) {
  m.impl("multistream_embed", &multistream_embed);
  m.impl("append_kv", &append_kv);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_blocks_per_sm", &paged_decode_blocks_per_sm);
  m.impl("sample_tokens", &sample_tokens);
  m.impl("depformer_frame", &depformer_frame);
  m.impl("decoder_step", &decoder_step);
  m.impl("rvq_encode", &rvq_encode);
}

// `import dsm_kernels._C` loads the library, which registers torch.ops.dsm.*; the module itself is empty (plain
// CPython init instead of pybind11 keeps this file off the heavy torch/extension.h include).
// `cuda_arch` names the sm_<arch> the kernels were compiled for (setup.py's DSM_CUDA_ARCH), so that Python can tell
// a GPU they cannot run on before a launch fails with "no kernel image is available".
#define DSM_STRINGIFY2(x) #x
#define DSM_STRINGIFY(x) DSM_STRINGIFY2(x)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dsm CUDA kernels: use torch.ops.dsm.*", -1,
                                      nullptr};
  PyObject* mod = PyModule_Create(&module);
#ifdef DSM_CUDA_ARCH_NAME
  if (mod != nullptr && PyModule_AddStringConstant(mod, "cuda_arch", DSM_STRINGIFY(DSM_CUDA_ARCH_NAME)) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
#endif
  return mod;
}
