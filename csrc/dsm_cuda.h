// Launchers of the dsm CUDA kernels: plain C ABI on raw pointers, so the .cu files never include torch and build
// with a bare nvcc (CPU CI compiles them for sm_90a); csrc/bindings.cpp adapts torch tensors to these calls.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

// Element types of the tensors passed as void*. DSM_FP8_E4M3 is accepted for KV caches only.
enum DsmDtype { DSM_F32 = 0, DSM_F16 = 1, DSM_BF16 = 2, DSM_FP8_E4M3 = 3 };

#ifdef __cplusplus
extern "C" {
#endif

// out[b, :] = sum_k table_k[tokens[b, k]] (+ text2 demux, + cond), fp32 accumulation. cond is fp32 or NULL;
// text2 may be NULL. Tables share dtype `table_dtype`; out has `out_dtype`. K <= 64.
cudaError_t dsm_launch_multistream_embed(const int64_t* tokens, int64_t stride_tb, int64_t stride_tk, int B, int K,
                                         const void* text, const void* text2, const void* audio, const float* cond,
                                         void* out, int table_dtype, int out_dtype, int64_t D, int64_t Vt,
                                         int64_t stride_text, int64_t stride_text2, int64_t stride_aq,
                                         int64_t stride_av, int64_t stride_cond, int64_t stride_out,
                                         cudaStream_t stream);

// k_cache[row // S, row % S] = k[b] (cast) for each b with slot_mapping[b] >= 0; same for v.
cudaError_t dsm_launch_append_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                                 const int64_t* slot_mapping, int B, int HD, int page_size, int in_dtype,
                                 int cache_dtype, int64_t stride_kb, int64_t stride_vb, int64_t stride_kcp,
                                 int64_t stride_kcs, int64_t stride_vcp, int64_t stride_vcs, cudaStream_t stream);

// Split-K decode attention. q/out share `dtype`; the caches hold `cache_dtype` (== dtype, or DSM_FP8_E4M3);
// head_dim in {16, 32, 64, 128, 256}. part_m/part_l: [B*H*num_splits], part_acc: [B*H*num_splits*head_dim] fp32
// workspace (unused when num_splits == 1). counters: NULL (a second kernel merges the splits) or >= B*H int32 at 0,
// used by one launch at a time (the last split of each (slot, head) merges and re-arms its counter to 0).
// pdl: launch as programmatic dependents of the previous kernel (sm_90+).
cudaError_t dsm_launch_paged_decode_attention(
    void* out, const void* q, const void* k_cache, const void* v_cache, const int32_t* block_table,
    const int32_t* seq_lens, int B, int H, int head_dim, int dtype, int cache_dtype, int page_size,
    int pages_per_slot, int context, float scale, int num_splits, float* part_m, float* part_l, float* part_acc,
    int* counters, int64_t stride_qb, int64_t stride_qh, int64_t stride_kp, int64_t stride_ks, int64_t stride_vp,
    int64_t stride_vs, int64_t stride_bt, int pdl, cudaStream_t stream);

// Resident blocks per SM of the decode kernel for these types (the split count targets whole waves of them).
cudaError_t dsm_paged_decode_blocks_per_sm(int head_dim, int dtype, int cache_dtype, int* blocks);

// One token per row: CFG mix, temperature (<= 0: argmax), top-k, exp race with the reference's hash noise (row b's
// noise counter: steps[b] * step_scale + step_offset). null_logits may be NULL. V <= 16384.
cudaError_t dsm_launch_sample_tokens(int64_t* out, const void* logits, const void* null_logits, int dtype, int B,
                                     int V, int64_t stride_l, int64_t stride_n, float cfg_coef,
                                     const float* temperature, int top_k, const int64_t* seeds,
                                     const int64_t* steps, int64_t step_scale, int64_t step_offset,
                                     cudaStream_t stream);

// One depth-transformer frame (dsm_kernels.reference.depformer_frame_ref) for 1..4 rows in one cooperative launch
// (csrc/depformer.cu). Weights are reached through `table`, a device array of DSM_DEP_TABLE_STRIDE(layers) int64 per
// codebook k: per layer i at [8 i]: the QKV, out, linear_in and linear_out weights of k's weight set, norm1, norm2,
// scale1 and scale2 (NULL: no LayerScale); then at [8 layers]: the head weight, its RMSNorm alpha (NULL: none), the
// embedding table of the token fed at k (k = 0: the first text table) and k's depformer_in index (an integer).
#define DSM_DEP_TABLE_STRIDE(layers) (8 * (layers) + 4)
typedef struct {
  int B, dim, heads, hidden, card, dep_q, layers, d_model, n_in, text_vocab, top_k, dtype;
  int blocks;  // grid size: 0 = one block per SM; fewer (tests) split the work more coarsely
  int step_scale, step_offset;  // codebook k's noise counter: steps * step_scale + step_offset + k
  float eps;
  const int64_t* table;
  const void* in_proj;     // [n_in * dim, d_model]: every depformer_in projection
  const void* text_emb2;   // the demux second text table [text_vocab, dim], or NULL (no demux)
  const void* z;           // [B, d_model] temporal output, model dtype
  const int64_t* text_token;  // [B], fed at k = 0
  const float* temperature;   // [B]
  const int64_t* seeds;       // [B]
  const int64_t* steps;       // [B]: see step_scale
  int64_t* tokens;            // [B, dep_q]
  void* logits;               // [dep_q, B, card]
  void* work;                 // dsm_depformer_work_bytes() of scratch
  unsigned* sync;             // 3 + heads uint32 at 0: barrier arrivals and exits, a counter per head, the head's
} DsmDepformerArgs;

