// Dense linear on the CPU, y = x W^T (+ bias), compiled once per ISA. Two forms, chosen by the shape of x (run):
//
// - Few rows (decoding): memory-bound, floor = weight bytes / read bandwidth. Dot products: every weight element is
//   read from memory once per call while up to kMR rows of x (8 over bf16 pairs) ride along. x is converted once
//   to fp32 in paired order (attn::load_row_paired), so bf16 weight rows are read with load_pair (one load and
//   two integer ops per 2W elements, no lane shuffles); kMR x kNR accumulators are reduced across lanes at the
//   end of k. bf16 on avx512bf16 reads x and W as stored and multiplies bf16 pairs (vdpbf16ps) instead.
// - More rows (batched decoding, verification, prefill): compute-bound, floor = 2 m n k / peak FMA rate. The dot
//   form's per-output lane reductions and x reloads cost more than the products here, so the product is turned
//   around: the outer-product GEMM of kernels/outer_gemm.h (shared with the quantized linears), with weight rows
//   converted to fp32 chunk by chunk.
#include "kernels/linear.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/attention_tile.h"
#include "kernels/matmul.h"
#include "kernels/outer_gemm.h"
#include "kernels/parallel.h"
#include "kernels/prefetch.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

constexpr int kMR = 4;                                 // rows of x per block
constexpr int kNR = VecF::W >= 16 ? 4 : 2;             // rows of W per block: kMR * kNR accumulators fit
constexpr int kNT = 16;                                // rows of W per task: a tile reused by every x block
constexpr int kPfRows = 2 * kNR;                       // the first x block prefetches W this many rows ahead

template <typename T>
struct LinearJob {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  static constexpr int W = V::W;
  // bf16 on avx512bf16: x and W rows are read as they are, 32 bf16 a load, and one vdpbf16ps per x row and weight
  // row does two fp32 FMAs' work with no widening (x is not converted: xs is null).
  static constexpr bool kPairs = attn::kPairProducts<T>;

  const LinearParams& p;
  const A* xs;  // x in fp32 (fp64 for T = double), paired order, rows of kp elements
  int64_t kp;
  int k2, kfull;  // paired columns [0, k2), whole vectors [k2, kfull), scalars [kfull, k)

  // y rows [m0, m0 + MR) x columns [n0, n0 + NR).
  template <int MR, int NR>
  void block(int64_t m0, int64_t n0) const {
    const T* w[NR];
    for (int c = 0; c < NR; ++c) w[c] = static_cast<const T*>(p.w) + (n0 + c) * p.w_stride;
    // Short weight rows (a few hundred elements) end before the hardware prefetchers ramp up on them: the dot form
    // read 10 GB/s from memory at k = 320 against 24 GB/s at k = 4096 (Zen 4). So the first x block prefetches
    // the same columns kPfRows rows ahead, into L2.
    const char* ahead = m0 == 0 && n0 + kPfRows + NR <= p.n
                            ? reinterpret_cast<const char*>(w[0] + kPfRows * p.w_stride) : nullptr;
    const auto prefetch_ahead = [&](int64_t e, int64_t elems) {
      if (ahead)
        for (int c = 0; c < NR; ++c)
          prefetch_l2_span(ahead + (c * p.w_stride + e) * int64_t(sizeof(T)), elems * int64_t(sizeof(T)));
    };
    A out[MR * NR];
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (kPairs) pair_sums<MR, NR>(m0, w, prefetch_ahead, out);
    else
#endif
      sums<MR, NR>(m0, w, prefetch_ahead, out);
    for (int r = 0; r < MR; ++r) {
      T* y = static_cast<T*>(p.y) + (m0 + r) * p.y_stride + n0;
      for (int c = 0; c < NR; ++c) {
        A v = out[r * NR + c];
        if (p.bias) v += ScalarVec<A>::load(static_cast<const T*>(p.bias) + n0 + c).v;
        ScalarVec<A>{v}.store(y + c);
      }
    }
  }

