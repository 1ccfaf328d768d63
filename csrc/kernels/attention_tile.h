// Tile building blocks of the CPU attention kernels (forward and backward), compiled into each ISA's
// translation units: everything here is in the LLMKERN_ISA namespace (see cpu/vec/vec.h for why).
//
// All tile math is one register-blocked product, C (+)= A B, in the accumulation type A_t (float; double
// for the float64 gradcheck path). B is row-major with its columns contiguous and n a multiple of the
// vector width (callers pad their fp32 tiles); A is read one element at a time, row-major or column-major,
// so the same kernel takes A or A transposed. That lets the attention kernels keep S (keys x queries: the
// softmax then runs along vectors of queries) and the outputs transposed without transposing a tile per
// product; operands are transposed once, when packed (transpose_rows), and outputs once, when written
// (transpose_tile).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "cpu/vec/vec.h"
#if defined(LLMKERN_ISA_AMX)
#include "cpu/vec/amx.h"
#endif

namespace llmkern {
namespace LLMKERN_ISA {
namespace attn {

// Register blocking: MR rows of C by NR vectors, MR * NR accumulators plus NR loads of B and one
// broadcast of A within the ISA's vector registers (32 on AVX-512, 16 on AVX2).
#if defined(LLMKERN_ISA_AVX512)
constexpr int kMR = 6, kNR = 4;
#elif defined(LLMKERN_ISA_AVX2)
constexpr int kMR = 4, kNR = 3;
#else
constexpr int kMR = 4, kNR = 2;
#endif

// Two bf16 as one 32-bit element (low half first): the operand type of products over bf16 pairs.
struct Bf16Pair {
  uint32_t bits;
};

// What a product multiplies: A elements (broadcast), B vectors, and the multiply-add. fp32 math by default, B
// of any storage type (V::load converts). With bf16 pairs (avx512bf16) both operands are Bf16Pair, B's W pairs
// load as one Bf16x32, and dot_pairs does two fp32 FMAs' work: the inner dimension k then counts pairs.
template <typename V, typename TB>
struct Operands {
  using AE = typename V::value_type;
  static V load_b(const TB* p) { return V::load(p); }
  static V splat(AE x) { return V::set1(x); }
  static V madd(V x, V b, V acc) { return fmadd(x, b, acc); }
};
#if defined(LLMKERN_ISA_AVX512BF16)
template <>
struct Operands<VecAvx512, Bf16Pair> {
  using AE = Bf16Pair;
  static Bf16x32 load_b(const Bf16Pair* p) { return Bf16x32::load(reinterpret_cast<const bf16*>(p)); }
  static Bf16x32 splat(Bf16Pair x) { return Bf16x32::set1_pair(x.bits); }
  static VecAvx512 madd(Bf16x32 x, Bf16x32 b, VecAvx512 acc) { return dot_pairs(acc, x, b); }
};
#endif

// Whether the products of storage type T run over bf16 pairs on this ISA: bf16 data on avx512bf16, where one
// vdpbf16ps does two fp32 FMAs' work.
template <typename T>
constexpr bool kPairProducts =
#if defined(LLMKERN_ISA_AVX512BF16)
    std::is_same_v<T, bf16>;
#else
    false;
#endif

// Whether those pair products run on the AMX tiles instead (tmul::gemm, the amx build). Tile products read whole
// tiles of 16 pairs along the head dimension, so it is padded to 32 (padded_head, below); each thread's share of a
// call holds its tile configuration in a TilesIf<true> (nothing for other types and builds).
struct NoTiles {};
#if defined(LLMKERN_ISA_AMX)
template <typename T>
constexpr bool kTileProducts = kPairProducts<T>;
template <bool On>
using TilesIf = std::conditional_t<On, tmul::TileScope, NoTiles>;
#else
template <typename T>
constexpr bool kTileProducts = false;
template <bool On>
using TilesIf = NoTiles;
#endif

// A's two layouts: A(r, k) = a[r * as + k] (kRows: each row contiguous along k, read through MR row
// pointers) or a[k * as + r] (kCols: the MR rows of one k adjacent, one pointer). Either way every address
// in the k loop is a pointer plus a constant, so nothing spills (generic runtime strides did: measured
// ~20% slower).
enum ALayout { kRows, kCols };

// One MR x NR-vector block: C[r][j] (+)= sum_k A(r, k) * b[k * ldb + j], C's columns first scaled by cs[j] when
// cs is given (with ACC).
template <typename V, int MR, int NR, bool ACC, ALayout L, typename TA, typename TB>
static inline void gemm_block(int kdim, const TA* a, int64_t as, const TB* b, int64_t ldb,
                              typename V::value_type* c, int64_t ldc, const typename V::value_type* cs) {
  using Op = Operands<V, TB>;
  static_assert(std::is_same_v<TA, typename Op::AE>, "A's element type is the product's");
  constexpr int W = V::W;
  V acc[MR][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[r][j] = V::zero();
  const TA* ar[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) ar[r] = a + r * as;
#pragma GCC unroll 2
  for (int k = 0; k < kdim; ++k) {
    decltype(Op::load_b(b)) bv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) bv[j] = Op::load_b(b + j * W);
    b += ldb;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const TA* ark = L == kCols ? a + r : ar[r] + k;
      // One lane (the float64 path): GCC 12 vectorizes this k loop itself and then reads up to two k rows past
      // its end (a fault where A ended a heap). An empty asm on the element's address keeps the loop scalar.
      if constexpr (V::W == 1) asm("" : "+r"(ark));
      const auto x = Op::splat(*ark);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[r][j] = Op::madd(x, bv[j], acc[r][j]);
    }
    if constexpr (L == kCols) a += as;
  }
  // With ACC this block's sum is added to C (C scaled first): C is not a chain continued over every call, so
  // an attention output summed over thousands of keys errs like a blocked sum (~eps |v| at 8K keys before).
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      V* out = &acc[r][j];
      if constexpr (ACC) {
        const V old = V::load(c + r * ldc + j * W);
        *out = cs ? fmadd(old, V::load(cs + j * W), *out) : old + *out;
      }
      out->store(c + r * ldc + j * W);
    }
}

// The last rows < kMR of a strip as one block of that height (each B vector loaded once for all of
// them: the 64 % 6 = 4 rows of a 64-row tile run as one 4-row block).
template <typename V, int NR, bool ACC, ALayout L, int MR = kMR - 1, typename TA, typename TB>
static inline void gemm_rest(int rows, int kdim, const TA* a, int64_t as, const TB* b,
                             int64_t ldb, typename V::value_type* c, int64_t ldc, const typename V::value_type* cs) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_block<V, MR, NR, ACC, L>(kdim, a, as, b, ldb, c, ldc, cs);
    gemm_rest<V, NR, ACC, L, MR - 1>(rows, kdim, a, as, b, ldb, c, ldc, cs);
  }
}

