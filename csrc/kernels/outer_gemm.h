// The outer-product GEMM of the CPU linears for many rows of x (dense: linear.cpp; quantized: quant_gemm.cpp),
// compiled into each ISA's translation units (everything here is in LLMKERN_ISA, see cpu/vec/vec.h).
//
// y[m][n] = sum_k W[n][k] x[m][k] as C = A B with A = rows of W in fp32 (k contiguous) and B = x transposed:
// each weight element is broadcast (an FMA operand straight from memory) against vectors of x rows, so
// converting or decoding W to fp32 is paid once per panel of up to 64 rows of x and amortized over them, W never
// needs a transpose, and no lane is ever reduced. Compute-bound: floor = 2 m n k / peak FMA rate.
//
// x^T is stored in panels of up to kPanel rows of x, panel p = xt[p][k][pw] (pw = the panel width, whole
// vectors, zero rows beyond m). Work: parallel over (tile of kTileRows rows of W, panel), panels inner so a
// thread's consecutive tasks find the tile's weights in cache. Per task and chunk of at most Chunk columns, the
// caller's decode writes the tile's rows to an fp32 scratch (L2 resident), then a register-blocked product (MR
// rows of W x NR vectors of x rows) accumulates into an fp32 [kTileRows][pw] block, which the caller's store
// turns into output elements. Weights already in the product's element type (fp32, or bf16 rows as bf16 pairs) can
// be read in place instead (Direct), where that does not crowd L1 (in_place).
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "cpu/vec/vec.h"
#include "kernels/attention_tile.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace outer {

using V = VecF;
constexpr int L = V::W;

// Elements of A (decoded W) and B (x^T): fp32, or bf16 pairs (attn::Bf16Pair, where attn::kPairProducts holds:
// one vdpbf16ps per two FMAs), two adjacent columns of k per element; kPer is the columns per element.
template <typename E>
constexpr int kPer = std::is_same_v<E, float> ? 1 : 2;

// Chunk: the most columns decoded per pass, the caller's choice (a template parameter of gemm: it sizes the decode
// scratch, whose row stride is the constant kLda<Chunk>). Each output is a sum of fp32 chains of at most Chunk products
// (blocked summation, as BLAS does) instead of one chain of k, whose rounding error grows with k (3.5x PyTorch's at
// k = 1100). The scratch's row stride is Chunk + 16 floats: rows a multiple of 1 KB apart would share a few of L1's
// 64 sets, and a block's MR broadcast rows would evict each other.
template <int64_t Chunk>
constexpr int64_t kLda = Chunk + 16;

constexpr int64_t kTileRows = 24;  // rows of W per task (a multiple of every MR below)
constexpr int kPanelVecs = 4;      // vectors of x rows per panel: the widest block
constexpr int kPanel = kPanelVecs * L;

// MR per NR: MR * NR accumulators, leaving registers (32 on AVX-512, 16 on AVX2) for the B vectors and a broadcast
// (AVX2's 4-vector block leaves one short: its B loads become FMA memory operands).
// One vector of x rows (16-row batches) takes 12 rows of W, not 24: their 24 row addresses did not fit the 16
// general registers (spilled to the stack), and 12 ran 2-4% faster at M = 16 (bf16 pairs, fp32, fp16, int4; Zen 4).
#if defined(LLMKERN_ISA_AVX512)
template <int NR> constexpr int kMRFor = NR <= 2 ? 12 : NR == 3 ? 8 : 6;
#elif defined(LLMKERN_ISA_AVX2)
template <int NR> constexpr int kMRFor = NR == 1 ? 12 : NR == 2 ? 6 : NR == 3 ? 4 : 3;
#else
template <int NR> constexpr int kMRFor = 4;
#endif

