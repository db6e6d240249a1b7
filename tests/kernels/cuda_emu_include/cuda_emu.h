// CPU emulation of the CUDA subset that csrc/*.cu use, for tests only: the kernels compile as plain C++ (g++ with
// this folder first on the include path, so <cuda_runtime.h> etc. land here) and run on CPU memory, so CI executes
// their logic (indexing, split-K merge, radix top-k, fp8 rounding) against the reference ops, not only compiles it.
//
// Model: the blocks of a launch run one after another, in a shuffled order; the threads of a block run as fibers
// (coroutines with their own stacks) on the calling OS thread, switched only at __syncthreads and warp collectives,
// which are barriers (a thread that returns leaves them, as an exited GPU thread does), and at __nanosleep (a spin
// loop's pause), in a new random order between each two of those, while a random quarter of the warps sits out
// each round (so warps drift apart) and, in a cooperative launch, a random block now and then stalls for a few
// rounds (so blocks drift apart) and a block leaving a grid barrier is now and then late by up to a phase (so one
// reading what the last phase left may find the next phase's writes). __shared__ becomes `static`: one copy per kernel
// instantiation, which is one block's shared memory since blocks never overlap. Threads in which none can move
// (threads at different barriers, or spinning on what nobody will write) end the launch with
// cudaErrorLaunchFailure instead of hanging.
//
// A cooperative launch (cudaLaunchAttributeCooperative) runs all its blocks at once, their threads interleaved in one
// random order, so that a grid-wide barrier made of atomics and spin loops works; such kernels use dynamic shared
// memory only (dsm::dynamic_smem(), one buffer per block), since a `static` __shared__ would be shared by the blocks.
// cp.async copies (dsm::cp_async16) land either at their issue or at the issuing thread's cp.async.wait_group, at
// random: a read of the destination before the wait (or, by another thread, before the barrier after it) may see the
// old bytes, and a copy into a slot that another thread still reads may overwrite it.
//
// What it cannot check: memory-model races between blocks or warps, timing, PDL (griddepcontrol is compiled out with
// __CUDA_ARCH__ undefined) and the device math library's ulps (libm here).
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <array>
#include <bit>
#include <climits>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define DSM_CUDA_EMU 1  // csrc/common.cuh takes the emulated dynamic shared memory, cp.async and atomics below

// ---------------------------------------------------------------------------------------------------- vector types
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct float2 {
  float x, y;
};

// ---------------------------------------------------------------------------------------------- 16- and 8-bit floats
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
struct __half2_raw {
  unsigned short x, y;
};
struct __half2 {
  __half x, y;
  __half2() = default;
  explicit __half2(const __half2_raw& r) : x{r.x}, y{r.y} {}
};

inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.__x)); }
inline __half __float2half_rn(float x) {  // libgcc's float -> _Float16 rounds to nearest even
  return {std::bit_cast<uint16_t>(static_cast<_Float16>(x))};
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

inline float __bfloat162float(__nv_bfloat16 h) { return std::bit_cast<float>(static_cast<uint32_t>(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN, sign kept
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even; overflow carries into the exponent (-> inf)
  return {static_cast<uint16_t>(u >> 16)};
}

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
struct __nv_fp8_e4m3 {
  __nv_fp8_storage_t __x;
};

// e4m3 (bias 7, no infinities, 0x7f NaN, largest 448) from fp32, rounded to nearest even. Only the saturating
// conversion of e4m3 is emulated (the one the kernels use).
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t kind) {
  if (sat != __NV_SATFINITE || kind != __NV_E4M3) __builtin_trap();
  if (isnan(x)) return 0x7f;
  const unsigned char sign = signbit(x) ? 0x80 : 0;
  const float a = fabsf(x);
  if (a >= 448.f) return sign | 0x7e;
  if (a < 0x1p-6f) return sign | static_cast<unsigned char>(rintf(a * 512.f));  // subnormal step 2^-9 (8: min normal)
  int e;
  frexpf(a, &e);  // a = f * 2^e, f in [0.5, 1): unbiased exponent e - 1
  int u = e - 1;
  int m = static_cast<int>(rintf(ldexpf(a, 3 - u)));  // in [8, 16]
  if (m == 16) {
    m = 8;
    ++u;
  }
  const int code = ((u + 7) << 3) | (m - 8);
  return sign | static_cast<unsigned char>(code > 0x7e ? 0x7e : code);
}
inline float dsm_emu_fp8_e4m3_to_float(unsigned char c) {
  const int e = (c >> 3) & 15, m = c & 7;
  float v = (e == 15 && m == 7) ? NAN : e == 0 ? ldexpf(static_cast<float>(m), -9) : ldexpf(8.f + m, e - 10);
  return (c & 0x80) ? -v : v;
}
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t pair, __nv_fp8_interpretation_t kind) {
  if (kind != __NV_E4M3) __builtin_trap();
  const __half lo = __float2half_rn(dsm_emu_fp8_e4m3_to_float(pair & 0xff));  // exact: e4m3 is a subset of fp16
  const __half hi = __float2half_rn(dsm_emu_fp8_e4m3_to_float(pair >> 8));
  return {lo.__x, hi.__x};
}

// ------------------------------------------------------------------------------------------------ device functions
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
// Compiled with -ffp-contract=off, so these round once each, as their CUDA intrinsics.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename I>
inline I atomicAdd(I* p, I v) {  // threads switch only at barriers and pauses: nothing interleaves with this
  const I old = *p;
  *p = v + old;
  return old;
}
template <typename I>
inline I atomicExch(I* p, I v) {
  const I old = *p;
  *p = v;
  return old;
}
inline void __threadfence() {}
[[noreturn]] inline void __trap() { __builtin_trap(); }

// ---------------------------------------------------------------------------------------------------- runtime API
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaLaunchAttributeID { cudaLaunchAttributeCooperative = 2, cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
union cudaLaunchAttributeValue {
  int cooperative;
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// The built-in variables: set by the scheduler before it runs a block (blocks run one at a time) or resumes a thread.
inline uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
inline dim3 blockDim, gridDim;

namespace dsm_emu {

constexpr size_t kStackBytes = 64 << 10;

// Switching between a block's threads, at every barrier arrival, is the emulator's cost: on x86-64 a switch saves the
// callee-saved registers on the current stack and swaps stack pointers (~20 ns); elsewhere ucontext (a syscall each).
#if defined(__x86_64__)
extern "C" void dsm_emu_swap(void** save_sp, void* load_sp);
asm(R"(
  .text
  .weak dsm_emu_swap
  .type dsm_emu_swap, @function
dsm_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dsm_emu_swap, .-dsm_emu_swap
)");
struct Context {
  void* sp = nullptr;
};
inline void swap(Context& save, Context& load) { dsm_emu_swap(&save.sp, load.sp); }
inline void prepare(Context& c, char* stack, void (*entry)()) {  // the first swap to `c` "returns" into entry
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15}) - 64);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;  // r15 r14 r13 r12 rbx rbp
  sp[6] = reinterpret_cast<void*>(entry);       // entry starts with rsp = 8 mod 16, as after a call
  sp[7] = nullptr;                              // entry never returns
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void swap(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void prepare(Context& c, char* stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Barrier {
  int expected = 0, arrived = 0;
  unsigned long generation = 0;
};

struct Block {  // what the threads of one resident block share
  uint3 idx{0, 0, 0};
  Barrier barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::array<uint64_t, 32>> warp_slots;  // the lanes' values of a warp collective
  std::unique_ptr<uint4[]> smem;                     // dynamic shared memory (16-byte aligned)
  unsigned long stalled_until = 0;                   // the block sits out the scheduler's rounds before this one
};

struct Copy {  // a pending cp.async
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  Context ctx;
  std::unique_ptr<char[]> stack;
  Block* block = nullptr;
  unsigned tid = 0;
  int warp = 0, lane = 0;
  bool done = false;
  std::vector<Copy> open;                     // cp.async copies since the last commit
  std::deque<std::vector<Copy>> committed;    // committed groups, oldest first
};

struct Launch {
  dim3 block;
  size_t smem_bytes = 0;
  std::function<void()> body;
  Context scheduler;
  std::vector<Fiber> fibers;
  std::vector<Block> blocks;    // the resident blocks: one, or the whole grid of a cooperative launch
  unsigned long progress = 0;   // arrivals + completions: none in a round = deadlock
  unsigned long round = 0;      // the scheduler's round
  std::mt19937 rng{12345};      // thread and block orders (fixed: reproducible runs)
};

inline Launch* current_launch = nullptr;
inline Fiber* current_fiber = nullptr;
inline cudaError_t last_error = cudaSuccess;

inline void wait(Barrier& b) {
  ++current_launch->progress;
  const unsigned long gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) swap(current_fiber->ctx, current_launch->scheduler);
}

inline void leave(Barrier& b) {  // an exited thread no longer counts
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void fiber_main() {
  Launch& L = *current_launch;
  L.body();
  Fiber& f = *current_fiber;
  f.done = true;
  ++L.progress;
  leave(f.block->barrier);
  leave(f.block->warp_barriers[f.warp]);
  swap(f.ctx, L.scheduler);  // never resumed
}

// A spin loop's pause: the thread lets the others run (no progress of its own).
inline void pause() { swap(current_fiber->ctx, current_launch->scheduler); }

// A block leaving a grid barrier (called by the thread that saw it open, dsm::grid_barrier) is, one time in three,
// late by 1..64 rounds (a phase is tens of rounds: every warp collective is a yield): the others run ahead into the
// next phase while it has not yet read what the last one left, so a buffer reused one phase too early is overwritten
// under its reader, as on a GPU (the random stalls alone rarely line up with a barrier's opening).
inline void left_grid_barrier() {
  Launch& L = *current_launch;
  if (L.blocks.size() > 1 && L.rng() % 3 == 0) current_fiber->block->stalled_until = L.round + 2 + L.rng() % 64;
}

// A copy lands at any time between its issue and its wait on a GPU: here at one of the two ends, at random, so that
// both a read before the wait and a reissue of a slot someone still reads show.
inline void cp_async(void* dst, const void* src, size_t bytes) {
  // cp.async of 16 bytes needs both addresses 16-byte aligned (a misaligned-address fault on a GPU)
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % bytes) __builtin_trap();
  if (current_launch->rng() & 1) memcpy(dst, src, bytes);
  else current_fiber->open.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  Fiber& f = *current_fiber;
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}
inline void cp_async_wait(int pending) {  // complete all but the `pending` most recent committed groups
  Fiber& f = *current_fiber;
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const Copy& c : f.committed.front()) memcpy(c.dst, c.src, c.bytes);
    f.committed.pop_front();
  }
}
inline char* dynamic_smem() { return reinterpret_cast<char*>(current_fiber->block->smem.get()); }

inline int warp_size(const Launch& L, int warp) {
  const int n = static_cast<int>(L.block.x) - 32 * warp;
  return n < 32 ? n : 32;
}

// Runs the blocks `idx` at once (their threads interleaved) until all their threads return.
inline bool run_blocks(Launch& L, const std::vector<uint3>& idx) {
  const int n = static_cast<int>(L.block.x);
  const int warps = (n + 31) / 32;
  L.blocks.resize(idx.size());
  if (L.fibers.size() < idx.size() * n) {
    L.fibers.resize(idx.size() * n);
    for (Fiber& f : L.fibers)
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
  }
  std::vector<Fiber*> order;
  for (size_t blk = 0; blk < idx.size(); ++blk) {
    Block& B = L.blocks[blk];
    B.idx = idx[blk];
    B.stalled_until = 0;
    B.barrier = Barrier{n, 0, 0};
    B.warp_barriers.assign(warps, Barrier{});
    B.warp_slots.assign(warps, {});
    for (int w = 0; w < warps; ++w) B.warp_barriers[w].expected = warp_size(L, w);
    if (!B.smem && L.smem_bytes > 0) B.smem.reset(new uint4[(L.smem_bytes + 15) / 16]);
    if (B.smem) memset(B.smem.get(), 0xff, L.smem_bytes);  // uninitialised, as on a GPU: NaN for floats
    for (int i = 0; i < n; ++i) {
      Fiber& f = L.fibers[blk * n + i];
      f.block = &B;
      f.tid = i;
      f.warp = i / 32;
      f.lane = i % 32;
      f.done = false;
      f.open.clear();
      f.committed.clear();
      prepare(f.ctx, f.stack.get(), fiber_main);
      order.push_back(&f);
    }
  }
  int live = static_cast<int>(order.size());
  // Of blocks run at once (a cooperative launch), one drawn at random about every eighth round stalls for 1..6
  // rounds, so that blocks too drift apart: one may run a whole phase ahead while another has not yet read what the
  // last phase left (a buffer reused too early is then overwritten under its reader, as on a GPU).
  while (live > 0) {
    const unsigned long round = ++L.round;
    if (idx.size() > 1 && L.rng() % 8 == 0) L.blocks[L.rng() % idx.size()].stalled_until = round + 1 + L.rng() % 6;
    // Each round runs the threads, each up to its next barrier, in a new random order: a thread that reads what
    // another wrote with no barrier between them sees it or not depending on the order (a GPU promises neither).
    std::shuffle(order.begin(), order.end(), L.rng);
    const unsigned long before = L.progress;
    // A quarter of the warps, drawn anew each round, sit the round out: warps drift apart by whole segments, as on a
    // GPU, so that one warp's late write is seen missing by another that does not wait for it.
    const uint64_t salt = L.rng();
    bool skipped = false;
    for (Fiber* f : order) {
      if (f->done) continue;
      if (f->block->stalled_until > round) {
        skipped = true;
        continue;
      }
      uint64_t key = salt ^ (reinterpret_cast<uintptr_t>(f->block) * 0x9E3779B97F4A7C15ull) ^ (f->warp * 0xBF58476D1CE4E5B9ull);
      key ^= key >> 31;
      key *= 0x94D049BB133111EBull;
      if (((key >> 29) & 3) == 0) {
        skipped = true;
        continue;
      }
      current_fiber = f;
      threadIdx = {f->tid, 0, 0};
      blockIdx = f->block->idx;
      swap(L.scheduler, f->ctx);
      if (f->done) --live;
    }
    if (live > 0 && L.progress == before && !skipped) return false;  // every live thread waits for what nobody does
  }
  return true;
}

// A warp collective: every lane publishes `bits`, then reads what `read` makes of the warp's values.
template <typename Read>
inline auto warp_exchange(uint64_t bits, Read read) {
  Launch& L = *current_launch;
  Block& B = *current_fiber->block;
  const int w = current_fiber->warp, lane = current_fiber->lane;
  B.warp_slots[w][lane] = bits;
  wait(B.warp_barriers[w]);
  const auto result = read(B.warp_slots[w], lane, warp_size(L, w));
  wait(B.warp_barriers[w]);  // nobody overwrites a slot before every lane has read
  return result;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}

}  // namespace dsm_emu