  // out[r * NR + c] = x row m0 + r . W row c, in fp32 FMAs over the converted x.
  template <int MR, int NR, typename Prefetch>
  void sums(int64_t m0, const T* const* w, Prefetch&& prefetch_ahead, A* out) const {
    const int64_t k = p.k;
    const A* x[MR];
    for (int r = 0; r < MR; ++r) x[r] = xs + (m0 + r) * kp;
    V acc[MR * NR];
    for (int i = 0; i < MR * NR; ++i) acc[i] = V::zero();
    for (int e = 0; e < k2; e += 2 * W) {
      prefetch_ahead(e, 2 * W);
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
    reduce_add_each<MR * NR>(acc, out);
    for (int64_t e = kfull; e < k; ++e)
      for (int c = 0; c < NR; ++c) {
        const A wv = ScalarVec<A>::load(w[c] + e).v;
        for (int r = 0; r < MR; ++r) out[r * NR + c] += x[r][e] * wv;
      }
  }

#if defined(LLMKERN_ISA_AVX512BF16)
  // sums over bf16 pairs: x and W rows as stored, the last partial 32 columns through masked loads (zeros beyond k).
  template <int MR, int NR, typename Prefetch>
  void pair_sums(int64_t m0, const T* const* w, Prefetch&& prefetch_ahead, A* out) const {
    const int64_t k = p.k;
    const T* x[MR];
    for (int r = 0; r < MR; ++r) x[r] = static_cast<const T*>(p.x) + (m0 + r) * p.x_stride;
    V acc[MR * NR];
#pragma GCC unroll 32
    for (int i = 0; i < MR * NR; ++i) acc[i] = V::zero();
    for (int64_t e = 0; e < k; e += 32) {  // one body for whole and partial steps: GCC inlines it, acc stays in zmm
      const bool whole = e + 32 <= k;
      const __mmask32 in = whole ? ~__mmask32(0) : Bf16x32::first(int(k - e));
      if (whole) prefetch_ahead(e, 32);
      Bf16x32 wv[NR];
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c) wv[c] = Bf16x32::load(w[c] + e, in);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const Bf16x32 xv = Bf16x32::load(x[r] + e, in);
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c) acc[r * NR + c] = dot_pairs(acc[r * NR + c], xv, wv[c]);
      }
    }
    V lanes[MR * NR];  // a copy for the reduction: acc's address never escapes, so acc stays in registers
#pragma GCC unroll 32
    for (int i = 0; i < MR * NR; ++i) lanes[i] = acc[i];
    reduce_add_each<MR * NR>(lanes, out);
  }
#endif

  // Rows of W per block for MR rows of x: MR x NR accumulators (at most 24 of the 32 zmm) and one weight vector
  // per row of W (pairs; 7 x 2 measured faster than 7 x 3).
  template <int MR>
  static constexpr int nr_for() {
    return MR <= kMR ? kNR : MR <= 6 ? 4 : MR == 8 ? 3 : 2;
  }

  // Weight rows [n0, n1) against x rows [m0, m0 + MR).
  template <int MR>
  void rows(int64_t m0, int64_t n0, int64_t n1) const {
    constexpr int NR = nr_for<MR>();
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) block<MR, NR>(m0, n);
    for (; n < n1; ++n) block<MR, 1>(m0, n);
  }

  void tile(int64_t n0, int64_t n1) const {
    // 5 to 8 rows of bf16 pairs (verifying 4 to 7 draft tokens, a small batch) as one block, narrower in W: each
    // weight element is loaded once, not once for the first 4 rows and again for the rest. demo-target's linears
    // at 5 / 6 / 7 / 8 rows: 1.08x / 1.10x / 1.11x / 1.06x faster on 2 threads, 1.08-1.15x on one (Zen 4).
    if constexpr (kPairs) switch (p.m) {
      case 5: return rows<5>(0, n0, n1);
      case 6: return rows<6>(0, n0, n1);
      case 7: return rows<7>(0, n0, n1);
      case 8: return rows<8>(0, n0, n1);
      default: break;
    }
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
void run_dot(const LinearGroup& g) {
  using Job = LinearJob<T>;
  using V = typename Job::V;
  using A = typename Job::A;
  const LinearParams& p = g.parts[0];  // x, m, k: the group's
  const int64_t kp = attn::padded<V>(int(p.k));
  attn::Scratch<A> xs(Job::kPairs ? 1 : size_t(p.m * kp));
  if (!Job::kPairs)
    parallel_for(0, p.m, grain_for(p.k * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        attn::load_row_paired<V>(static_cast<const T*>(p.x) + r * p.x_stride, int(p.k), A(1), xs.ptr + r * kp, int(kp));
    });
  std::vector<Job> jobs;
  for (int i = 0; i < g.count; ++i)
    jobs.push_back(Job{g.parts[i], xs.ptr, kp, attn::paired<V>(int(p.k)), int(p.k / V::W * V::W)});
  const outer::PartTiles tiles(g.count, kNT, [&](int i) { return g.parts[i].n; });
  parallel_for(0, tiles.total(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int i = tiles.part(t);
      const int64_t n0 = (t - tiles.first[i]) * kNT;
      jobs[i].tile(n0, std::min(g.parts[i].n, n0 + kNT));
    }
  });
}