// C[r][j] (+)= sum_k a[r * lda + k] * b[k * ldb + j] for MR rows and NR vectors (ACC: add to C). The loops over r
// and j must unroll for acc to live in registers (GCC leaves MR = 24 rolled, in memory, without the pragmas).
template <int MR, int NR, bool ACC, typename E>
static inline void kblock(int kdim, const E* a, int64_t lda, const E* b, int64_t ldb, float* c, int64_t ldc) {
  using Op = attn::Operands<V, E>;
  V acc[MR][NR];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[r][j] = V::zero();
  for (int k = 0; k < kdim; ++k, b += ldb) {
    decltype(Op::load_b(b)) bv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) bv[j] = Op::load_b(b + j * L);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const auto ar = Op::splat(a[r * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[r][j] = Op::madd(ar, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      float* cp = c + r * ldc + j * L;
      (ACC ? V::load(cp) + acc[r][j] : acc[r][j]).store(cp);  // a chunk's sum added to C, not C's chain continued
    }
}

template <int NR, bool ACC, int MR, typename E>
static inline void krest(int rows, int kdim, const E* a, int64_t lda, const E* b, int64_t ldb, float* c, int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) return kblock<MR, NR, ACC>(kdim, a, lda, b, ldb, c, ldc);
    krest<NR, ACC, MR - 1>(rows, kdim, a, lda, b, ldb, c, ldc);
  }
}

// C[m][NR * L] (+)= A[m][kdim] B[kdim][NR * L]: blocks of MR rows, the rest as one shorter block.
template <int NR, bool ACC, typename E>
static void kstrip(int m, int kdim, const E* a, int64_t lda, const E* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int MR = kMRFor<NR>;
  int r = 0;
  for (; r + MR <= m; r += MR) kblock<MR, NR, ACC>(kdim, a + r * lda, lda, b, ldb, c + r * ldc, ldc);
  if (r < m) krest<NR, ACC, MR - 1>(m - r, kdim, a + r * lda, lda, b, ldb, c + r * ldc, ldc);
}

// One panel: C[m][nvec * L] (+)= A[m][kdim] B[kdim][nvec * L], nvec <= kPanelVecs.
template <bool ACC, typename E>
static void kgemm(int m, int nvec, int kdim, const E* a, int64_t lda, const E* b, int64_t ldb, float* c, int64_t ldc) {
  switch (nvec) {
    case 1: return kstrip<1, ACC>(m, kdim, a, lda, b, ldb, c, ldc);
    case 2: return kstrip<2, ACC>(m, kdim, a, lda, b, ldb, c, ldc);
    case 3: return kstrip<3, ACC>(m, kdim, a, lda, b, ldb, c, ldc);
    default: return kstrip<kPanelVecs, ACC>(m, kdim, a, lda, b, ldb, c, ldc);
  }
}

// Weights the product can read in place: rows of elements E, lda elements apart.
template <typename E>
struct Direct {
  const E* w = nullptr;  // null: every chunk goes through decode
  int64_t lda = 0;
};

// Whether a task with nvec vectors of x rows reads Direct rows in place rather than through the scratch: the MR rows of
// a block must not pile up in L1 sets beyond its 8 ways. Rows 4 KB apart all share one set: with 24 of them (nvec = 1)
// the product ran 1.7x slower than copying the rows, with 12 1.2x slower (fp32, 1024 and 2048 columns); at most 8 rows
// a set, in place ran 1.05-1.3x faster than copying, bf16 pairs and fp32, 16-256 rows of x (Zen 4).
template <typename E>
static bool in_place(const Direct<E>& d, int nvec) {
  if (!d.w) return false;
  const int mr = nvec == 1 ? kMRFor<1> : nvec == 2 ? kMRFor<2> : nvec == 3 ? kMRFor<3> : kMRFor<4>;
  const int64_t sets = 4096 / std::gcd<int64_t>(d.lda * int64_t(sizeof(E)), 4096);  // L1 sets a block's rows share
  return mr <= 8 * sets;
}

// The panels of x^T for m rows and k columns, ke = k / per elements (per: columns per element, kPer).
struct Panels {
  int64_t m, k, ke, width, count;
  Panels(int64_t m_, int64_t k_, int per = 1)
      : m(m_), k(k_), ke(k_ / per), width(std::min<int64_t>((m_ + L - 1) / L * L, kPanel)),
        count((m_ + width - 1) / width) {}
  int64_t size() const { return count * ke * width; }
  int64_t rows(int64_t p) const { return std::min(width, m - p * width); }
};