// Rows of one column strip: full MR blocks, then the remaining rows as one shorter block.
template <typename V, int NR, bool ACC, ALayout L, typename TA, typename TB>
static inline void gemm_strip(int m, int kdim, const TA* a, int64_t as, const TB* b,
                              int64_t ldb, typename V::value_type* c, int64_t ldc, const typename V::value_type* cs) {
  const int64_t rstep = L == kCols ? 1 : as;
  int r = 0;
  for (; r + kMR <= m; r += kMR)
    gemm_block<V, kMR, NR, ACC, L>(kdim, a + r * rstep, as, b, ldb, c + r * ldc, ldc, cs);
  if (r < m) gemm_rest<V, NR, ACC, L>(m - r, kdim, a + r * rstep, as, b, ldb, c + r * ldc, ldc, cs);
}

template <typename V, bool ACC, ALayout L, int NR = kNR, typename TA, typename TB>
static inline void gemm_cols(int m, int nvec, int kdim, const TA* a, int64_t as,
                             const TB* b, int64_t ldb, typename V::value_type* c, int64_t ldc,
                             const typename V::value_type* cs) {
  if constexpr (NR > 0) {
    int j = 0;
    for (; j + NR <= nvec; j += NR)
      gemm_strip<V, NR, ACC, L>(m, kdim, a, as, b + j * V::W, ldb, c + j * V::W, ldc, cs ? cs + j * V::W : cs);
    if (j < nvec) {
      const auto* csj = cs ? cs + j * V::W : cs;
      gemm_cols<V, ACC, L, NR - 1>(m, nvec - j, kdim, a, as, b + j * V::W, ldb, c + j * V::W, ldc, csj);
    }
  }
}

