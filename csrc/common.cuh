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

// Launch `kernel` on `stream` with `smem` bytes of dynamic shared memory and the launch attributes `attrs`.
template <typename... Params, typename... Args>
cudaError_t launch_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      cudaLaunchAttribute* attrs, unsigned num_attrs, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = num_attrs;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// Launch `kernel` on `stream`, as a programmatic dependent of the previous kernel when `pdl` (it may then start
// before that kernel ends, and must call pdl_launch_and_wait() before reading its outputs).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  return launch_ex(kernel, grid, block, 0, stream, attr, pdl ? 1 : 0, args...);
}

// Launch `kernel` cooperatively (all `grid` blocks resident at once, or the launch fails instead of deadlocking): the
// launch a kernel that waits at grid_barrier() needs.
template <typename... Params, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  return launch_ex(kernel, grid, block, smem, stream, attr, 1, args...);
}

// ---- Persistent kernels. Each primitive has a CPU-emulated twin (DSM_CUDA_EMU: tests/kernels/cuda_emu_include).

// The block's dynamic shared memory (16-byte aligned).
__device__ __forceinline__ char* dynamic_smem() {
#ifdef DSM_CUDA_EMU
  return dsm_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) char dsm_dynamic_smem[];
  return dsm_dynamic_smem;
#endif
}

// 16 bytes global -> shared, asynchronously and through L2 only (cp.async.cg, sm_80+). The copies a thread issued
// before a cp_async_commit() form a group; cp_async_wait<N>() returns when at most the N most recent groups of this
// thread are still in flight (then a __syncthreads makes the bytes visible to the block).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef DSM_CUDA_EMU
  dsm_emu::cp_async(smem, gmem, 16);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef DSM_CUDA_EMU
  dsm_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef DSM_CUDA_EMU
  dsm_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Ask L2 for the 128-byte line at p (no register written, nothing waited for): data a later phase reads.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef DSM_CUDA_EMU
  (void)p;
#else
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#endif
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
#ifdef DSM_CUDA_EMU
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#else
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
#endif
}

// The k-th (k = 1, 2, ...) grid-wide barrier of a cooperative launch. `arrivals` counts every block's arrivals since
// the launch (0 before its first barrier; grid_exit puts it back to 0 at the end), so barrier k opens once it
// reaches k * blocks: one atomic per block and a spin, nothing reset on the critical path (a reset, and a generation
// read before arriving, cost the last block three more L2 round trips a barrier). The fence before arriving makes the
// block's writes (all of them, through the __syncthreads) visible to every block after the barrier; readers still
// load data other blocks wrote through L2 (__ldcg), as L1 is not coherent. A barrier that never opens (a bug: a block
// skipped it) traps after seconds instead of hanging the device.
__device__ __forceinline__ void grid_barrier(unsigned* arrivals, unsigned k) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned target = k * (gridDim.x * gridDim.y * gridDim.z);
    __threadfence();
    atomicAdd(arrivals, 1u);
    unsigned spins = 0;
    while (load_acquire(arrivals) < target) {
      __nanosleep(20);
      if (++spins == (1u << 27)) __trap();
    }
#ifdef DSM_CUDA_EMU
    dsm_emu::left_grid_barrier();  // the emulation's adversarial schedule: this block may leave late
#endif
    __threadfence();
  }
  __syncthreads();
}

// The end of a kernel whose barriers counted in sync[0] (grid_barrier); sync[1] counts the blocks that got here. The
// last of them, when every block has left every barrier, puts both back to 0: the caller's sync words are then at 0
// for its next launch, with no memset before each launch (a node of its own in a CUDA graph). Every block's thread
// 0 must get here.
__device__ __forceinline__ void grid_exit(unsigned* sync) {
  if (threadIdx.x != 0) return;
  const unsigned blocks = gridDim.x * gridDim.y * gridDim.z;
  if (atomicAdd(sync + 1, 1u) + 1 == blocks) {
    atomicExch(sync, 0u);
    atomicExch(sync + 1, 0u);
  }
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
