// Sampler: one block per row, the row in registers (kItems per thread, strided for coalescing). CFG mix without FMA
// contraction (the reference's rounding), greedy argmax, top-k threshold, then the exp race argmax(p / -log u) over
// the kept tokens with the reference's counter-based hash noise. No host sync, no sort.
//
// At batch 1 the kernel is latency-bound and each block-wide reduction (shuffles, shared memory, barrier) costs
// ~0.3 us, so it makes few. The top-k threshold is exactly the k-th largest order-preserving int32 image ("key") of
// the logits, found by a radix-16 search instead of bisection (the Triton kernel's search; there the counting is
// by compares, and R = 8 above V = 4096):
// * Keys as offsets u = key - kKeyMin in [0, 2^bits): bits = 32, or 16 for bf16 logits without CFG (their fp32 images
//   have 16 zero low bits, so key >> 16, arithmetic, is exact and order-preserving), 19 for fp16 (13 zero bits).
// * Invariant: count(u >= lo) >= k > count(u >= lo + 2^(bits - 4p)) before pass p, from lo = 0 (padding has u = 0,
//   counted only at the first lo, which needs no test). Pass p splits that range into 16 buckets of 2^s,
//   s = max(bits - 4(p + 1), 0), and tests the thresholds lo + j * 2^s, j < 16, at once: each thread histograms its
//   keys into 16 byte counters (two 64-bit registers; a shift and an add per key, not 16 compares), suffix-sums them
//   into the 16 counts(u >= threshold), packs two 16-bit counts per word (a count is <= kItems * kThreads < 2^16),
//   then a warp redux per word, one shared-memory exchange and ONE barrier; every warp reads the same totals, so the
//   new lo, the largest threshold with count >= k, is block-uniform, and the range shrinks 16-fold. After
//   ceil(bits / 4) passes (8 fp32, 4 bf16, 5 fp16) its width is 1: lo is exactly the k-th largest key.
// * The softmax max needs no reduction: max(x) / t == max(x / t), correctly rounded division by t > 0 being
//   monotone, and max(x) comes with the greedy argmax.
// Block-wide rounds per sampled row: greedy argmax + passes + softmax sum + final argmax = 7 for bf16 logits without
// CFG (fp16: 8) and 11 otherwise, at any V; the bisection (up to 33 steps, plus min, max, softmax max) made ~37-39.
#include "sample_row.cuh"

namespace {

using namespace dsm::sampling;

template <typename T, int kItems, int kShift>
__global__ void __launch_bounds__(kThreads) sample_kernel(int64_t* __restrict__ out, const T* __restrict__ logits,
                                                          const T* __restrict__ null_logits, int V, int64_t stride_l,
                                                          int64_t stride_n, float cfg_coef,
                                                          const float* __restrict__ temperature, int top_k,
                                                          const int64_t* __restrict__ seeds,
                                                          const int64_t* __restrict__ steps, int64_t step_scale,
                                                          int64_t step_offset) {
  __shared__ SampleScratch scratch;
  const int64_t row = blockIdx.x;
  const int64_t token = sample_row<T, kItems, kShift>(logits + row * stride_l,
                                                      null_logits ? null_logits + row * stride_n : nullptr, V,
                                                      cfg_coef, temperature[row], top_k, seeds[row],
                                                      steps[row] * step_scale + step_offset,
                                                      scratch);
  if (threadIdx.x == 0) out[row] = token;
}

template <typename T, int kItems>
cudaError_t launch_items(int64_t* out, const T* l, const T* n, int B, int V, int64_t stride_l, int64_t stride_n,
                         float cfg_coef, const float* temperature, int top_k, const int64_t* seeds,
                         const int64_t* steps, int64_t step_scale, int64_t step_offset, cudaStream_t stream) {
  constexpr int kNarrow = narrow_key_shift<T>();
  // narrow keys are exact only for unmixed bf16/fp16 logits
  auto kernel = n == nullptr && kNarrow != 0 ? sample_kernel<T, kItems, kNarrow> : sample_kernel<T, kItems, 0>;
  return dsm::launch(kernel, dim3(B), dim3(kThreads), stream, false, out, l, n, V, stride_l, stride_n, cfg_coef,
                     temperature, top_k, seeds, steps, step_scale, step_offset);
}

template <typename T>
cudaError_t launch(int64_t* out, const void* logits, const void* null_logits, int B, int V, int64_t stride_l,
                   int64_t stride_n, float cfg_coef, const float* temperature, int top_k, const int64_t* seeds,
                   const int64_t* steps, int64_t step_scale, int64_t step_offset, cudaStream_t stream) {
  const T* l = static_cast<const T*>(logits);
  const T* n = static_cast<const T*>(null_logits);
  const int items = (V + kThreads - 1) / kThreads;
#define DSM_SAMPLE(ITEMS) \
  launch_items<T, ITEMS>(out, l, n, B, V, stride_l, stride_n, cfg_coef, temperature, top_k, seeds, steps, \
                         step_scale, step_offset, stream)
  if (items <= 4) return DSM_SAMPLE(4);
  if (items <= 8) return DSM_SAMPLE(8);
  if (items <= 16) return DSM_SAMPLE(16);
  if (items <= 32) return DSM_SAMPLE(32);
  return cudaErrorInvalidValue;
#undef DSM_SAMPLE
}

}  // namespace

extern "C" cudaError_t dsm_launch_sample_tokens(int64_t* out, const void* logits, const void* null_logits, int dtype,
                                                int B, int V, int64_t stride_l, int64_t stride_n, float cfg_coef,
                                                const float* temperature, int top_k, const int64_t* seeds,
                                                const int64_t* steps, int64_t step_scale, int64_t step_offset,
                                                cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  DSM_DISPATCH_DTYPE(dtype, T, {
    return launch<T>(out, logits, null_logits, B, V, stride_l, stride_n, cfg_coef, temperature, top_k, seeds, steps,
                     step_scale, step_offset, stream);
  });
  return cudaErrorInvalidValue;
}
