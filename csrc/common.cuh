// Device helpers shared by the dsm kernels (no torch): dtype conversion, vector loads, block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dsm_cuda.h"

namespace dsm {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N consecutive elements as fp32, in 16-byte transactions when `VECTOR` (caller guarantees 16-byte alignment).
// `L2` loads through L2 only (ld.global.cg) instead of the non-coherent path (__ldg), which PTX allows only for data
// read-only for the kernel's whole lifetime: a programmatic dependent starts while its predecessor still writes.
template <typename T, int N, bool VECTOR, bool L2 = false>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&v)[N]) {
  if constexpr (VECTOR && (N * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const uint4* src = reinterpret_cast<const uint4*>(p) + c;
      uint4 raw = L2 ? __ldcg(src) : __ldg(src);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[c * kPer + i] = to_float(e[i]);
    }
  } else if constexpr (L2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(__ldcg(p + i));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_float(p[i]);
  }
}

template <typename T, int N, bool VECTOR>
__device__ __forceinline__ void store_from_f32(T* __restrict__ p, const float (&v)[N]) {
  if constexpr (VECTOR && (N * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) e[i] = from_float<T>(v[c * kPer + i]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(v[i]);
  }
}

// Programmatic dependent launch (sm_90+; a no-op below, and when the kernel was launched without the attribute):
// let the next kernel of the stream launch now, then wait until the previous kernel has completed and its writes
// are visible. Call before the first global read of anything an earlier kernel may have written.
__device__ __forceinline__ void pdl_launch_and_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Launch `kernel` on `stream`, as a programmatic dependent of the previous kernel when `pdl` (it may then start
// before that kernel ends, and must call pdl_launch_and_wait() before reading its outputs).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

}  // namespace dsm

// Calls F.template operator()<T>() with T the C++ type of a DsmDtype code; returns cudaErrorInvalidValue otherwise.
#define DSM_DISPATCH_DTYPE(code, T, ...)               \
  switch (code) {                                      \
    case DSM_F32: {                                    \
      using T = float;                                 \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    case DSM_F16: {                                    \
      using T = __half;                                \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    case DSM_BF16: {                                   \
      using T = __nv_bfloat16;                         \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    default:                                           \
      return cudaErrorInvalidValue;                    \
  }
