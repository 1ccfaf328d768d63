// RMSNorm forward/backward CUDA kernels (math: kernels/norm.h; CPU twin: kernels/norm.cpp).
// A row is handled by blockDim.x threads (a power of two, ~4 packs of 16 bytes each per thread for
// memory-level parallelism); small rows share a block (blockDim.y rows) so blocks stay ~256 threads.
// Both passes over a row re-read it from global memory: the second read hits L1/L2 (a row is a few KB),
// which keeps register use flat for any hidden size.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace llmkern {
namespace cuda {
namespace {

constexpr int kBlockThreads = 256, kMaxThreads = 512;  // 512: ptxas keeps a 128-register budget

// Threads per row (x) and rows per block (y) for rows of `packs` vector accesses.
dim3 row_block(int64_t hidden, int vec) {
  const int64_t packs = (hidden + vec - 1) / vec;
  const unsigned tpr = next_pow2(std::min<int64_t>(kMaxThreads, (packs + 3) / 4));
  return dim3(tpr, std::max(1u, kBlockThreads / tpr));
}

template <typename T, int VEC>
__device__ __forceinline__ void load_scale(const T* weight, bool offset, int i, acc_t<T> (&w)[VEC]) {
  using A = acc_t<T>;
  if (!weight) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] = A(1);
    return;
  }
  load_acc<T, VEC>(weight + i, w);
  if (offset) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) w[k] += A(1);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(const RmsNormParams p) {
  using A = acc_t<T>;
  __shared__ A red[32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;
  const int64_t r = active ? row : 0;  // inactive rows still join the reduction, reading nothing
  const int n = int(p.hidden), step = int(blockDim.x) * VEC;
  const T* src = static_cast<const T*>(p.x) + r * p.x_stride;
  A ss = 0;
  if (active && p.residual) {
    const T* res = static_cast<const T*>(p.residual) + r * p.residual_stride;
    T* sum = static_cast<T*>(p.residual_out) + r * p.residual_out_stride;
    for (int i = threadIdx.x * VEC; i < n; i += step) {
      A a[VEC], b[VEC];
      load_acc<T, VEC>(src + i, a);
      load_acc<T, VEC>(res + i, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        a[k] = to_acc(from_acc<T>(a[k] + b[k]));  // normalize the sum as stored (rounded to T), as vLLM does
        ss += a[k] * a[k];
      }
      store_acc<T, VEC>(sum + i, a);
    }
    src = sum;  // re-read below by the same thread that wrote it, so no fence is needed
  } else if (active) {
    for (int i = threadIdx.x * VEC; i < n; i += step) {
      A a[VEC];
      load_acc<T, VEC>(src + i, a);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += a[k] * a[k];
    }
  }
  const A rstd = A(1) / sqrt(row_sum(ss, red) / A(n) + A(p.eps));
  if (!active) return;
  if (p.rstd && threadIdx.x == 0) static_cast<A*>(p.rstd)[row] = rstd;
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + r * p.out_stride;
  for (int i = threadIdx.x * VEC; i < n; i += step) {
    A a[VEC], w[VEC];
    load_acc<T, VEC>(src + i, a);
    load_scale<T, VEC>(weight, p.weight_offset, i, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = a[k] * rstd * w[k];
    store_acc<T, VEC>(out + i, a);
  }
}

// Row group g (one blockDim.x-thread row of the block) owns rows [g*rows/groups, (g+1)*rows/groups) and,
// with dweight, sums its dw partial over them: in shared memory when it fits (dw_in_smem), else directly
// in its row of the global partial buffer. Without dweight, groups == rows (one row each).
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_kernel(const RmsNormBwdParams p, int64_t groups, int64_t iters, bool dw_in_smem) {
  using A = acc_t<T>;
  __shared__ A red[32];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int n = int(p.hidden), step = int(blockDim.x) * VEC, i0 = threadIdx.x * VEC;
  const int64_t g = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t r0 = g < groups ? g * p.rows / groups : 0, r1 = g < groups ? (g + 1) * p.rows / groups : 0;
  const T* weight = static_cast<const T*>(p.weight);
  A* dw = nullptr;  // a generic pointer: shared or global, the same code either way
  if (p.dweight && g < groups) {
    dw = dw_in_smem ? reinterpret_cast<A*>(smem_raw) + threadIdx.y * int64_t(n)
                    : static_cast<A*>(p.dweight_partial) + g * n;
    for (int i = i0; i < n; i += step)
#pragma unroll
      for (int k = 0; k < VEC; ++k) dw[i + k] = A(0);
  }
  for (int64_t it = 0; it < iters; ++it) {  // the same trip count in every group: row_sum syncs the block
    const int64_t row = r0 + it;
    const bool active = row < r1;
    const int64_t r = active ? row : 0;
    const T* dy = static_cast<const T*>(p.dy) + r * p.dy_stride;
    const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
    A dot = 0;
    for (int i = i0; active && i < n; i += step) {
      A g_[VEC], x_[VEC], w[VEC];
      load_acc<T, VEC>(dy + i, g_);
      load_acc<T, VEC>(x + i, x_);
      load_scale<T, VEC>(weight, p.weight_offset, i, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += g_[k] * w[k] * x_[k];
    }
    dot = row_sum(dot, red);
    if (!active) continue;
    const A rstd = static_cast<const A*>(p.rstd)[row];
    const A c = dot * rstd * rstd * rstd / A(n);
    const T* dres = p.dresidual ? static_cast<const T*>(p.dresidual) + r * p.dresidual_stride : nullptr;
    T* dx = static_cast<T*>(p.dx) + r * p.dx_stride;
    for (int i = i0; i < n; i += step) {
      A g_[VEC], x_[VEC], w[VEC], d[VEC];
      load_acc<T, VEC>(dy + i, g_);
      load_acc<T, VEC>(x + i, x_);
      load_scale<T, VEC>(weight, p.weight_offset, i, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) d[k] = g_[k] * w[k] * rstd - c * x_[k];
      if (dres) {
        A e[VEC];
        load_acc<T, VEC>(dres + i, e);
#pragma unroll
        for (int k = 0; k < VEC; ++k) d[k] += e[k];
      }
      store_acc<T, VEC>(dx + i, d);
      if (dw)
#pragma unroll
        for (int k = 0; k < VEC; ++k) dw[i + k] += g_[k] * x_[k] * rstd;
    }
  }
  if (dw && dw_in_smem) {  // each thread copies the columns it summed: no barrier needed
    A* partial = static_cast<A*>(p.dweight_partial) + g * n;
    for (int i = i0; i < n; i += step)
#pragma unroll
      for (int k = 0; k < VEC; ++k) partial[i + k] = dw[i + k];
  }
}

// dw[c] = sum over b of partial[b][c], in a fixed order (deterministic): blockDim.y slices of b per
// column, then the slices summed in slice order through shared memory.
constexpr int kReduceCols = 32, kReduceSlices = 16;

template <typename T>
__global__ void __launch_bounds__(kReduceCols* kReduceSlices)
    dweight_reduce_kernel(const acc_t<T>* partial, int64_t blocks, int64_t n, T* dweight) {
  using A = acc_t<T>;
  __shared__ A slice[kReduceSlices][kReduceCols];
  const int64_t c = int64_t(blockIdx.x) * kReduceCols + threadIdx.x;
  A s = 0;
  if (c < n)
    for (int64_t b = threadIdx.y; b < blocks; b += kReduceSlices) s += partial[b * n + c];
  slice[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || c >= n) return;
  for (int j = 1; j < kReduceSlices; ++j) s += slice[j][threadIdx.x];
  dweight[c] = from_acc<T>(s);
}

template <typename T, int VEC>
cudaError_t launch_bwd(const RmsNormBwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const dim3 block = row_block(p.hidden, VEC);
  const int64_t groups = p.dweight ? p.blocks : p.rows;
  const int64_t iters = (p.rows + groups - 1) / groups;
  const int64_t grid = (groups + block.y - 1) / block.y;
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  // Shared dw rows up to the 48 KB every architecture grants without opting in.
  const size_t smem = size_t(block.y) * size_t(p.hidden) * sizeof(A);
  const bool dw_in_smem = p.dweight && smem <= 48 * 1024;
  rms_norm_bwd_kernel<T, VEC><<<unsigned(grid), block, dw_in_smem ? smem : 0, stream>>>(p, groups, iters,
                                                                                        dw_in_smem);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !p.dweight) return err;
  const dim3 rblock(kReduceCols, kReduceSlices);
  const unsigned rgrid = unsigned((p.hidden + kReduceCols - 1) / kReduceCols);
  dweight_reduce_kernel<T><<<rgrid, rblock, 0, stream>>>(static_cast<const A*>(p.dweight_partial), p.blocks,
                                                         p.hidden, static_cast<T*>(p.dweight));
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t rms_norm_fwd_cuda(const RmsNormParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (p.rows == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > INT_MAX / 2) return cudaErrorInvalidValue;
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const bool vec = aligned16({p.x, p.residual, p.residual_out, p.weight, p.out}) &&
                     multiples_of(V, {p.hidden, p.x_stride, p.residual_stride, p.residual_out_stride, p.out_stride});
    const dim3 block = row_block(p.hidden, vec ? V : 1);
    const int64_t grid = (p.rows + block.y - 1) / block.y;
    if (grid > INT_MAX) return cudaErrorInvalidValue;
    if (vec)
      rms_norm_fwd_kernel<T, V><<<unsigned(grid), block, 0, stream>>>(p);
    else
      rms_norm_fwd_kernel<T, 1><<<unsigned(grid), block, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t rms_norm_bwd_cuda(const RmsNormBwdParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (p.rows == 0) return cudaSuccess;
  if (p.hidden <= 0 || p.hidden > INT_MAX / 2 || (p.dweight && (p.blocks < 1 || p.blocks > p.rows)))
    return cudaErrorInvalidValue;
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    // dweight_partial rows are hidden apart, so they are aligned when hidden is a multiple of V.
    const bool vec = aligned16({p.dy, p.x, p.weight, p.dresidual, p.dx, p.dweight_partial}) &&
                     multiples_of(V, {p.hidden, p.dy_stride, p.x_stride, p.dresidual_stride, p.dx_stride});
    return vec ? launch_bwd<T, V>(p, stream) : launch_bwd<T, 1>(p, stream);
  });
}

}  // namespace llmkern
