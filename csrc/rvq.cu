// Mimi's split residual-VQ encode for 1..4 rows in ONE cooperative launch (semantics:
// dsm_kernels.reference.rvq_encode_ref; the Triton backend launches once per level).
//
// Why: at one stream the 32 levels are a chain of 32 small dependent steps (a level quantizes the residual the one
// before left); as launches they pay a launch gap each. Here one block per SM runs every level: it scores its share
// of the level's codebook against every row's residual (a warp per code, |c|^2 - 2 x.c), leaves its best (distance,
// index) per (group, row), and after a grid barrier every block reduces all blocks' partial minima to the level's
// codes (smallest distance, lowest index among equal ones, as the other backends) and subtracts the chosen entries
// from its own copy of the residuals in shared memory. One barrier a level; the partial minima are double-buffered
// by level parity (a block may write level l + 1's while another still reads level l's). While a block waits at the
// barrier, the next level's share of the codebook is already requested into L2 (it does not depend on the codes).
#include <climits>

#include "persistent.cuh"

namespace {

using namespace dsm::persistent;

__device__ __forceinline__ bool better(float d, int i, float best_d, int best_i) {
  return d < best_d || (d == best_d && i < best_i);
}

// (d, i) = the best of the warp's lanes' (d, i); every lane gets it.
__device__ __forceinline__ void warp_best(float& d, int& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float od = __shfl_xor_sync(0xffffffffu, d, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (better(od, oi, d, i)) {
      d = od;
      i = oi;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) rvq_kernel(const DsmRvqArgs a) {
  const int N = a.N, D = a.D, K = a.K, G = a.groups, GN = a.groups * a.N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // shared memory: residuals r [G][N][D], then each warp's best (distance, index) per (group, row)
  float* r = reinterpret_cast<float*>(dsm::dynamic_smem());
  float* warp_d = r + DSM_RVQ_MAX_GROUPS * kMaxRows * DSM_RVQ_MAX_DIM;
  int* warp_i = reinterpret_cast<int*>(warp_d + kWarps * DSM_RVQ_MAX_GROUPS * kMaxRows);
  float* part_d = static_cast<float*>(a.work);  // [2][G N][gridDim.x], then the indices
  int* part_i = reinterpret_cast<int*>(part_d + 2 * DSM_RVQ_MAX_GROUPS * kMaxRows * DSM_RVQ_MAX_BLOCKS);

  for (int e = threadIdx.x; e < GN * D; e += kThreads) {  // every block its own copy of the latents
    const int g = e / (N * D), n = (e / D) % N, d = e % D;
    r[e] = a.x[(n / a.T) * a.sxb + static_cast<int64_t>(g * D + d) * a.sxc + (n % a.T) * a.sxt];
  }
  const int lo = split_lo(K, blockIdx.x, gridDim.x), hi = split_lo(K, blockIdx.x + 1, gridDim.x);
  const int64_t row = D + 2;  // floats per augmented codebook row
  auto book = [&](int g, int l) { return a.books + static_cast<int64_t>(a.level_ranges[2 * g] + l) * K * row; };
  auto live = [&](int g, int l) { return l < a.level_ranges[2 * g + 1]; };
  __syncthreads();

  for (int l = 0; l < a.max_levels; ++l) {
    // score this block's codes of level l: warp w takes codes lo + w, lo + w + kWarps, ...
    float best_d[DSM_RVQ_MAX_GROUPS][kMaxRows];
    int best_i[DSM_RVQ_MAX_GROUPS][kMaxRows];
    for (int g = 0; g < DSM_RVQ_MAX_GROUPS; ++g)
      for (int n = 0; n < kMaxRows; ++n) {
        best_d[g][n] = INFINITY;
        best_i[g][n] = INT_MAX;
      }
    for (int g = 0; g < G; ++g) {
      if (!live(g, l)) continue;
      const float* b = book(g, l);
      for (int i = lo + warp; i < hi; i += kWarps) {
        const float* c = b + i * row;
        float acc[kMaxRows] = {};
        for (int d = 2 * lane; d < D; d += 64) {  // rows are 8-byte aligned ((D + 2) * 4 bytes, D even)
          const float2 cv = __ldg(reinterpret_cast<const float2*>(c + d));
#pragma unroll
          for (int n = 0; n < kMaxRows; ++n)
            if (n < N) acc[n] += cv.x * r[(g * N + n) * D + d] + cv.y * r[(g * N + n) * D + d + 1];
        }
        const float norm = __ldg(c + D + 1);
#pragma unroll
        for (int n = 0; n < kMaxRows; ++n) {
          if (n >= N) continue;
          for (int off = 16; off > 0; off >>= 1) acc[n] += __shfl_xor_sync(0xffffffffu, acc[n], off);
          const float dist = norm - 2.f * acc[n];
          if (better(dist, i, best_d[g][n], best_i[g][n])) {
            best_d[g][n] = dist;
            best_i[g][n] = i;
          }
        }
      }
    }
    if (lane == 0)
      for (int j = 0; j < GN; ++j) {
        warp_d[warp * GN + j] = best_d[j / N][j % N];
        warp_i[warp * GN + j] = best_i[j / N][j % N];
      }
    __syncthreads();
    float* pd = part_d + static_cast<int64_t>(l & 1) * DSM_RVQ_MAX_GROUPS * kMaxRows * DSM_RVQ_MAX_BLOCKS;
    int* pi = part_i + static_cast<int64_t>(l & 1) * DSM_RVQ_MAX_GROUPS * kMaxRows * DSM_RVQ_MAX_BLOCKS;
    if (threadIdx.x < GN) {  // the block's best per (group, row), over its warps
      float d = INFINITY;
      int i = INT_MAX;
      for (int w = 0; w < kWarps; ++w)
        if (better(warp_d[w * GN + threadIdx.x], warp_i[w * GN + threadIdx.x], d, i)) {
          d = warp_d[w * GN + threadIdx.x];
          i = warp_i[w * GN + threadIdx.x];
        }
      pd[threadIdx.x * gridDim.x + blockIdx.x] = d;
      pi[threadIdx.x * gridDim.x + blockIdx.x] = i;
    }
    if (l + 1 < a.max_levels)  // the next level's share of the codebooks, into L2 while the grid gathers
      for (int g = 0; g < G; ++g)
        if (live(g, l + 1))
          for (int64_t o = static_cast<int64_t>(threadIdx.x) * 32; o < (hi - lo) * row; o += kThreads * 32)
            dsm::prefetch_l2(book(g, l + 1) + lo * row + o);
    dsm::grid_barrier(a.sync, l + 1);
    // the level's codes: warp j < G N reduces the blocks' partials of (group j / N, row j % N)
    if (warp < GN && live(warp / N, l)) {
      const int g = warp / N, n = warp % N;
      float d = INFINITY;
      int i = INT_MAX;
      for (int p = lane; p < static_cast<int>(gridDim.x); p += 32) {
        const float pdv = __ldcg(pd + warp * gridDim.x + p);
        const int piv = __ldcg(pi + warp * gridDim.x + p);
        if (better(pdv, piv, d, i)) {
          d = pdv;
          i = piv;
        }
      }
      warp_best(d, i);
      const int code = i < K ? i : 0;  // (a NaN residual matches nothing: code 0, as the reference's argmin gives)
      if (blockIdx.x == 0 && lane == 0)
        a.out[(n / a.T) * a.sob + (a.level_ranges[2 * g] + l) * a.sol + (n % a.T) * a.sot] = code;
      const float* c = book(g, l) + code * row;
      for (int e = lane; e < D; e += 32) r[(g * N + n) * D + e] -= __ldg(c + e);
    }
    __syncthreads();
  }
  dsm::grid_exit(a.sync);
}

size_t fixed_smem() {
  return align16((DSM_RVQ_MAX_GROUPS * kMaxRows * DSM_RVQ_MAX_DIM + 2 * kWarps * DSM_RVQ_MAX_GROUPS * kMaxRows) * 4);
}

}  // namespace

extern "C" size_t dsm_rvq_work_bytes(void) {  // sized for the largest launch: DSM_RVQ_MAX_BLOCKS blocks
  return 2 * static_cast<size_t>(2 * DSM_RVQ_MAX_GROUPS * kMaxRows * DSM_RVQ_MAX_BLOCKS) * 4;
}

extern "C" cudaError_t dsm_launch_rvq_encode(const DsmRvqArgs* args, cudaStream_t stream) {
  const DsmRvqArgs& a = *args;
  if (a.N < 1 || a.N > kMaxRows || a.T < 1 || a.N % a.T != 0 || a.D < 2 || a.D % 2 != 0 || a.D > DSM_RVQ_MAX_DIM ||
      a.K < 1 || a.groups < 1 || a.groups > DSM_RVQ_MAX_GROUPS || a.max_levels < 1 || a.blocks < 0 ||
      a.blocks > DSM_RVQ_MAX_BLOCKS)
    return cudaErrorInvalidValue;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const Plan plan = plan_launch(rvq_kernel, a.blocks > 0 ? a.blocks : std::min(sms, DSM_RVQ_MAX_BLOCKS),
                                fixed_smem(), [](int) { return size_t{0}; });
  if (plan.grid == 0) return cudaErrorInvalidValue;
  return dsm::launch_cooperative(rvq_kernel, dim3(plan.grid), dim3(kThreads), plan.smem, stream, a);
}