// Outer form (kernels/outer_gemm.h): weight rows converted to fp32 chunk by chunk, x^T in natural column order;
// or, for bf16 with pair products (E = attn::Bf16Pair, k even), bf16 rows as they are (adjacent elements are the
// pairs). fp32 rows, and bf16 rows as pairs, are read in place where outer::in_place allows, else copied to the
// scratch. Chunks of at most 512 columns: 256 measured slower on long rows, 1024 on short ones (a 100 KB scratch
// instead of 50 KB).
constexpr int64_t kOuterChunk = 512;

template <typename T, typename E = float>
void run_outer(const LinearGroup& g) {
  constexpr bool pairs = !std::is_same_v<E, float>;
  const LinearParams& px = g.parts[0];  // x, m, k: the group's
  const outer::Panels pn(px.m, px.k, outer::kPer<E>);
  attn::Scratch<E> xt(size_t(pn.size()));
  outer::transpose_x(static_cast<const T*>(px.x), px.x_stride, pn, xt.ptr, [](int64_t pos) { return pos; });
  const auto decode = [&](int i, int64_t r, int64_t c0, int64_t c1, E* dst) {
    const LinearParams& p = g.parts[i];
    const T* w = static_cast<const T*>(p.w) + r * p.w_stride;
    if (dst) {  // else the rows are read in place: only the prefetches below
      if constexpr (pairs) std::memcpy(dst, w + c0, sizeof(T) * (c1 - c0));
      else attn::load_row<VecF>(w + c0, int(c1 - c0), 1.f, dst, int(c1 - c0));
    }
    // The next row's chunk (the next tile's first row after the last), then this row's next chunk: short runs of
    // many rows are missed by the hardware prefetchers.
    if (r + 1 < p.n) prefetch_l1_span(w + p.w_stride + c0, (c1 - c0) * int64_t(sizeof(T)));
    prefetch_l1_span(w + c1, (std::min(p.k, c1 + kOuterChunk) - c1) * int64_t(sizeof(T)));
  };
  const auto store = [&](int i, int64_t n0, int64_t rows, int64_t r0, int64_t nr, const float* c, int64_t ldc) {
    const LinearParams& p = g.parts[i];
    outer::store_rows(static_cast<T*>(p.y), p.y_stride, n0, rows, r0, nr, c, ldc, nullptr,
                      static_cast<const T*>(p.bias));
  };
  // W's rows as the product's elements: fp32 rows, bf16 rows whose stride keeps the pairs.
  std::vector<outer::Direct<E>> direct(size_t(g.count));
  std::vector<int64_t> n(size_t(g.count));
  for (int i = 0; i < g.count; ++i) {
    const LinearParams& p = g.parts[i];
    n[i] = p.n;
    if constexpr (pairs) {
      if (p.w_stride % 2 == 0) direct[i] = {reinterpret_cast<const E*>(p.w), p.w_stride / 2};
    } else if constexpr (std::is_same_v<T, float>) {
      direct[i] = {static_cast<const float*>(p.w), p.w_stride};
    }
  }
  outer::gemm_parts<kOuterChunk>(g.count, n.data(), pn, xt.ptr, decode, store, direct.data());
}