#if defined(LLMKERN_ISA_AVX512BF16)
// transpose_x for bf16 pairs: panel p = xt + p * ke * width holds the pair (x[.][2i], x[.][2i + 1]) of each of
// its rows at xt[i][r] (k even), zero beyond the panel's rows; natural column order (col is not used). 16 pairs of 16
// rows at a time, as one 16 x 16 transpose of 32-bit lanes (a pair at a time, it took ~15 us of a 16-row int4 call
// at k = 4096, a third of its fixed cost). One panel runs on the calling thread.
template <typename Col>
static void transpose_x(const bf16* x, int64_t x_stride, const Panels& pn, attn::Bf16Pair* xt, Col&&) {
  const auto panel = [&](int64_t p) {
    const int64_t nr = pn.rows(p);
    const bf16* xp = x + p * pn.width * x_stride;
    float* out = reinterpret_cast<float*>(xt + p * pn.ke * pn.width);
    for (int64_t r0 = 0; r0 < pn.width; r0 += L)
      for (int64_t i0 = 0; i0 < pn.ke; i0 += L) {
        const int64_t ni = std::min<int64_t>(L, pn.ke - i0);
        const __mmask16 mask = __mmask16((1u << ni) - 1);
        VecF v[L];
        for (int j = 0; j < L; ++j)  // row r0 + j's pairs i0.. as 32-bit lanes
          v[j] = r0 + j < nr ? VecF{_mm512_maskz_loadu_ps(mask, xp + (r0 + j) * x_stride + 2 * i0)} : VecF::zero();
        transpose(v);  // v[i]: pair i0 + i of rows r0..
        for (int64_t i = 0; i < ni; ++i) v[i].store(out + (i0 + i) * pn.width + r0);
      }
  };
  if (pn.count == 1) return panel(0);
  parallel_for(0, pn.count, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) panel(p);
  });
}
#endif

// x^T: panel p = xt + p * k * width holds xt[pos][r] = x[p * width + r][col(pos)] in fp32 for pos < k, zero beyond
// the panel's rows. col maps a position of the decode order to a column of x; it is called for runs of 2L
// positions starting at multiples of 2L.
template <typename T, typename Col>
static void transpose_x(const T* x, int64_t x_stride, const Panels& pn, float* xt, Col&& col) {
  const int64_t ce = 2 * L, units = (pn.k + ce - 1) / ce;
  parallel_for(0, pn.count * units, grain_for(ce * pn.width * 4), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u / units, c0 = u % units * ce, nr = pn.rows(p);
      const T* xp = x + p * pn.width * x_stride;
      for (int64_t pos = c0; pos < std::min(pn.k, c0 + ce); ++pos) {
        float* dst = xt + (p * pn.k + pos) * pn.width;
        const int64_t e = col(pos);
        for (int64_t r = 0; r < nr; ++r) dst[r] = to_float(xp[r * x_stride + e]);
        for (int64_t r = nr; r < pn.width; ++r) dst[r] = 0.f;
      }
    }
  });
}


// Most rows of W a store_rows call takes: this GEMM's tiles, and the AMX tiles' 32 (linear.cpp, quant_gemm.cpp).
constexpr int64_t kStoreRows = 32;
static_assert(kTileRows <= kStoreRows);

