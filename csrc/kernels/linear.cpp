// Dense linear on the CPU, y = x W^T (+ bias), compiled once per ISA. Two forms, chosen by the shape of x (run):
//
// - Few rows (decoding): memory-bound, floor = weight bytes / read bandwidth. Dot products: every
//   weight element is read from memory once per call while up to kMR rows of x ride along. x is converted once
//   to fp32 in paired order (attn::load_row_paired), so bf16 weight rows are read with load_pair (one load and
//   two integer ops per 2W elements, no lane shuffles); kMR x kNR accumulators are reduced across lanes at the
//   end of k.
// - More rows (batched decoding, verification, prefill): compute-bound, floor = 2 m n k / peak FMA rate. The dot
//   form's per-output lane reductions and x reloads cost more than the products here, so the product is turned
//   around: y^T = W x^T, with vectors along the rows of x. Each task converts a tile of kNTile weight rows by kKc
//   columns to fp32 once (sequentially, no transpose) and broadcasts its elements (an FMA operand straight from
//   memory) against vectors of x^T, packed once per call; every weight element then feeds one FMA per vector of
//   16 rows of x, with no reductions at all.
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
void run_dot(const LinearParams& p) {
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


// ---------------------------------------------------------------------------------------------------------
// Outer-product form: y^T[n][r] = sum_k W[n][k] x^T[k][r], rows of x in vectors.

// Accumulators per block (registers: 32 on AVX-512, 16 on AVX2, plus one x^T vector and the broadcast).
constexpr int kAcc = VecF::W >= 16 ? 24 : 12;
constexpr int kNTile = 24;  // weight rows per task: a multiple of every block height kAcc / nvec below
constexpr int kKc = 256;    // weight columns converted at a time: a kNTile x kKc fp32 tile stays in L1
constexpr int kWs = kKc + 16;  // its row stride: rows 1 KB apart would share 4 of L1's 64 sets
constexpr int kMaxVecs = 4; // vectors of x rows per block (kMaxVecs * W rows of x per x^T panel)

// c[MR][NV * W] (+)= w[MR][kdim] x^T[kdim][NV * W]. The weight tile's row stride is the constant kWs, so the MR
// broadcast operands are one pointer plus constant offsets (MR pointers would not fit in the integer registers).
template <typename V, int MR, int NV, bool ACC>
static inline void outer_block(int kdim, const typename V::value_type* w, const typename V::value_type* xt,
                               int64_t ldx, typename V::value_type* c, int64_t ldc) {
  constexpr int W = V::W;
  V acc[MR][NV];  // registers only if every loop over r and j is unrolled (GCC leaves MR = 24 rolled, in memory)
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = ACC ? V::load(c + r * ldc + j * W) : V::zero();
  for (int k = 0; k < kdim; ++k, xt += ldx) {
    V xv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) xv[j] = V::load(xt + j * W);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const V wr = V::set1(w[r * kWs + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = fmadd(wr, xv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j].store(c + r * ldc + j * W);
}

// The last rows < MR of a tile as one block of that height.
template <typename V, int NV, bool ACC, int MR>
static inline void outer_rest(int rows, int kdim, const typename V::value_type* w, const typename V::value_type* xt,
                              int64_t ldx, typename V::value_type* c, int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) return outer_block<V, MR, NV, ACC>(kdim, w, xt, ldx, c, ldc);
    outer_rest<V, NV, ACC, MR - 1>(rows, kdim, w, xt, ldx, c, ldc);
  }
}

// c[rows][NV * W] (+)= w[rows][kdim] x^T[kdim][NV * W] (w rows kWs apart), blocks of kAcc / NV weight rows.
template <typename V, int NV, bool ACC>
static void outer_tile(int rows, int kdim, const typename V::value_type* w, const typename V::value_type* xt,
                       int64_t ldx, typename V::value_type* c, int64_t ldc) {
  constexpr int MR = std::max(1, kAcc / NV);
  int r = 0;
  for (; r + MR <= rows; r += MR) outer_block<V, MR, NV, ACC>(kdim, w + r * kWs, xt, ldx, c + r * ldc, ldc);
  if (r < rows) outer_rest<V, NV, ACC, MR - 1>(rows - r, kdim, w + r * kWs, xt, ldx, c + r * ldc, ldc);
}

template <typename V, bool ACC>
static void outer_tile(int nvec, int rows, int kdim, const typename V::value_type* w,
                       const typename V::value_type* xt, int64_t ldx, typename V::value_type* c, int64_t ldc) {
  switch (nvec) {
    case 1: return outer_tile<V, 1, ACC>(rows, kdim, w, xt, ldx, c, ldc);
    case 2: return outer_tile<V, 2, ACC>(rows, kdim, w, xt, ldx, c, ldc);
    case 3: return outer_tile<V, 3, ACC>(rows, kdim, w, xt, ldx, c, ldc);
    default: return outer_tile<V, kMaxVecs, ACC>(rows, kdim, w, xt, ldx, c, ldc);
  }
}

template <typename T>
void run_outer(const LinearParams& p) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  constexpr int W = V::W;
  // x^T in panels of up to kMaxVecs * W rows of x: panel b holds rows [b * pw, b * pw + pw) as xt[b][k][pw],
  // zero past m (their results are never stored).
  const int64_t pw = std::min<int64_t>(attn::padded<V>(int(p.m)), kMaxVecs * W);
  const int64_t panels = (p.m + pw - 1) / pw;
  attn::Scratch<A> xt(size_t(panels * p.k * pw));
  parallel_for(0, panels, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      A* panel = xt.ptr + b * p.k * pw;
      const int64_t r0 = b * pw, nr = std::min(pw, p.m - r0);
      for (int64_t r = 0; r < nr; ++r) {
        const T* x = static_cast<const T*>(p.x) + (r0 + r) * p.x_stride;
        for (int64_t e = 0; e < p.k; ++e) panel[e * pw + r] = ScalarVec<A>::load(x + e).v;
      }
      for (int64_t e = 0; e < p.k; ++e)
        for (int64_t r = nr; r < pw; ++r) panel[e * pw + r] = A(0);
    }
  });
  // Tasks: (weight tile, x panel), panels inner, so one thread's consecutive tasks reuse the tile from cache.
  const int64_t tiles = (p.n + kNTile - 1) / kNTile;
  parallel_for(0, tiles * panels, 1, [&](int64_t t0, int64_t t1) {
    attn::Scratch<A> wf(size_t(kNTile) * kWs), ct(size_t(kNTile) * pw);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t / panels * kNTile, b = t % panels, r0 = b * pw;
      const int rows = int(std::min<int64_t>(kNTile, p.n - n0));
      const int nvec = int((std::min(pw, p.m - r0) + W - 1) / W);
      const A* panel = xt.ptr + b * p.k * pw;
      for (int64_t k0 = 0; k0 < p.k; k0 += kKc) {
        const int kc = int(std::min<int64_t>(kKc, p.k - k0));
        for (int r = 0; r < rows; ++r) {
          const T* wr = static_cast<const T*>(p.w) + (n0 + r) * p.w_stride + k0;
          attn::load_row<V>(wr, kc, A(1), wf.ptr + r * kWs, kc);
          // The row's next chunk: kKc-column pieces of many rows are too short for the hardware prefetcher.
          const char* next = reinterpret_cast<const char*>(wr + kc);
          const int64_t bytes = std::min<int64_t>(kKc, p.k - k0 - kc) * int64_t(sizeof(T));
          for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(next + off);
        }
        if (k0 == 0) outer_tile<V, false>(nvec, rows, kc, wf.ptr, panel, pw, ct.ptr, pw);
        else outer_tile<V, true>(nvec, rows, kc, wf.ptr, panel + k0 * pw, pw, ct.ptr, pw);
      }
      // ct[n][r] -> y[r0 + r][n0 + n] (+ bias).
      for (int64_t r = 0; r < std::min(pw, p.m - r0); ++r) {
        T* y = static_cast<T*>(p.y) + (r0 + r) * p.y_stride + n0;
        for (int n = 0; n < rows; ++n) {
          A v = ct.ptr[n * pw + r];
          if (p.bias) v += ScalarVec<A>::load(static_cast<const T*>(p.bias) + n0 + n).v;
          ScalarVec<A>{v}.store(y + n);
        }
      }
    }
  });
}

// The outer form from 32 rows of x, or from 16 when rows are short: the dot form pays a lane reduction per output,
// amortized over k, while the outer form pays for x rows padded to whole vectors (measured with bench_quant's dense
// rows and the demo models' shapes: e.g. 16 x 8192 x 320 1.37x, 64 x 4096 x 4096 1.18x faster than the dot form;
// 20 x 1024 x 1024 0.75x, 16 x 4096 x 2048 0.90x).
template <typename T>
void run(const LinearParams& p) {
  if (p.m >= 32 || (p.m >= 16 && p.k <= 512)) return run_outer<T>(p);
  run_dot<T>(p);
}

}  // namespace

void linear_kernel(const LinearParams& p) {
  visit_dtype(p.dtype, [&](auto t) { run<decltype(t)>(p); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