inline void __syncthreads() { dsm_emu::wait(dsm_emu::current_fiber->block->barrier); }
inline void __nanosleep(unsigned) { dsm_emu::pause(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  const uint64_t bits = dsm_emu::warp_exchange(dsm_emu::to_bits(v), [&](const auto& s, int lane, int n) {
    const int src = lane ^ lane_mask;
    return s[src < n ? src : lane];
  });
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane) {
  const uint64_t bits = dsm_emu::warp_exchange(dsm_emu::to_bits(v), [&](const auto& s, int, int) {
    return s[src_lane & 31];
  });
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  dsm_emu::Fiber& f = *dsm_emu::current_fiber;
  dsm_emu::wait(f.block->warp_barriers[f.warp]);
}
inline unsigned __reduce_add_sync(unsigned, unsigned v) {
  return dsm_emu::warp_exchange(v, [](const auto& s, int, int n) {
    unsigned sum = 0;
    for (int i = 0; i < n; ++i) sum += static_cast<unsigned>(s[i]);
    return sum;
  });
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  return dsm_emu::warp_exchange(predicate != 0, [](const auto& s, int, int n) {
    unsigned mask = 0;
    for (int i = 0; i < n; ++i) mask |= static_cast<unsigned>(s[i] != 0) << i;
    return mask;
  });
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = dsm_emu::last_error;
  dsm_emu::last_error = cudaSuccess;
  return e;
}

template <typename... Params, typename... Args>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Params...), Args... args) {
  const dim3 g = cfg->gridDim, b = cfg->blockDim;
  if (b.y != 1 || b.z != 1 || b.x == 0 || b.x > 1024) return dsm_emu::last_error = cudaErrorInvalidValue;
  bool cooperative = false;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeCooperative) cooperative = cfg->attrs[i].val.cooperative != 0;
  dsm_emu::Launch L;
  L.block = b;
  L.smem_bytes = cfg->dynamicSmemBytes;
  blockDim = b;
  gridDim = g;
  L.body = [&]() { kernel(static_cast<Params>(args)...); };
  dsm_emu::current_launch = &L;
  // A GPU runs blocks in no set order: a fixed shuffle of them, so that no kernel passes only because the last block
  // of a launch is the highest-numbered one.
  std::vector<uint3> order;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) order.push_back({x, y, z});
  std::shuffle(order.begin(), order.end(), L.rng);
  bool ok = true;
  if (cooperative) {
    ok = dsm_emu::run_blocks(L, order);
  } else {
    for (size_t i = 0; i < order.size() && ok; ++i) ok = dsm_emu::run_blocks(L, {order[i]});
  }
  dsm_emu::current_launch = nullptr;
  dsm_emu::current_fiber = nullptr;
  return ok ? cudaSuccess : (dsm_emu::last_error = cudaErrorLaunchFailure);
}

template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 4;  // any positive count: the split planner only needs one
  return cudaSuccess;
}

// The device queries of the persistent kernel's launcher: an H100's shared memory per block (or DSM_CUDA_EMU_SMEM
// bytes: a test's way to make the weight ring too small for a block's rows), and few SMs (a grid of one block per SM
// stays small; its tests choose their block counts).
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  const char* smem = getenv("DSM_CUDA_EMU_SMEM");
  *value = attr == cudaDevAttrMultiProcessorCount ? 4 : (smem ? atoi(smem) : 232448);
  return cudaSuccess;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}
