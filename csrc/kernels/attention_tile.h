// Tile building blocks of the CPU attention kernels (forward and backward), compiled into each ISA's
// translation units: everything here is in the LLMKERN_ISA namespace (see cpu/vec/vec.h for why).
//
// All tile math is one register-blocked product, C (+)= A B, in the accumulation type A_t (float; double
// for the float64 gradcheck path). B is row-major with its columns contiguous and n a multiple of the
// vector width (callers pad their fp32 tiles); A is read one element at a time through two strides, so
// the same kernel takes A or A transposed, which is what lets the attention kernels keep S transposed
// (keys x queries: the softmax then runs along vectors of queries) without ever transposing a tile.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "cpu/vec/vec.h"

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

// One MR x NR-vector block: C[r][j] (+)= sum_k a[r * a_rs + k * a_ks] * b[k * ldb + j].
template <typename V, int MR, int NR, bool ACC, typename TB>
static inline void gemm_block(int kdim, const typename V::value_type* a, int64_t a_rs, int64_t a_ks,
                              const TB* b, int64_t ldb, typename V::value_type* c,
                              int64_t ldc) {
  constexpr int W = V::W;
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = ACC ? V::load(c + r * ldc + j * W) : V::zero();
  for (int k = 0; k < kdim; ++k) {
    V bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = V::load(b + k * ldb + j * W);
    for (int r = 0; r < MR; ++r) {
      const V ar = V::set1(a[r * a_rs + k * a_ks]);
      for (int j = 0; j < NR; ++j) acc[r][j] = fmadd(ar, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j].store(c + r * ldc + j * W);
}

// The last rows < kMR of a strip as one block of that height (each B vector loaded once for all of
// them: a decode task's 4 query rows, or the 64 % 6 = 4 rows of a 64-row tile, run as one 4-row block).
template <typename V, int NR, bool ACC, int MR = kMR - 1, typename TB>
static inline void gemm_rest(int rows, int kdim, const typename V::value_type* a, int64_t a_rs, int64_t a_ks,
                             const TB* b, int64_t ldb, typename V::value_type* c,
                             int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_block<V, MR, NR, ACC>(kdim, a, a_rs, a_ks, b, ldb, c, ldc);
    gemm_rest<V, NR, ACC, MR - 1>(rows, kdim, a, a_rs, a_ks, b, ldb, c, ldc);
  }
}

// Rows of one column strip: full MR blocks, then the remaining rows as one shorter block.
template <typename V, int NR, bool ACC, typename TB>
static inline void gemm_strip(int m, int kdim, const typename V::value_type* a, int64_t a_rs, int64_t a_ks,
                              const TB* b, int64_t ldb, typename V::value_type* c,
                              int64_t ldc) {
  int r = 0;
  for (; r + kMR <= m; r += kMR) gemm_block<V, kMR, NR, ACC>(kdim, a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc);
  if (r < m) gemm_rest<V, NR, ACC>(m - r, kdim, a + r * a_rs, a_rs, a_ks, b, ldb, c + r * ldc, ldc);
}

template <typename V, bool ACC, int NR = kNR, typename TB>
static inline void gemm_cols(int m, int nvec, int kdim, const typename V::value_type* a, int64_t a_rs,
                             int64_t a_ks, const TB* b, int64_t ldb,
                             typename V::value_type* c, int64_t ldc) {
  if constexpr (NR > 0) {
    int j = 0;
    for (; j + NR <= nvec; j += NR) gemm_strip<V, NR, ACC>(m, kdim, a, a_rs, a_ks, b + j * V::W, ldb, c + j * V::W, ldc);
    if (j < nvec) gemm_cols<V, ACC, NR - 1>(m, nvec - j, kdim, a, a_rs, a_ks, b + j * V::W, ldb, c + j * V::W, ldc);
  }
}

// C[m][n] (+)= sum_k A(r, k) B[k][n] with A(r, k) = a[r * a_rs + k * a_ks], for n a multiple of V::W.
// B may also be a storage type (bf16, f16: V::load converts), e.g. value rows read straight from a cache.
// ACC: add to C (else overwrite). Leading dimensions ldb, ldc are in elements.
template <typename V, bool ACC, typename TB>
static inline void gemm(int m, int n, int kdim, const typename V::value_type* a, int64_t a_rs, int64_t a_ks,
                        const TB* b, int64_t ldb, typename V::value_type* c, int64_t ldc) {
  gemm_cols<V, ACC>(m, n / V::W, kdim, a, a_rs, a_ks, b, ldb, c, ldc);
}

// n rounded up to the vector width: the padded column count of a tile.
template <typename V>
constexpr int padded(int n) {
  return (n + V::W - 1) / V::W * V::W;
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