// Whether the outer form beats the dot form for m rows of x and k columns: the dot form pays a lane reduction per
// output, amortized over k, while the outer form pays for x rows padded to whole vectors. In fp32 FMAs (fp32, fp16,
// bf16 without pair products) from 32 rows, or from 16 when rows are short. Measured (bench/RESULTS.md): 1.30x the
// dot form at 16 x 8192 x 320, 1.63x at 512 x 864 x 320, 1.18x at 64 x 4096 x 4096; the dot form was faster at
// 20 x 1024 x 1024 and 16 x 4096 x 2048. Over bf16 pairs (avx512bf16, k even: x and W read as stored, one vdpbf16ps
// per two FMAs) the dot form keeps up with the outer one to 128 rows at k >= 864 (Zen 4, dot time / outer time at
// 16 / 32 / 64 / 128 rows, n x k: 0.64 / 0.77 / 1.11 / 1.16 at 4096 x 4096, 0.66 / 0.68 / 0.68 / 0.82 at 512 x 2048,
// 0.83 / 0.94 / 0.97 / 1.02 at 320 x 864), while short rows favour the outer form from 16 (1.09 / 1.35 / 1.39 / 1.45
// at 864 x 320, 1.26 / 1.44 / 1.51 / 1.53 at 8192 x 320). Where 512-bit products run at full width (Zen 5, twice Zen
// 4's rate) the outer form wins from 64 rows at k > 512 (dot / outer at 32 / 64 / 96 rows, weights from memory:
// 2048 x 2048 1.09 / 1.25 / 1.18, 8192 x 2048 1.07 / 1.33 / 1.25, 2048 x 8192 0.99 / 1.28 / 1.24, 4864 x 896 1.75 /
// 1.58 / 1.46, 4096 x 11008 1.41 at 32 and 1.46 at 64; a Llama-1B-shaped layer at 64 rows ~1.29x), except on narrow
// outputs such as 512 x 2048 (0.91 from memory, 0.78 in cache at 64 rows).
template <typename T>
bool outer_form(int64_t m, int64_t k) {
  if constexpr (attn::kPairProducts<T>)
    if (k % 2 == 0) return k <= 512 ? m >= 16 : m >= (avx512_double_pumped() ? 128 : 64);
  return !std::is_same_v<T, double> && (m >= 32 || (m >= 16 && k <= 512));  // fp64 (gradcheck): the dot form
}

// fp32 over many rows and few columns (training's linears: 8192 token rows, 320-864 columns): y = x W^T through the
// fp32 matmul (kernels/matmul.cpp) with W^T transposed once a call, so every product writes whole vectors of y rows,
// which the outer form (weight rows broadcast against x^T) stores one element at a time. Zen 4, 2 threads, one process
// alternating both (matmul / outer GFLOP/s): 8192 x 320 x 320 180 / 138, 1024 x 320 x 864 189 / 159, 256 x 320 x 320
// 187 / 170, 256 x 864 x 320 179 / 181; wide outputs stay outer (256 x 8192 x 320 133 / 160, 256 x 2048 x 2048 152 /
// 182: their W^T copy and B strips cost more than the stores).
constexpr int64_t kMatmulRows = 256, kMatmulMaxCols = 1024;

