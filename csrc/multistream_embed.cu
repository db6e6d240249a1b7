// Multistream embedding: out[b, :] = sum of K table rows (audio 0..K-2, text, text2 demux, cond), fp32 accumulate.
// One thread owns VEC consecutive columns of one slot (16-byte loads) and walks the K tokens, which a block stages
// in shared memory once. Id -1 skips the load. Same summation order as dsm_kernels.reference.
#include "common.cuh"

namespace {

constexpr int kMaxK = 64;

template <typename T, typename TO, int VEC, bool VECTOR>
__global__ void __launch_bounds__(128) multistream_embed_kernel(
    const int64_t* __restrict__ tokens, int64_t stride_tb, int64_t stride_tk, int K, const T* __restrict__ text,
    const T* __restrict__ text2, const T* __restrict__ audio, const float* __restrict__ cond, TO* __restrict__ out,
    int64_t D, int64_t Vt, int64_t stride_text, int64_t stride_text2, int64_t stride_aq, int64_t stride_av,
    int64_t stride_cond, int64_t stride_out) {
  __shared__ int64_t tok[kMaxK];
  const int64_t b = blockIdx.x;
  for (int k = threadIdx.x; k < K; k += blockDim.x) tok[k] = tokens[b * stride_tb + k * stride_tk];
  __syncthreads();
  const int64_t d0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (d0 >= D) return;  // VEC > 1 only when D % VEC == 0, so a live thread owns VEC valid columns
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  float v[VEC];
#pragma unroll 8
  for (int k = 1; k < K; ++k) {
    const int64_t t = tok[k];
    if (t >= 0) {
      dsm::load_f32<T, VEC, VECTOR>(audio + (k - 1) * stride_aq + t * stride_av + d0, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += v[i];
    }
  }
  const int64_t t0 = tok[0];
  if (t0 >= 0) {
    const int64_t first = text2 ? t0 % Vt : t0;
    dsm::load_f32<T, VEC, VECTOR>(text + first * stride_text + d0, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += v[i];
    const int64_t second = text2 ? t0 / Vt - 1 : -1;
    if (second >= 0) {
      dsm::load_f32<T, VEC, VECTOR>(text2 + second * stride_text2 + d0, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += v[i];
    }
  }
  if (cond) {
    dsm::load_f32<float, VEC, VECTOR>(cond + b * stride_cond + d0, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += v[i];
  }
  dsm::store_from_f32<TO, VEC, VECTOR>(out + b * stride_out + d0, acc);
}

template <typename T, typename TO, int VEC, bool VECTOR>
cudaError_t launch(const int64_t* tokens, int64_t stride_tb, int64_t stride_tk, int B, int K, const void* text,
                   const void* text2, const void* audio, const float* cond, void* out, int64_t D, int64_t Vt,
                   int64_t stride_text, int64_t stride_text2, int64_t stride_aq, int64_t stride_av,
                   int64_t stride_cond, int64_t stride_out, cudaStream_t stream) {
  const int64_t threads_needed = (D + VEC - 1) / VEC;
  const int threads = threads_needed < 128 ? static_cast<int>((threads_needed + 31) / 32 * 32) : 128;
  const dim3 grid(B, static_cast<unsigned>((threads_needed + threads - 1) / threads));
  return dsm::launch(multistream_embed_kernel<T, TO, VEC, VECTOR>, grid, dim3(threads), stream, false, tokens,
                     stride_tb, stride_tk, K, static_cast<const T*>(text), static_cast<const T*>(text2),
                     static_cast<const T*>(audio), cond, static_cast<TO*>(out), D, Vt, stride_text, stride_text2,
                     stride_aq, stride_av, stride_cond, stride_out);
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

extern "C" cudaError_t dsm_launch_multistream_embed(const int64_t* tokens, int64_t stride_tb, int64_t stride_tk, int B,
                                                    int K, const void* text, const void* text2, const void* audio,
                                                    const float* cond, void* out, int table_dtype, int out_dtype,
                                                    int64_t D, int64_t Vt, int64_t stride_text, int64_t stride_text2,
                                                    int64_t stride_aq, int64_t stride_av, int64_t stride_cond,
                                                    int64_t stride_out, cudaStream_t stream) {
  if (K < 1 || K > kMaxK) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  // 8 columns per thread: one 16-byte load of bf16/fp16 (two of fp32). The vector path needs every row start
  // 16-byte aligned: base pointers aligned and all row strides multiples of 8 elements (and D % 8 == 0).
  const bool vector = D % 8 == 0 && stride_text % 8 == 0 && stride_text2 % 8 == 0 && stride_aq % 8 == 0 &&
                      stride_av % 8 == 0 && stride_cond % 8 == 0 && stride_out % 8 == 0 && aligned16(text) &&
                      aligned16(text2) && aligned16(audio) && aligned16(cond) && aligned16(out);
  DSM_DISPATCH_DTYPE(table_dtype, T, DSM_DISPATCH_DTYPE(out_dtype, TO, {
    return vector ? launch<T, TO, 8, true>(tokens, stride_tb, stride_tk, B, K, text, text2, audio, cond, out, D, Vt,
                                           stride_text, stride_text2, stride_aq, stride_av, stride_cond, stride_out,
                                           stream)
                  : launch<T, TO, 1, false>(tokens, stride_tb, stride_tk, B, K, text, text2, audio, cond, out, D,
                                            Vt, stride_text, stride_text2, stride_aq, stride_av, stride_cond,
                                            stride_out, stream);
  }));
  return cudaSuccess;
}
