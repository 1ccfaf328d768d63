// Gated activation (SwiGLU / GeGLU) forward/backward cores, compiled once per CPU ISA (see cpu/vec/vec.h).
// Elementwise and memory-bound: one pass, floor = (read gate + up [+ dy] + write out [dgate + dup]) /
// bandwidth. Both activations are g * sigmoid(z(g)), so one core serves both, with z known at compile time.
#include "kernels/activation.h"

#include <algorithm>
#include <type_traits>
#include <utility>

#include "cpu/vec/vec.h"
#include "kernels/parallel.h"
#include "kernels/prefetch.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

template <Activation A> using ActTag = std::integral_constant<Activation, A>;

// Whether storage type T on vector Vv takes the fast path: 16-bit outputs on AVX-512, whose rounding swamps
// exp2_fast's error. The exp is what makes bf16 compute-bound on AVX-512 (one FMA port on some of these cores);
// float32 keeps the ~1 ulp Cephes exp.
template <typename T, typename Vv>
constexpr bool kFast =
#if defined(LLMKERN_ISA_AVX512)
    std::is_same_v<Vv, VecAvx512> && sizeof(T) == 2;
#else
    false;
#endif

// exp(-z), the exp in every sigmoid here.
template <typename T, typename Vv>
inline Vv exp_neg(Vv z) {
#if defined(LLMKERN_ISA_AVX512)
  if constexpr (kFast<T, Vv>) return exp2_fast(z * Vv::set1(-1.44269504088896341f));
#endif
  return exp(Vv::zero() - z);
}

// 1 / (1 + exp(-z)): for z << 0, exp overflows to inf and sigmoid is exactly 0 (not NaN), so
// act(g) = g * sigmoid(z) goes to -0 smoothly; the tanh form 0.5 g (1 + tanh u) cancels there instead.
template <typename T, typename Vv>
inline Vv sigmoid(Vv z) {
  const Vv one = Vv::set1(1);
  return one / (one + exp_neg<T>(z));
}

// gelu_tanh constants: c = sqrt(2/pi), a = 0.044715; 0.5 (1 + tanh(u)) = sigmoid(2u) with u = c (g + a g^3).
constexpr double kC2 = 2 * 0.7978845608028654;  // 2c
constexpr double kC2A = kC2 * 0.044715;         // 2ca

// The sigmoid argument z(g): act(g) = g * sigmoid(z(g)).
template <Activation A, typename Vv>
inline Vv sig_arg(Vv g) {
  using S = typename Vv::value_type;
  if constexpr (A == Activation::silu) return g;
  else return g * fmadd(g * g, Vv::set1(S(kC2A)), Vv::set1(S(kC2)));  // 2c (g + a g^3)
}

// dz/dg for gelu_tanh (1 for silu).
template <typename Vv>
inline Vv gelu_arg_grad(Vv g) {
  using S = typename Vv::value_type;
  return fmadd(g * g, Vv::set1(S(3 * kC2A)), Vv::set1(S(kC2)));  // 2c (1 + 3a g^2)
}

// Splits [rows, d] into (row, column-chunk) tasks so that a few long rows (1-token decode) still spread
// over the threads, and calls fn(task, next) for each, next being the thread's following task (n = 0 if
// none). Chunks start at multiples of kChunk, so only a row's last chunk has a scalar tail.
constexpr int64_t kChunk = 1024;

struct Task {
  int64_t r, c0, n;  // row, first column, columns
};

template <typename Fn>
void for_each_task(int64_t rows, int64_t d, int64_t bytes_per_col, Fn&& fn) {
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  const int64_t grain = grain_for(std::min(d, kChunk) * bytes_per_col);
  const auto task = [&](int64_t t) {
    const int64_t r = t / chunks, c0 = (t % chunks) * kChunk;
    return Task{r, c0, std::min(kChunk, d - c0)};
  };
  parallel_for(0, rows * chunks, grain, [&](int64_t t0, int64_t t1) {
    for (Task cur = task(t0), next; t0 < t1; cur = next) {
      next = ++t0 < t1 ? task(t0) : Task{0, 0, 0};
      fn(cur, next);
    }
  });
}

// Element (r, c) of a [rows, d] operand with row stride `stride`.
template <typename T, typename Ptr>
inline auto at(Ptr base, int64_t stride, int64_t r, int64_t c) {
  using Elem = std::conditional_t<std::is_const_v<std::remove_pointer_t<Ptr>>, const T, T>;
  return static_cast<Elem*>(base) + r * stride + c;
}