void run_matmul(const LinearParams& p) {
  const int64_t ldw = attn::padded<VecF>(int(p.n));  // W^T's rows, zero-padded to whole vectors
  attn::Scratch<float> wt(size_t(p.k * ldw));
  const float* w = static_cast<const float*>(p.w);
  constexpr int64_t kRowsPerTask = 4 * VecF::W;
  parallel_for(0, (p.n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kRowsPerTask, r1 = std::min(p.n, b1 * kRowsPerTask);
    attn::transpose_tile<VecF>(w + r0 * p.w_stride, p.w_stride, int(r1 - r0), int(p.k), wt.ptr + r0, ldw);
  });
  MatmulParams mp;
  mp.m = p.m, mp.n = p.n, mp.k = p.k;
  mp.a = static_cast<const float*>(p.x), mp.a_rs = p.x_stride, mp.a_ks = 1;
  mp.b = wt.ptr, mp.ldb = ldw;
  mp.c = static_cast<float*>(p.y), mp.ldc = p.y_stride;
  LLMKERN_ISA::matmul_kernel(mp);  // this ISA's, not the dispatching entry
  if (const float* bias = static_cast<const float*>(p.bias))
    parallel_for(0, p.m, grain_for(p.n * int64_t(sizeof(float))), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* y = mp.c + r * p.y_stride;
        for_each_chunk<VecF>(p.n, [&](auto v, int64_t i) {
          using Vv = decltype(v);
          (Vv::load(y + i) + Vv::load(bias + i)).store(y + i);
        });
      }
    });
}

#if defined(LLMKERN_ISA_AMX)
// bf16 on the tiles (the amx build): y^T = W x^T, W's rows read in place as A tiles (16 rows x 32 columns), x^T as
// B tiles of column pairs packed once a call (zero columns past m), C^T tiles of 32 weight rows x up to 64 of x's
// rows transposed into y. For k a multiple of 32 (whole tiles along k); weight tiles of an odd row stride (pairs
// split across rows) or fewer than 16 rows are copied out first. One linear alone
// (Emerald Rapids, 2 threads, one process alternating; the vdpbf16ps forms' time / the tiles'): 8192 x 2048 1.05x /
// 1.10x / 1.87x / 3.42x / 8.04x / 4.7x / 3.6x / 1.0x at 1 / 4 / 8 / 16 / 64 / 128 / 512 / 1024 rows, 864 x 320 1.33x /
// 1.54x / 1.95x / 2.74x / 2.80x at 1-64; oneDNN's bf16 GEMM (torch) is as fast at 128 rows and 1.6-1.9x faster from
// 512 (ops/linear.py routes those to torch).
constexpr int64_t kTileCols = 64;  // rows of x per product
// From this many rows. Below, the dot form wins: a decode step's small linears (demo-target, one sequence) ran 1.27x
// slower in all on the tiles (per-call costs: x^T's packing, scratch, the tile configuration; 16 columns of tile
// products for one row of x), and 1.06-1.16x slower at 2 rows; at 3, level. From 4 the tiles win, as the dot form's
// 4-row blocks and the 5-8-row ones (narrower in W) cost more µops per weight byte. One process alternating, 2
// threads, the dot form's time / the tiles': whole decoder steps of demo-target / demo-draft at 4 / 5 / 6 rows
// 1.05-1.33 / 1.40-1.51 / 1.60-1.65 and 1.23-1.26 / 1.36-1.39 / 1.47-1.49 (a verification step of 4 draft tokens
// then costs ~1.1x a 1-row step, not ~2x); single linears from memory at 4 / 5 / 6 / 7 rows: 4096 x 4096 1.13 / 1.36
// / 1.52 / 1.90, 11008 x 4096 1.06 / 1.21 / 1.41 / 1.76, 4096 x 11008 1.11 / 1.29 / 1.36 / 1.70.
constexpr int64_t kTileMinRows = 4;
// ... and to this many: every 32-row task streams all of x^T (from memory once it outgrows the caches), so at 1024
// rows the tiles only matched the outer form.
constexpr int64_t kTileMaxRows = 512;

// Depends only on x's shape, so every part of a group takes the path its own call would.
bool tiles_fit(const LinearGroup& g) {
  const LinearParams& p = g.parts[0];
  return p.k % 32 == 0 && p.m >= kTileMinRows && p.m <= kTileMaxRows;
}

