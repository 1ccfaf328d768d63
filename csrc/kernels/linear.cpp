// Dense linear on the CPU, y = x W^T (+ bias), compiled once per ISA. Made for the memory-bound case of
// decoding (few rows of x against a large bf16 weight): every weight element is read from memory once per
// call while up to kMR rows of x ride along, so the floor is the weight bytes / read bandwidth. More rows of x
// reuse each tile of kNT weight rows from the cache (a plain register-blocked product, not a tuned GEMM).
//
// x is converted once per call to fp32 in paired order (attn::load_row_paired): bf16 weight rows are then
// read with load_pair, one load and two integer ops per 2W elements, and no lane shuffles. Each block is
// kMR rows of x by kNR rows of W, kMR * kNR vector accumulators reduced across lanes at the end of k.
#include "kernels/linear.h"

#include <algorithm>

#include "kernels/attention_tile.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

constexpr int kMR = 4;                                 // rows of x per block
constexpr int kNR = VecF::W >= 16 ? 4 : 2;             // rows of W per block: kMR * kNR accumulators fit
constexpr int kNT = 16;                                // rows of W per task: a tile reused by every x block

template <typename T>
struct LinearJob {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  static constexpr int W = V::W;

  const LinearParams& p;
  const A* xs;  // x in fp32 (fp64 for T = double), paired order, rows of kp elements
  int64_t kp;
  int k2, kfull;  // paired columns [0, k2), whole vectors [k2, kfull), scalars [kfull, k)

  // y rows [m0, m0 + MR) x columns [n0, n0 + NR).
  template <int MR, int NR>
  void block(int64_t m0, int64_t n0) const {
    const int64_t k = p.k;
    const T* w[NR];
    for (int c = 0; c < NR; ++c) w[c] = static_cast<const T*>(p.w) + (n0 + c) * p.w_stride;
    const A* x[MR];
    for (int r = 0; r < MR; ++r) x[r] = xs + (m0 + r) * kp;
    V acc[MR * NR];
    for (int i = 0; i < MR * NR; ++i) acc[i] = V::zero();
    for (int e = 0; e < k2; e += 2 * W) {
      V wa[NR], wb[NR];
      for (int c = 0; c < NR; ++c) load_pair(w[c] + e, wa[c], wb[c]);
      for (int r = 0; r < MR; ++r) {
        const V xa = V::load(x[r] + e), xb = V::load(x[r] + e + W);
        for (int c = 0; c < NR; ++c) acc[r * NR + c] = fmadd(xb, wb[c], fmadd(xa, wa[c], acc[r * NR + c]));
      }
    }
    for (int e = k2; e < kfull; e += W) {
      V wv[NR];
      for (int c = 0; c < NR; ++c) wv[c] = V::load(w[c] + e);
      for (int r = 0; r < MR; ++r) {
        const V xv = V::load(x[r] + e);
        for (int c = 0; c < NR; ++c) acc[r * NR + c] = fmadd(xv, wv[c], acc[r * NR + c]);
      }
    }
    A out[MR * NR];
    reduce_add_each<MR * NR>(acc, out);
    for (int64_t e = kfull; e < k; ++e)
      for (int c = 0; c < NR; ++c) {
        const A wv = ScalarVec<A>::load(w[c] + e).v;
        for (int r = 0; r < MR; ++r) out[r * NR + c] += x[r][e] * wv;
      }
    for (int r = 0; r < MR; ++r) {
      T* y = static_cast<T*>(p.y) + (m0 + r) * p.y_stride + n0;
      for (int c = 0; c < NR; ++c) {
        A v = out[r * NR + c];
        if (p.bias) v += ScalarVec<A>::load(static_cast<const T*>(p.bias) + n0 + c).v;
        ScalarVec<A>{v}.store(y + c);
      }
    }
  }

  // Weight rows [n0, n1) against x rows [m0, m0 + MR).
  template <int MR>
  void rows(int64_t m0, int64_t n0, int64_t n1) const {
    int64_t n = n0;
    for (; n + kNR <= n1; n += kNR) block<MR, kNR>(m0, n);
    for (; n < n1; ++n) block<MR, 1>(m0, n);
  }

  void tile(int64_t n0, int64_t n1) const {
    int64_t m = 0;
    for (; m + kMR <= p.m; m += kMR) rows<kMR>(m, n0, n1);
    switch (p.m - m) {
      case 3: return rows<3>(m, n0, n1);
      case 2: return rows<2>(m, n0, n1);
      case 1: return rows<1>(m, n0, n1);
      default: return;
    }
  }
};

template <typename T>
void run(const LinearParams& p) {
  using Job = LinearJob<T>;
  using V = typename Job::V;
  using A = typename Job::A;
  const int64_t kp = attn::padded<V>(int(p.k));
  attn::Scratch<A> xs(size_t(p.m * kp));
  parallel_for(0, p.m, grain_for(p.k * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      attn::load_row_paired<V>(static_cast<const T*>(p.x) + r * p.x_stride, int(p.k), A(1), xs.ptr + r * kp, int(kp));
  });
  const Job job{p, xs.ptr, kp, attn::paired<V>(int(p.k)), int(p.k / V::W * V::W)};
  const int64_t tiles = (p.n + kNT - 1) / kNT;
  parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) job.tile(t * kNT, std::min(p.n, (t + 1) * kNT));
  });
}

}  // namespace

void linear_kernel(const LinearParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run<decltype(t)>(p); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