// The next task's pieces of N inputs, prefetched into L1 a line at a time by line(i), called for each vector i of
// the current task (all of them unless the current piece is a row's shorter last): the pieces are a few KB each,
// too short for the hardware prefetcher to ramp up on. silu_and_mul 4096 x 22016, side by side: 1.14-1.20x in
// bf16, 1.21-1.24x in fp32.
template <typename T, int N>
struct NextInputs {
  const T* in[N];
  int64_t bytes;  // of each piece
  void line(int64_t i) const {
    for (const T* p : in) prefetch_l1_along(p, bytes, i);
  }
};

template <typename T, typename... Ops>
NextInputs<T, sizeof...(Ops)> next_inputs(const Task& next, const Ops&... ops) {
  return {{at<T>(ops.first, ops.second, next.r, next.c0)...}, next.n * int64_t(sizeof(T))};
}

template <typename T, Activation A>
void fwd(const ActMulParams& p) {
  using V = typename VecFor<T>::type;
  for_each_task(p.rows, p.d, 3 * sizeof(T), [&](Task task, Task next) {
    const auto [r, c0, n] = task;
    const T* gate = at<T>(p.gate, p.gate_stride, r, c0);
    const T* up = at<T>(p.up, p.up_stride, r, c0);
    T* out = at<T>(p.out, p.out_stride, r, c0);
    const auto ahead = next_inputs<T>(next, std::pair{p.gate, p.gate_stride}, std::pair{p.up, p.up_stride});
    for_each_chunk<V>(n, [&](auto v, int64_t i) {
      using Vv = decltype(v);
      ahead.line(i);
      Vv g = Vv::load(gate + i);
      (g * sigmoid<T>(sig_arg<A>(g)) * Vv::load(up + i)).store(out + i);
    });
  });
}

// act'(g) = s + g s (1 - s) z'(g) with s = sigmoid(z(g)); z' = 1 for silu.
template <typename T, Activation A>
void bwd(const ActMulBwdParams& p) {
  using V = typename VecFor<T>::type;
  for_each_task(p.rows, p.d, 5 * sizeof(T), [&](Task task, Task next) {
    const auto [r, c0, n] = task;
    const T* dy = at<T>(p.dy, p.dy_stride, r, c0);
    const T* gate = at<T>(p.gate, p.gate_stride, r, c0);
    const T* up = at<T>(p.up, p.up_stride, r, c0);
    T* dgate = at<T>(p.dgate, p.dgate_stride, r, c0);
    T* dup = at<T>(p.dup, p.dup_stride, r, c0);
    const auto ahead = next_inputs<T>(next, std::pair{p.dy, p.dy_stride}, std::pair{p.gate, p.gate_stride},
                                      std::pair{p.up, p.up_stride});
    for_each_chunk<V>(n, [&](auto v, int64_t i) {
      using Vv = decltype(v);
      ahead.line(i);
      Vv g = Vv::load(gate + i), gy = Vv::load(dy + i);
      // 1 - s as e / (1 + e) = e s, e = exp(-z): 1 - s would cancel where s ~ 1 (it is below float's ulp
      // of 1 from g ~ 17 for silu, ~5 for gelu_tanh), costing act' its relative accuracy there. Where e
      // overflows (s = 0) e s is inf * 0 = NaN, and min (which returns its second operand for NaN) gives
      // the limit 1 instead. The float32 / float64 paths keep 1 / (1 + 1 / e): two more divisions, but
      // no min in the scalar vector, and they are memory-bound anyway.
      const Vv one = Vv::set1(1), e = exp_neg<T>(sig_arg<A>(g));
      Vv s = one / (one + e), sm;
      if constexpr (kFast<T, Vv>) sm = min(e * s, one);
      else sm = one / (one + one / e);
      Vv gs = g * s;  // act(g)
      Vv t = gs * sm;
      if constexpr (A != Activation::silu) t = t * gelu_arg_grad(g);
      (gy * Vv::load(up + i) * (s + t)).store(dgate + i);
      (gy * gs).store(dup + i);
    });
  });
}

// Calls fn(T{}, ActTag<A>{}) for the params' dtype and activation.
template <typename P, typename Fn>
void visit(const P& p, Fn&& fn) {
  visit_dtype(p.dtype, [&](auto t) {
    if (p.act == Activation::silu) fn(t, ActTag<Activation::silu>{});
    else fn(t, ActTag<Activation::gelu_tanh>{});
  });
}

}  // namespace

void act_mul_fwd_kernel(const ActMulParams& p) {
  visit(p, [&](auto t, auto a) { fwd<decltype(t), decltype(a)::value>(p); });
}

void act_mul_bwd_kernel(const ActMulBwdParams& p) {
  visit(p, [&](auto t, auto a) { bwd<decltype(t), decltype(a)::value>(p); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