void run_tiles(const LinearGroup& g) {
  using U = uint32_t;
  const LinearParams& px = g.parts[0];
  const int64_t m = px.m, k = px.k, mp = (m + 15) / 16 * 16, kh = k / 2;
  attn::Scratch<U> xt(size_t(kh * mp));
  outer::pack_xt_shared(static_cast<const bf16*>(px.x), m, px.x_stride, k, xt.ptr);
  constexpr int64_t kRows = 32;  // weight rows per task
  static_assert(kRows <= outer::kStoreRows);
  const outer::PartTiles tiles(g.count, kRows, [&](int i) { return g.parts[i].n; });
  parallel_for(0, tiles.total(), 1, [&](int64_t t0, int64_t t1) {
    tmul::TileScope scope;
    attn::Scratch<float> ct(size_t(kRows * kTileCols));
    attn::Scratch<bf16> tail(size_t(kRows * k));  // a last partial tile's rows, zero-padded (not read past W)
    for (int64_t t = t0; t < t1; ++t) {
      const int i = tiles.part(t);
      const LinearParams& p = g.parts[i];
      const int64_t n0 = (t - tiles.first[i]) * kRows, rows = std::min(kRows, p.n - n0);
      const bf16* w = static_cast<const bf16*>(p.w) + n0 * p.w_stride;
      int64_t ldw = p.w_stride;
      if (rows % 16 != 0 || ldw % 2 != 0) {
        const int64_t r16 = (rows + 15) / 16 * 16;
        for (int64_t r = 0; r < r16; ++r)
          if (r < rows) std::memcpy(tail.ptr + r * k, w + r * p.w_stride, sizeof(bf16) * size_t(k));
          else std::memset(tail.ptr + r * k, 0, sizeof(bf16) * size_t(k));
        w = tail.ptr, ldw = k;
      }
      for (int64_t c0 = 0; c0 < mp; c0 += kTileCols) {
        const int64_t cols = std::min(kTileCols, mp - c0);
        tmul::gemm(int((rows + 15) / 16 * 16), int(cols), int(kh), reinterpret_cast<const U*>(w), ldw / 2,
                   xt.ptr + c0, mp, ct.ptr, cols, false);
        outer::store_rows(static_cast<bf16*>(p.y), p.y_stride, n0, rows, c0, std::min(m, c0 + cols) - c0, ct.ptr,
                          cols, nullptr, static_cast<const bf16*>(p.bias));
      }
    }
  });
}
#endif

// The dot or the outer form for every part.
template <typename T>
void run_forms(const LinearGroup& g) {
  const LinearParams& p = g.parts[0];
#if defined(LLMKERN_ISA_AMX)
  if constexpr (std::is_same_v<T, bf16>)
    if (tiles_fit(g)) return run_tiles(g);
#endif
  if (!outer_form<T>(p.m, p.k)) return run_dot<T>(g);
  if constexpr (attn::kPairProducts<T>)
    if (p.k % 2 == 0) return run_outer<T, attn::Bf16Pair>(g);
  if constexpr (!std::is_same_v<T, double>) run_outer<T>(g);
}

// k = 0 never gets here (ops/linear.h writes the bias). Each part takes the path its own linear call would, so a
// group's outputs have the bits of separate calls.
template <typename T>
void run(const LinearGroup& g) {
  if constexpr (std::is_same_v<T, float>)
    if (g.parts[0].m >= kMatmulRows) {
      std::vector<LinearParams> rest;
      for (int i = 0; i < g.count; ++i) {
        if (g.parts[i].n <= kMatmulMaxCols) run_matmul(g.parts[i]);
        else rest.push_back(g.parts[i]);
      }
      if (!rest.empty()) run_forms<T>({rest.data(), int(rest.size())});
      return;
    }
  run_forms<T>(g);
}

}  // namespace

void linear_kernel(const LinearGroup& g) {
  if (g.count > 0) visit_dtype(g.parts[0].dtype, [&](auto t) { run<decltype(t)>(g); });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
