// Gated activations (SwiGLU / GeGLU) forward/backward CUDA kernels (math: kernels/activation.h).
// Element-wise over [rows, d]: threadIdx.x/blockIdx.y walk 16-byte packs along d, threadIdx.y/blockIdx.x
// walk rows, so rows of any stride (the two halves of a packed [rows, 2d] input too) stay coalesced.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace llmkern {
namespace cuda {
namespace {

// act(x) = x * s with s = sigmoid(z(x)); act'(x) = s + x s (1 - s) z'(x). z = x for silu; gelu_tanh is
// the same function as 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2/pi), with z = 2u: one exp,
// no tanh. 1 - s is computed as e s (e = exp(-z)), not as 1 - s, which cancels where s ~ 1 (from x ~ 17 for
// silu, ~5 for gelu_tanh) and costs act' its relative accuracy there; where e overflows (s = 0), e s is
// inf * 0 = NaN and fmin gives the limit 1.
template <Activation ACT, typename A>
__device__ __forceinline__ A act_fn(A x, A* grad) {
  constexpr A c2 = A(1.5957691216057308), k = A(0.044715);  // 2 sqrt(2/pi)
  const A x2 = x * x;
  const A z = ACT == Activation::silu ? x : c2 * x * (A(1) + k * x2);
  const A e = exp(-z), s = A(1) / (A(1) + e);  // e -> inf gives s = 0, never NaN
  if (grad) {
    const A dz = ACT == Activation::silu ? A(1) : c2 * (A(1) + A(3) * k * x2);
    *grad = s + x * s * fmin(e * s, A(1)) * dz;
  }
  return x * s;
}

// Iterates (row, column) over this thread's packs of a [rows, d] problem.
#define FOR_EACH_PACK(rows, d, VEC)                                                                  \
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < (rows);                 \
       row += int64_t(gridDim.x) * blockDim.y)                                                      \
    for (int64_t i = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * (VEC); i < (d);             \
         i += int64_t(gridDim.y) * blockDim.x * (VEC))

template <typename T, int VEC, Activation ACT>
__global__ void __launch_bounds__(256) act_mul_fwd_kernel(const ActMulParams p) {
  using A = acc_t<T>;
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  FOR_EACH_PACK(p.rows, p.d, VEC) {
    A g[VEC], u[VEC];
    load_acc<T, VEC>(gate + row * p.gate_stride + i, g);
    load_acc<T, VEC>(up + row * p.up_stride + i, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = act_fn<ACT, A>(g[k], nullptr) * u[k];
    store_acc<T, VEC>(out + row * p.out_stride + i, g);
  }
}

template <typename T, int VEC, Activation ACT>
__global__ void __launch_bounds__(256) act_mul_bwd_kernel(const ActMulBwdParams p) {
  using A = acc_t<T>;
  const T* dy = static_cast<const T*>(p.dy);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  FOR_EACH_PACK(p.rows, p.d, VEC) {
    A g[VEC], u[VEC], dy_[VEC], dg[VEC], du[VEC];
    load_acc<T, VEC>(dy + row * p.dy_stride + i, dy_);
    load_acc<T, VEC>(gate + row * p.gate_stride + i, g);
    load_acc<T, VEC>(up + row * p.up_stride + i, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      A da;
      const A a = act_fn<ACT, A>(g[k], &da);
      dg[k] = dy_[k] * u[k] * da;
      du[k] = dy_[k] * a;
    }
    store_acc<T, VEC>(dgate + row * p.dgate_stride + i, dg);
    store_acc<T, VEC>(dup + row * p.dup_stride + i, du);
  }
}

#undef FOR_EACH_PACK

// Up to 256 threads: x along d (packs), y along rows; grid x over rows, y over column tiles.
void grid_for(int64_t rows, int64_t d, int vec, dim3& grid, dim3& block) {
  const int64_t packs = (d + vec - 1) / vec;
  const unsigned bx = next_pow2(std::min<int64_t>(256, packs));
  block = dim3(bx, 256 / bx);
  grid = dim3(unsigned(std::min<int64_t>(INT_MAX, (rows + block.y - 1) / block.y)),
              unsigned(std::min<int64_t>(65535, (packs + bx - 1) / bx)));
}

// Launches kernel<T, VEC, ACT> for the activation named at run time.
template <typename T, int VEC, typename Params, typename F>
cudaError_t launch(const Params& p, cudaStream_t stream, F kernel_for) {
  dim3 grid, block;
  grid_for(p.rows, p.d, VEC, grid, block);
  switch (p.act) {
    case Activation::silu: kernel_for(std::integral_constant<Activation, Activation::silu>{})<<<grid, block, 0, stream>>>(p); break;
    case Activation::gelu_tanh: kernel_for(std::integral_constant<Activation, Activation::gelu_tanh>{})<<<grid, block, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t act_mul_fwd_cuda(const ActMulParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const bool vec = aligned16({p.gate, p.up, p.out}) && multiples_of(V, {p.d, p.gate_stride, p.up_stride, p.out_stride});
    return vec ? launch<T, V>(p, stream, [](auto a) { return act_mul_fwd_kernel<T, V, decltype(a)::value>; })
               : launch<T, 1>(p, stream, [](auto a) { return act_mul_fwd_kernel<T, 1, decltype(a)::value>; });
  });
}

cudaError_t act_mul_bwd_cuda(const ActMulBwdParams& p, cudaStream_t stream) {
  using namespace cuda;
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  return visit_cuda_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const bool vec = aligned16({p.dy, p.gate, p.up, p.dgate, p.dup}) &&
                     multiples_of(V, {p.d, p.dy_stride, p.gate_stride, p.up_stride, p.dgate_stride, p.dup_stride});
    return vec ? launch<T, V>(p, stream, [](auto a) { return act_mul_bwd_kernel<T, V, decltype(a)::value>; })
               : launch<T, 1>(p, stream, [](auto a) { return act_mul_bwd_kernel<T, 1, decltype(a)::value>; });
  });
}

}  // namespace llmkern