// C[m][n] (+)= sum_k A(r, k) B[k][n] with A(r, k) = a[r * a_rs + k * a_ks], one of the strides 1, for n a
// multiple of V::W. B may also be a storage type (bf16, f16: V::load converts), or A and B bf16 pairs
// (Operands). ACC: add to C (else
// overwrite); c_scale: with ACC, C's column j is first multiplied by c_scale[j] (the online softmax's
// rescaling of O^T, for free). Leading dimensions ldb, ldc are in elements.
// k runs in chunks whose B panel (chunk x NR vectors) stays in L1 next to A and C: 64 rows when B's rows are
// at most 256 bytes, else 32 (rows 512 bytes apart cover only half the L1 sets: 64 of them would fill every way
// of those sets; measured on AVX-512 at head dim 128: 1.2x over one pass of 64). k_pass > 0 sets the chunk instead
// (the fp32 matmul's B strips come from L2: kernels/matmul.cpp).
template <typename V, bool ACC, typename TA, typename TB>
static inline void gemm(int m, int n, int kdim, const TA* a, int64_t a_rs, int64_t a_ks,
                        const TB* b, int64_t ldb, typename V::value_type* c, int64_t ldc,
                        const typename V::value_type* c_scale = nullptr, int k_pass = 0) {
  const bool cols = a_rs == 1;  // else a_ks == 1
  const int kc = k_pass > 0 ? k_pass : ldb * int64_t(sizeof(TB)) <= 256 ? 64 : 32;
  for (int k0 = 0; k0 == 0 || k0 < kdim; k0 += kc) {  // once at least: an overwrite with kdim = 0 zeroes C
    const int kn = std::min(kc, kdim - k0);
    const bool acc = ACC || k0 > 0;
    const TB* bk = b + k0 * ldb;
    const auto* cs = k0 == 0 ? c_scale : nullptr;
    if (cols) {
      const auto* ak = a + k0 * a_ks;
      if (acc) gemm_cols<V, true, kCols>(m, n / V::W, kn, ak, a_ks, bk, ldb, c, ldc, cs);
      else gemm_cols<V, false, kCols>(m, n / V::W, kn, ak, a_ks, bk, ldb, c, ldc, cs);
    } else {
      const auto* ak = a + k0;
      if (acc) gemm_cols<V, true, kRows>(m, n / V::W, kn, ak, a_rs, bk, ldb, c, ldc, cs);
      else gemm_cols<V, false, kRows>(m, n / V::W, kn, ak, a_rs, bk, ldb, c, ldc, cs);
    }
  }
}

// n rounded up to the vector width: the padded column count of a tile.
template <typename V>
constexpr int padded(int n) {
  return (n + V::W - 1) / V::W * V::W;
}

// The head dimension padded for storage type T's products: whole vectors, or whole tiles of 16 pairs on the tiles.
template <typename V, typename T>
int padded_head(int d) {
  return kTileProducts<T> ? (d + 31) / 32 * 32 : padded<V>(d);
}

// dst[0, n) = float(src[0, n)) * mul, dst[n, n_pad) = 0: one row of a padded accumulation-type tile.
template <typename V, typename T>
static inline void load_row(const T* src, int n, typename V::value_type mul, typename V::value_type* dst,
                            int n_pad) {
  for_each_chunk<V>(n, [&](auto v, int64_t i) {
    using Vv = decltype(v);
    (Vv::load(src + i) * Vv::set1(mul)).store(dst + i);
  });
  for (int i = n; i < n_pad; ++i) dst[i] = typename V::value_type(0);
}