size_t dsm_depformer_work_bytes(int B, int dim, int hidden, int n_in, int layers, int dep_q, int dtype);
cudaError_t dsm_launch_depformer_frame(const DsmDepformerArgs* args, cudaStream_t stream);

// The temporal transformer's decode step (dsm_kernels.decoder) for 1..4 rows in one cooperative launch
// (csrc/decoder.cu): every layer (norm + QKV + RoPE + paged K/V write, paged attention, out + residual, [LayerNorm +
// cross query, attention over the condition pages, cross out + residual,] norm + FFN + residual), then, with a head
// (vocab > 0), the output RMSNorm and the text head. Mimi's streaming transformer is the same step without a head,
// with LayerNorms, a GELU FFN and its K/V ring seen as one page per stream (dsm_kernels.mimi_transformer).
// `table`: DSM_DEC_TABLE_STRIDE int64 per layer: the QKV, out, linear_in and linear_out weights, norm1, norm2, scale1
// and scale2 (NULL: no LayerScale); then, with a cross-attention, its LayerNorm weight and bias, query and out weights,
// and its LayerScale (or NULL); last the biases of norm1 and norm2 (NULL: RMSNorms; else LayerNorms).
#define DSM_DEC_TABLE_STRIDE 15
#define DSM_DEC_MAX_SPLITS 128
typedef struct {
  int B, dim, heads, kv_heads, head_dim, hidden, vocab, layers, dtype;
  int page_size, pages_per_slot, context;
  int blocks;  // grid size: 0 = one block per SM
  int gelu;    // the FFN: 0 = SiLU-gated (linear_in [2 hidden, dim]), 1 = GELU (linear_in [hidden, dim])
  int cache_dtype;  // the K/V pages: dtype, or DSM_FP8_E4M3 (stored saturated and rounded to nearest even)
  float eps, out_eps, scale, cross_eps;
  const int64_t* table;
  const void* out_norm;     // [dim], NULL when vocab == 0
  const void* text_linear;  // [vocab, dim], NULL when vocab == 0
  const float* inv_freq;    // [head_dim / 2], or NULL: no RoPE
  const int64_t* positions;  // [B]
  // [B] pool row of this step's K/V (page slot / page_size, offset slot % page_size), -1: not written
  const int64_t* slot;
  const int32_t* seq_lens;   // [B] positions + 1, 0: inactive row (zero attention)
  const int32_t* starts;     // [B] first position a row may see (a ring overwritten by later rows), or NULL
  const int32_t* block_table;  // [B, pages_per_slot]
  // pages of cache_dtype; element (layer, page, slot, kv head, d) at layer * cache_layer_stride +
  // page * page_stride + slot * slot_stride + head * head_stride + d
  void* k_cache;
  void* v_cache;
  int64_t cache_layer_stride, page_stride, slot_stride, head_stride;
  // the condition's K/V pages (cross-attention; cross_k NULL: none): [layers, pages, cross_page_size, heads, head_dim];
  // row b attends over all cross_length positions of pages cross_block_table[b] ([B, cross_length / page_size])
  void* cross_k;
  void* cross_v;
  int64_t cross_layer_stride;
  const int32_t* cross_block_table;
  const int32_t* cross_seq_lens;  // [B], all cross_length
  int cross_page_size, cross_length;
  void* x;                   // [B, dim]: the embedded input, updated into the residual stream
  void* z;                   // [B, dim] out: the normed output (NULL when vocab == 0)
  void* logits;              // [B, vocab] out (NULL when vocab == 0)
  void* work;                // dsm_decoder_work_bytes() of scratch
  unsigned* sync;            // 2 + B * heads uint32 at 0, left at 0: barrier arrivals, exits, attention counters
} DsmDecoderArgs;

size_t dsm_decoder_work_bytes(int B, int heads, int head_dim, int hidden, int dtype);
cudaError_t dsm_launch_decoder_step(const DsmDecoderArgs* args, cudaStream_t stream);

// Mimi's split residual-VQ encode (dsm_kernels.rvq_encode) for 1..4 rows in one cooperative launch (csrc/rvq.cu):
// every level of every group, each block scoring its share of a level's codebook, a grid barrier, then every block
// resolving the level's codes from the blocks' partial minima and updating its own copy of the residuals.
#define DSM_RVQ_MAX_GROUPS 2
#define DSM_RVQ_MAX_DIM 256
#define DSM_RVQ_MAX_BLOCKS 256
typedef struct {
  int N, T;          // rows = batch rows x steps (1..4); row n is batch row n / T, step n % T
  int D, K, groups;  // code dim (even, <= 256), codebook entries, groups (<= 2)
  int max_levels;    // the largest level count of a group
  int blocks;        // grid size: 0 = one block per SM (at most DSM_RVQ_MAX_BLOCKS)
  const float* x;    // [B, groups * D, T]: the projected latents, strided
  int64_t sxb, sxc, sxt;
  const float* books;  // [L, K, D + 2] rows [c, 1, |c|^2]
  const int32_t* level_ranges;  // [groups, 2]: first level, level count
  int64_t* out;      // codes [B, n_q, T], strided
  int64_t sob, sol, sot;
  void* work;        // dsm_rvq_work_bytes(): the blocks' partial minima, two levels' worth
  unsigned* sync;    // 2 uint32 at 0, left at 0: the grid barrier's arrivals, exits
} DsmRvqArgs;

size_t dsm_rvq_work_bytes(void);
cudaError_t dsm_launch_rvq_encode(const DsmRvqArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
