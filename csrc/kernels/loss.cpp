// Softmax cross entropy and its gradient in place (the loss half of a fused output head + cross entropy, Liger-Kernel,
// arXiv:2410.10989), compiled once per CPU ISA. Per row, from cache (the caller's chunk of logits fits in it): one pass
// for the max, one for exp(x - max) and its sum, one that scales the exponentials into the gradient. float32 rows keep
// the exponentials in place between the last two passes; 16-bit rows compute them again rather than round them twice.
// Floor: the exp rate (one vector exp per 16 logits, ~1 ulp Cephes), not memory.
#include "kernels/loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/vec/vec.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

// The loss of row x (target t) and x turned into its gradient.
template <typename T>
auto row(T* x, int64_t n, int64_t t, float scale) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  constexpr int W = V::W;
  constexpr bool keep = std::is_same_v<T, A>;  // the exponentials stay in x between passes 2 and 3
  const A xt = ScalarVec<A>::load(x + t).v;
  int64_t i = 0;
  V mv = V::set1(-std::numeric_limits<A>::infinity());
  for (; i + W <= n; i += W) mv = max(mv, V::load(x + i));
  A m = reduce_max(mv, -std::numeric_limits<A>::infinity());
  for (; i < n; ++i) m = std::max(m, ScalarVec<A>::load(x + i).v);
  // max may skip a NaN, the sum below does not: the row's loss and gradient come out NaN, as PyTorch's do.
  VecSum<V> sum;
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    const Vv e = exp_sub(Vv::load(x + j), Vv::set1(m));
    if constexpr (keep) e.store(x + j);
    sum.add(e);
  });
  const A s = sum.total();
  const A c = A(scale) / s;
  for_each_chunk<V>(n, [&](auto v, int64_t j) {
    using Vv = decltype(v);
    Vv e;
    if constexpr (keep) e = Vv::load(x + j);
    else e = exp_sub(Vv::load(x + j), Vv::set1(m));
    (e * Vv::set1(c)).store(x + j);
  });
  ScalarVec<A>{std::exp(xt - m) * c - A(scale)}.store(x + t);  // softmax - 1 at the target, from x[t] unrounded
  return m + std::log(s) - xt;
}

template <typename T>
void run(const CrossEntropyParams& p) {
  using A = typename VecFor<T>::type::value_type;
  A* loss = static_cast<A*>(p.loss);
  parallel_for(0, p.rows, grain_for(3 * p.vocab * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* x = static_cast<T*>(p.logits) + r * p.stride;
      const int64_t t = p.targets[r];
      if (t == p.ignore_index) {
        std::memset(x, 0, sizeof(T) * size_t(p.vocab));  // all-zero bits: +0 in every float format
        loss[r] = A(0);
      } else {
        loss[r] = row(x, p.vocab, t, p.scale);
      }
    }
  });
}

}  // namespace

void cross_entropy_grad_kernel(const CrossEntropyParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run<decltype(t)>(p); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
