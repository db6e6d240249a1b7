// The element types of the paged KV caches, shared by the kernels that write or read them (paged_attention.cu, the
// persistent decode step): the model dtype, or e4m3 (the fp8 cache option, DSM_FP8_E4M3).
//
// fp8 pages store clamp(x, -448, 448) rounded to nearest even (cvt.rn.satfinite: overflow saturates, NaN stays NaN),
// no scale, exactly dsm_kernels.reference.append_kv_ref; readers upcast to fp32.
#pragma once
#include <cuda_fp8.h>

#include "common.cuh"

namespace dsm {

using fp8 = __nv_fp8_e4m3;

template <typename TC>
__device__ __forceinline__ TC to_cache(float x) {
  return from_float<TC>(x);
}
template <>
__device__ __forceinline__ fp8 to_cache<fp8>(float x) {
  fp8 r;
  r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);  // round to nearest even, saturate to +-448
  return r;
}

// One cache element as fp32, loaded through L2 (other blocks, or the kernel before, wrote it).
template <typename TC>
__device__ __forceinline__ float cache_ldcg(const TC* p) {
  return to_float(__ldcg(p));
}
template <>
__device__ __forceinline__ float cache_ldcg<fp8>(const fp8* p) {
  const __nv_fp8x2_storage_t pair = __ldcg(reinterpret_cast<const __nv_fp8_storage_t*>(p));  // the byte, high half 0
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3))).x;  // exact: e4m3 is within fp16
}

}  // namespace dsm
