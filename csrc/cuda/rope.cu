// Rotary position embedding CUDA kernel (math: kernels/rope.h). One block per token: the token's cos/sin
// row is read once per head from L1, and the threads walk (head, pack of pairs) items.
// A position outside [0, max_position) is not read from the cache: the token's dst rows become NaN
// (the caller cannot reject it up front without a device sync; NaN makes the error visible downstream).
#include <climits>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace llmkern {
namespace cuda {
namespace {

constexpr int kRopeThreads = 128;

template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000ll); }

// N elements (a multiple of VEC) as N/VEC vector accesses.
template <typename T, int VEC, int N>
__device__ __forceinline__ void load_n(const T* p, acc_t<T> (&out)[N]) {
#pragma unroll
  for (int c = 0; c < N / VEC; ++c) {
    acc_t<T> v[VEC];
    load_acc<T, VEC>(p + c * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[c * VEC + k] = v[k];
  }
}

template <typename T, int VEC, int N>
__device__ __forceinline__ void store_n(T* p, const acc_t<T> (&in)[N]) {
#pragma unroll
  for (int c = 0; c < N / VEC; ++c) {
    acc_t<T> v[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = in[c * VEC + k];
    store_acc<T, VEC>(p + c * VEC, v);
  }
}

// NeoX: an item is VEC pairs (j + k, half + j + k). GPT-J: an item is N/2 adjacent pairs (2i, 2i + 1).
template <typename T, int VEC, bool NEOX>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
  using A = acc_t<T>;
  constexpr int N = NEOX ? VEC : (VEC < 2 ? 2 : VEC);
  const int64_t t = blockIdx.x;
  const int heads = int(p.heads), hd = int(p.head_dim), rd = int(p.rotary_dim), half = rd / 2;
  const T* src = static_cast<const T*>(p.src) + t * p.src_token_stride;
  T* dst = static_cast<T*>(p.dst) + t * p.dst_token_stride;
  const int64_t pos = p.positions[t];
  if (pos < 0 || pos >= p.max_position) {
    const T nan = from_acc<T>(quiet_nan<A>());
    for (int e = threadIdx.x; e < heads * hd; e += blockDim.x) dst[(e / hd) * p.dst_head_stride + e % hd] = nan;
    return;
  }
  const float* cos = p.cos_sin_cache + pos * rd;
  const float* sin = cos + half;
  const A sign = p.inverse ? A(-1) : A(1);  // the inverse rotation (the backward) is the transpose
  // Items [0, rotated) rotate pairs; out of place, items [rotated, total) copy the features past
  // rotary_dim unchanged (VEC divides hd - rd when VEC > 1). One loop: fewer live values than two.
  const int per_head = (NEOX ? half : rd) / N, rest = (hd - rd) / VEC;
  const int rotated = heads * per_head, total = rotated + (src == dst ? 0 : heads * rest);
  for (int it = threadIdx.x; it < total; it += blockDim.x) {
    if (it >= rotated) {
      const int h = (it - rotated) / rest, j = rd + (it - rotated) % rest * VEC;
      *reinterpret_cast<Pack<T, VEC>*>(dst + h * p.dst_head_stride + j) =
          *reinterpret_cast<const Pack<T, VEC>*>(src + h * p.src_head_stride + j);
      continue;
    }
    const int h = it / per_head, j = (it % per_head) * N;
    const T* s = src + h * p.src_head_stride;
    T* d = dst + h * p.dst_head_stride;
    if constexpr (NEOX) {
      A a[N], b[N];
      load_n<T, VEC, N>(s + j, a);
      load_n<T, VEC, N>(s + half + j, b);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A c = __ldg(cos + j + k), sn = sign * A(__ldg(sin + j + k)), a0 = a[k];
        a[k] = a0 * c - b[k] * sn;
        b[k] = b[k] * c + a0 * sn;
      }
      store_n<T, VEC, N>(d + j, a);
      store_n<T, VEC, N>(d + half + j, b);
    } else {
      A v[N];
      load_n<T, VEC, N>(s + j, v);
#pragma unroll
      for (int q = 0; q < N / 2; ++q) {
        const A c = __ldg(cos + j / 2 + q), sn = sign * A(__ldg(sin + j / 2 + q)), x0 = v[2 * q];
        v[2 * q] = x0 * c - v[2 * q + 1] * sn;
        v[2 * q + 1] = v[2 * q + 1] * c + x0 * sn;
      }
      store_n<T, VEC, N>(d + j, v);
    }
  }
}

template <typename T, int VEC>
cudaError_t launch(const RopeParams& p, cudaStream_t stream) {
  if (p.is_neox)
    rope_kernel<T, VEC, true><<<unsigned(p.tokens), kRopeThreads, 0, stream>>>(p);
  else
    rope_kernel<T, VEC, false><<<unsigned(p.tokens), kRopeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t rope_cuda(const RopeParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (p.tokens == 0 || p.heads == 0) return cudaSuccess;
  if (p.tokens > INT_MAX || p.heads * p.head_dim > INT_MAX || p.rotary_dim <= 0 || p.rotary_dim % 2 ||
      p.rotary_dim > p.head_dim)
    return cudaErrorInvalidValue;
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const int64_t rotated = p.is_neox ? p.rotary_dim / 2 : p.rotary_dim;  // must hold whole packs
    const bool vec = aligned16({p.src, p.dst}) &&
                     multiples_of(V, {rotated, p.head_dim, p.src_token_stride, p.src_head_stride,
                                      p.dst_token_stride, p.dst_head_stride});
    return vec ? launch<T, V>(p, stream) : launch<T, 1>(p, stream);
  });
}

}  // namespace llmkern