// The usual store: out[r0 + i][n0 + j] = c[j * ldc + i] * scale[j] + bias[n0 + j] rounded to T (out rows ld apart;
// scale: the tile's rows, or null for 1; bias: the whole vector, or null), output row by output row: rows of a wide
// output are a multiple of 4 KB apart, so a column of them falls in one L1 set. rows <= kStoreRows.
template <typename T>
static void store_rows(T* out, int64_t ld, int64_t n0, int64_t rows, int64_t r0, int64_t nr, const float* c,
                       int64_t ldc, const float* scale, const T* bias) {
  alignas(64) float s[kStoreRows], b[kStoreRows];
  for (int64_t j = 0; j < rows; ++j) s[j] = scale ? scale[j] : 1.f, b[j] = bias ? to_float(bias[n0 + j]) : 0.f;
  const auto one = [&](int64_t i, int64_t j) {
    ScalarVec<float>{c[j * ldc + i] * s[j] + b[j]}.store(out + (r0 + i) * ld + n0 + j);
  };
  int64_t i0 = 0;
  if constexpr (VecF::W > 1 && !std::is_same_v<T, double>) {
    // W x W blocks of c transposed in registers, one vector store per output row instead of W scalar ones: the same
    // bits; a 16-row bf16 linear on the tiles (Emerald Rapids, one process alternating) 1.12x at 320 -> 1728 and
    // 320 -> 8192, 1.03-1.08x at 864 -> 320 and 320 -> 448 (the scalar stores cost more than the tile products there).
    constexpr int W = VecF::W;
    const int64_t jw = rows / W * W;
    const auto block = [&](int64_t j0) {
      VecF r[W];
      for (int j = 0; j < W; ++j) r[j] = VecF::load(c + (j0 + j) * ldc + i0);
      transpose(r);  // r[i]: output row r0 + i0 + i, columns n0 + j0 + [0, W)
      const VecF sv = VecF::load(s + j0), bv = VecF::load(b + j0);
      for (int i = 0; i < W; ++i) (r[i] * sv + bv).store(out + (r0 + i0 + i) * ld + n0 + j0);
    };
    for (; i0 + W <= nr; i0 += W) {
      for (int64_t j0 = 0; j0 < jw; j0 += W) block(j0);
      // The columns past the last whole block (a 24-row tile's last 8) as one more block ending at `rows`: its first
      // columns are stored a second time, with the same bits. One element at a time, they were a third of a 16-row
      // tile's stores (the 8192 x 320 head at 16 rows: store_rows 13% of the call).
      if (jw < rows && rows >= W) block(rows - W);
      else
        for (int64_t i = i0; i < i0 + W; ++i)
          for (int64_t j = jw; j < rows; ++j) one(i, j);
    }
  }
  for (int64_t i = i0; i < nr; ++i)
    for (int64_t j = 0; j < rows; ++j) one(i, j);
}

#if defined(LLMKERN_ISA_AMX)
// The AMX tiles' x^T (tmul::pack_xt) packed by all threads, 16 KB of x a task: one thread packing it alone left the
// others idle (the dense linear, 2 threads, one process alternating, serial time / shared at 128 / 397 / 512 rows:
// 1.05-1.09 / 1.05-1.09 / 1.09-1.14 at 320 x 320 and 448 x 320, 1.07 / 1.16-1.17 / 1.15-1.17 at 320 x 864, 0.95-1.05
// at 1728 x 320 and 8192 x 320; the quantized linears at 64 rows, 4096 x 4096 and 4096 x 11008: 0.99-1.01).
static inline void pack_xt_shared(const bf16* x, int64_t m, int64_t x_stride, int64_t k, uint32_t* xt) {
  parallel_for(0, (m + 15) / 16, grain_for(16 * k * int64_t(sizeof(bf16)), 16 * 1024), [&](int64_t g0, int64_t g1) {
    tmul::pack_xt(x, m, x_stride, k, xt, g0, g1);
  });
}
#endif

// Tiles of several weights (parts) in one index space, for one parallel region over all of them: part i's tiles are
// [first[i], first[i + 1]), each of at most tile_rows rows, none straddling two parts.
struct PartTiles {
  std::vector<int64_t> first;
  template <typename RowsOf>
  PartTiles(int parts, int64_t tile_rows, RowsOf&& rows_of) : first(size_t(parts) + 1, 0) {
    for (int i = 0; i < parts; ++i) first[i + 1] = first[i] + (rows_of(i) + tile_rows - 1) / tile_rows;
  }
  int64_t total() const { return first.back(); }
  int part(int64_t t) const { return int(std::upper_bound(first.begin() + 1, first.end(), t) - first.begin()) - 1; }
};

