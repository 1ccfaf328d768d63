// Device helpers shared by the CUDA kernel families: storage <-> accumulation conversions, 16-byte packs,
// warp/row reductions and the dtype dispatch of the launchers. Torch-free (plain nvcc).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/dtype.h"

namespace llmkern {
namespace cuda {

// Accumulation type: fp32 for fp32/bf16/fp16, fp64 for fp64 (gradcheck), as on the CPU.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

// Round-to-nearest-even, NaN kept NaN: the same rounding as the CPU path (kernels/dtype.h).
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// 16 bytes of T: the widest single load/store a thread can issue (ld.global.v4).
template <typename T> constexpr int kVec = 16 / int(sizeof(T));

// N elements of T loaded or stored as one aligned vector access (N = 1 is the scalar fallback).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// Loads N elements at p (aligned to N elements) into accumulation-type registers.
template <typename T, int N>
__device__ __forceinline__ void load_acc(const T* p, acc_t<T> (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_acc(pk.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_acc(T* p, const acc_t<T> (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp must call it.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the blockDim.x threads of this threadIdx.y row; the result reaches every thread. Every thread of
// the block must call it (it synchronizes when a row spans several warps). red: __shared__ A[32].
template <typename A>
__device__ __forceinline__ A row_sum(A v, A* red) {
  if (blockDim.x <= 32) return group_sum(v, blockDim.x);
  v = group_sum(v, 32);
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  A* mine = red + threadIdx.y * warps;
  if (lane == 0) mine[threadIdx.x >> 5] = v;
  __syncthreads();
  v = group_sum(lane < warps ? mine[lane] : A(0), 32);
  __syncthreads();  // red is reused by the next reduction
  return v;
}

// Host side: is every pointer aligned to 16 bytes and every extent/stride a multiple of n elements?
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}
inline bool multiples_of(int64_t n, std::initializer_list<int64_t> values) {
  for (int64_t v : values)
    if (v % n) return false;
  return true;
}

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with the CUDA storage type of dtype; returns f's cudaError_t.
template <typename F>
cudaError_t visit_cuda_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(Tag<float>{});
    case DType::bf16: return f(Tag<__nv_bfloat16>{});
    case DType::f16: return f(Tag<__half>{});
    case DType::f64: return f(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned next_pow2(int64_t v) {
  unsigned p = 1;
  while (p < v) p <<= 1;
  return p;
}

}  // namespace cuda
}  // namespace llmkern