// dst[0, n) = src[0, n) as stored, dst[n, n_pad) = 0: one zero-padded row of a storage-type tile.
template <typename T>
static inline void copy_row_padded(const T* src, int n, int n_pad, T* dst) {
  std::memcpy(dst, src, sizeof(T) * size_t(n));
  std::memset(dst + n, 0, sizeof(T) * size_t(n_pad - n));
}

// dst[0, n) = src[0, n) converted to T: one row of a tile back to storage.
template <typename V, typename T>
static inline void store_row(const typename V::value_type* src, int n, T* dst) {
  for_each_chunk<V>(n, [&](auto v, int64_t i) { decltype(v)::load(src + i).store(dst + i); });
}

// Rows in paired order (load_pair in cpu/vec/vec.h): the first paired<V>(n) elements as pairs of vectors in the
// storage type's cheapest lane order, the rest in natural order. A dot product of two rows, or a row accumulated
// from rows, stored this way is the same as in natural order; store_row_paired writes natural order back.
template <typename V>
constexpr int paired(int n) {
  return n / (2 * V::W) * (2 * V::W);
}

template <typename V, typename T>
static inline void load_row_paired(const T* src, int n, typename V::value_type mul, typename V::value_type* dst,
                                   int n_pad) {
  const int n2 = paired<V>(n);
  const V m = V::set1(mul);
  for (int i = 0; i < n2; i += 2 * V::W) {
    V a, b;
    load_pair(src + i, a, b);
    (a * m).store(dst + i), (b * m).store(dst + i + V::W);
  }
  load_row<V>(src + n2, n - n2, mul, dst + n2, n_pad - n2);
}

template <typename V, typename T>
static inline void store_row_paired(const typename V::value_type* src, int n, T* dst) {
  const int n2 = paired<V>(n);
  for (int i = 0; i < n2; i += 2 * V::W) store_pair(dst + i, V::load(src + i), V::load(src + i + V::W));
  store_row<V>(src + n2, n - n2, dst + n2);
}

// dst[e * ld + t] = mul * src[t][e] for e < n, t < W (a null src[t] is a zero row): W rows, e.g. of a storage
// type, transposed into fp32 columns in W x W register blocks (the last n % W elements one by one).
template <typename V, typename T>
static inline void transpose_rows(const T* const* src, int n, typename V::value_type mul, typename V::value_type* dst,
                                  int64_t ld) {
  using A = typename V::value_type;
  constexpr int W = V::W;
  const int nw = n / W * W;
  for (int e0 = 0; e0 < nw; e0 += W) {
    V x[W];
    for (int t = 0; t < W; ++t) x[t] = src[t] ? V::load(src[t] + e0) * V::set1(mul) : V::zero();
    transpose(x);
    for (int t = 0; t < W; ++t) x[t].store(dst + int64_t(e0 + t) * ld);
  }
  for (int e = nw; e < n; ++e)
    for (int t = 0; t < W; ++t) dst[int64_t(e) * ld + t] = src[t] ? ScalarVec<A>::load(src[t] + e).v * mul : A(0);
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (dst's columns rows..round_up(rows, W) are
// zeroed): a row-major tile written back transposed.
template <typename V>
static inline void transpose_tile(const typename V::value_type* src, int64_t lds, int rows, int cols,
                                  typename V::value_type* dst, int64_t ldd) {
  for (int r0 = 0; r0 < rows; r0 += V::W) {
    const typename V::value_type* src_rows[V::W];
    for (int t = 0; t < V::W; ++t) src_rows[t] = r0 + t < rows ? src + int64_t(r0 + t) * lds : nullptr;
    transpose_rows<V>(src_rows, cols, typename V::value_type(1), dst + r0, ldd);
  }
}

// An aligned scratch buffer owned by one task (plain malloc/free: no std containers in ISA TUs).
template <typename A>
struct Scratch {
  A* ptr = nullptr;
  explicit Scratch(size_t n) : ptr(static_cast<A*>(std::aligned_alloc(64, (n * sizeof(A) + 63) / 64 * 64))) {
    if (!ptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

}  // namespace attn
}  // namespace LLMKERN_ISA
}  // namespace llmkern