// C = A B over all rows of several weights W_i (parts sharing x: a layer's q, k, v projections) in one parallel
// region, at most Chunk columns at a time (a multiple of 2L): decode(i, row, c0, c1, dst) writes W_i[row][c0, c1)
// (decode order) to dst as elements E; store(i, n0, rows, r0, nr, c, ldc) takes a task's results: c[j * ldc + i]
// is output row r0 + i (i < nr), column n0 + j (j < rows) of part i, e.g. through store_rows. n[i]: part i's rows;
// direct: each part's rows to read in place, or null. xt holds pn.size() elements E (transpose_x; for bf16 pairs
// with pn built for 2 columns per element). Tasks that read direct rows in place (in_place) call decode with a
// null dst, for its prefetches only. align: chunks start on multiples of it (a multiple of 2L dividing Chunk; the
// quantized pairs' 64-column runs).
template <int64_t Chunk, typename E, typename Decode, typename Store>
static void gemm_parts(int parts, const int64_t* n, const Panels& pn, const E* xt, Decode&& decode, Store&& store,
                       const Direct<E>* direct, int64_t align = 2 * L) {
  static_assert(Chunk % (2 * L) == 0, "chunks start on the 4-bit decode's 2L-column runs");
  constexpr int per = kPer<E>;
  const PartTiles tiles(parts, kTileRows, [&](int i) { return n[i]; });
  // As few chunks as Chunk allows, of equal width (whole runs of `align` columns, at least the 4-bit decode's 2L):
  // k = 514 in 272 + 242, not 512 + 2, so no fp32 chain is longer than it must be (chains of 512 erred 2-3x
  // PyTorch's there, of 272 1.4-1.9x).
  const int64_t chunks = (pn.k + Chunk - 1) / Chunk;
  const int64_t step = ((pn.k + chunks - 1) / chunks + align - 1) / align * align;
  parallel_for(0, tiles.total() * pn.count, 1, [&](int64_t t0, int64_t t1) {
    attn::Scratch<E> a(size_t(kTileRows * kLda<Chunk>));
    attn::Scratch<float> c(size_t(kTileRows * pn.width));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / pn.count, p = t % pn.count;
      const int part = tiles.part(tile);
      const int64_t n0 = (tile - tiles.first[part]) * kTileRows, rows = std::min(kTileRows, n[part] - n0);
      const int64_t nr = pn.rows(p);
      const int nvec = int((nr + L - 1) / L);
      const Direct<E> in = direct ? direct[part] : Direct<E>{};
      const bool read_in_place = in_place(in, nvec);
      const int64_t lda = read_in_place ? in.lda : kLda<Chunk>;
      const E* panel = xt + p * pn.ke * pn.width;
      for (int64_t c0 = 0; c0 < pn.k; c0 += step) {
        const int64_t c1 = std::min(pn.k, c0 + step);
        for (int64_t r = 0; r < rows; ++r)
          decode(part, n0 + r, c0, c1, read_in_place ? nullptr : a.ptr + r * kLda<Chunk>);
        const E* w = read_in_place ? in.w + n0 * lda + c0 / per : a.ptr;
        const int kdim = int((c1 - c0) / per);
        const E* b = panel + c0 / per * pn.width;
        if (c0 == 0) kgemm<false>(int(rows), nvec, kdim, w, lda, b, pn.width, c.ptr, pn.width);
        else kgemm<true>(int(rows), nvec, kdim, w, lda, b, pn.width, c.ptr, pn.width);
      }
      store(part, n0, rows, p * pn.width, nr, c.ptr, pn.width);
    }
  });
}

// gemm_parts for one weight of n rows: decode(row, c0, c1, dst), store(n0, rows, r0, nr, c, ldc).
template <int64_t Chunk, typename E, typename Decode, typename Store>
static void gemm(int64_t n, const Panels& pn, const E* xt, Decode&& decode, Store&& store, Direct<E> direct = {},
                 int64_t align = 2 * L) {
  gemm_parts<Chunk>(
      1, &n, pn, xt, [&](int, int64_t r, int64_t c0, int64_t c1, E* dst) { decode(r, c0, c1, dst); },
      [&](int, int64_t n0, int64_t rows, int64_t r0, int64_t nr, const float* c, int64_t ldc) {
        store(n0, rows, r0, nr, c, ldc);
      },
      &direct, align);
}

}  // namespace outer
}  // namespace LLMKERN_ISA
}  // namespace llmkern
