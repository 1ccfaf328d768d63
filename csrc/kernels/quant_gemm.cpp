// Weight-only quantized linear for many rows of x (the GEMM path of qlinear_kernel), compiled once per
// CPU ISA.
//
// out[m][n] = sum_c x[m][c] w[n][c] as C = A B with A = dequantized W (rows of W, k contiguous) and
// B = x transposed, [k][mp] (mp = M rounded up to the vector width, zero rows beyond M): each decoded
// weight element is broadcast against vectors of x rows, so the decode cost is paid once per call and
// amortized over all M rows, and W never needs a transpose.
//
// Work: parallel over tiles of NT = 24 rows of W. Per tile and chunk of KC columns, the tile's rows are
// dequantized into an fp32 scratch [NT][KC = 1024] (L2 resident), then a register-blocked product (MR rows of
// W x NR vectors of x rows) accumulates into an fp32 [NT][mp] block; the epilogue applies the int8 row
// scale, adds the bias and rounds once to the output dtype.
//
// 4-bit decode: one 32-bit lane per packed byte (bytes zero-extended); the high nibble (the even element)
// and the low nibble (the odd element) index a 16-float table holding (q - z) * s (int4) or code * absmax
// (nf4) for the current group (AVX-512: one vpermps; AVX2: two 8-entry permutes and a blend). A chunk of
// 2L elements thus decodes to [the L even elements, the L odd elements]; x^T is stored in that same
// permuted k order, so the product is unchanged. int8 decodes in natural order (the scale at the end).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/vec/vec.h"
#include "kernels/attention_tile.h"
#include "kernels/parallel.h"
#include "kernels/quant.h"
#include "kernels/quant_linear.h"

#if defined(LLMKERN_ISA_AVX512) || defined(LLMKERN_ISA_AVX2)
#include <immintrin.h>
#endif

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

using attn::Scratch;
using V = VecF;
constexpr int L = V::W;

// ---------------------------------------------------------------- per-ISA 4-bit decode

#if defined(LLMKERN_ISA_AVX512)
struct Dec {
  struct Table { __m512 t; };
  static Table table(const float* base, float z, float s) {
    return {_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(base), _mm512_set1_ps(z)), _mm512_set1_ps(s))};
  }
  // 2L elements from L bytes at p: dst[0, L) = even elements (high nibbles), dst[L, 2L) = odd ones.
  static void chunk(const uint8_t* p, const Table& t, float* dst) {
    const __m512i r = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    _mm512_storeu_ps(dst, _mm512_permutexvar_ps(_mm512_srli_epi32(r, 4), t.t));
    _mm512_storeu_ps(dst + L, _mm512_permutexvar_ps(r, t.t));  // vpermps reads the low 4 bits only
  }
  static void int8(const int8_t* p, float* dst) {
    _mm512_storeu_ps(dst, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
  }
};
#elif defined(LLMKERN_ISA_AVX2)
struct Dec {
  struct Table { __m256 lo, hi; };
  static Table table(const float* base, float z, float s) {
    const __m256 zv = _mm256_set1_ps(z), sv = _mm256_set1_ps(s);
    return {_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(base), zv), sv),
            _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(base + 8), zv), sv)};
  }
  // Entries 0..7 and 8..15 through two 8-entry permutes (low 3 bits), chosen by bit 3 moved to the sign.
  static __m256 look(__m256i idx, __m256i sel, const Table& t) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx),
                            _mm256_castsi256_ps(sel));
  }
  static void chunk(const uint8_t* p, const Table& t, float* dst) {
    const __m256i r = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    _mm256_storeu_ps(dst, look(_mm256_srli_epi32(r, 4), _mm256_slli_epi32(r, 24), t));
    _mm256_storeu_ps(dst + L, look(r, _mm256_slli_epi32(r, 28), t));
  }
  static void int8(const int8_t* p, float* dst) {
    _mm256_storeu_ps(dst, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
  }
};
#else
struct Dec {
  struct Table { float t[16]; };
  static Table table(const float* base, float z, float s) {
    Table t;
    for (int i = 0; i < 16; ++i) t.t[i] = (base[i] - z) * s;
    return t;
  }
  static void chunk(const uint8_t* p, const Table& t, float* dst) {
    for (int l = 0; l < L; ++l) {
      dst[l] = t.t[p[l] >> 4];
      dst[L + l] = t.t[p[l] & 15];
    }
  }
  static void int8(const int8_t* p, float* dst) {
    for (int l = 0; l < L; ++l) dst[l] = float(p[l]);
  }
};
#endif

// Columns per decode chunk (a multiple of 2L), the row stride of A: long runs per row of packed bytes
// (512 bytes) measured faster than 256 columns, whose short runs the hardware prefetchers miss.
constexpr int64_t kChunk = 1024;

constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Row r of W, columns [c0, c1) dequantized into dst (4-bit: permuted per chunk of 2L; int8: natural order,
// unscaled). 4-bit: c0, c1 multiples of 2L (k is a multiple of 32 >= 2L); gfirst = c0 / group (no
// division here: this runs once per row and chunk).
static void decode_row(const QWeight& w, int64_t r, int64_t c0, int64_t c1, int64_t gfirst, float* dst) {
  if (w.format == QFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + r * w.k;
    int64_t c = c0;
    for (; c + L <= c1; c += L) Dec::int8(q + c, dst + (c - c0));
    for (; c < c1; ++c) dst[c - c0] = float(q[c]);
    return;
  }
  const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * (w.k / 2);
  const int64_t gsize = w.group;
  int64_t b = r * (w.k / gsize) + gfirst, gend = (gfirst + 1) * gsize;
  const bool nf4 = w.format == QFormat::nf4;
  const float* base = nf4 ? w.code : kIota;
  // The same row's next chunk: rows are far apart, so the hardware prefetchers miss these short runs.
  for (int64_t c = c1; c < c1 + kChunk && c < w.k; c += 128) __builtin_prefetch(row + c / 2);
  for (int64_t c = c0; c < c1; ++b, gend += gsize) {
    float s, z;
    if (nf4) {
      s = nf4_absmax(w, b);
      z = 0.f;
    } else {
      s = scale_at(w, b);
      z = w.zeros ? float(w.zeros[b]) : 8.f;
    }
    const typename Dec::Table t = Dec::table(base, z, s);
    const int64_t hi = std::min(c1, gend);
    for (; c < hi; c += 2 * L) Dec::chunk(row + c / 2, t, dst + (c - c0));
  }
}

// ---------------------------------------------------------------- register-blocked product

// C[r][j] (+)= sum_k a[r * kChunk + k] * b[k * ldb + j] for MR rows and NR vectors. A's row stride is always
// kChunk (the decode scratch): a constant keeps the MR broadcast addresses as displacements off one register.
template <int MR, int NR>
static inline void kblock(int kdim, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, bool acc_in) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = acc_in ? V::load(c + r * ldc + j * L) : V::zero();
  for (int k = 0; k < kdim; ++k) {
    V bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = V::load(b + k * ldb + j * L);
    for (int r = 0; r < MR; ++r) {
      const V ar = V::set1(a[r * kChunk + k]);
      for (int j = 0; j < NR; ++j) acc[r][j] = fmadd(ar, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j].store(c + r * ldc + j * L);
}

// MR per NR: accumulators MR * NR within the registers, at least ~8 of them in flight for the FMA latency.
#if defined(LLMKERN_ISA_AVX512)
template <int NR> constexpr int kMRFor = NR == 1 ? 12 : NR == 2 ? 12 : NR == 3 ? 8 : 6;
#elif defined(LLMKERN_ISA_AVX2)
template <int NR> constexpr int kMRFor = NR == 1 ? 8 : NR == 2 ? 6 : 4;
#else
template <int NR> constexpr int kMRFor = 4;
#endif

template <int NR, int MR>
static inline void krest(int rows, int kdim, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                         bool acc_in) {
  if constexpr (MR > 0) {
    if (rows == MR) return kblock<MR, NR>(kdim, a, b, ldb, c, ldc, acc_in);
    krest<NR, MR - 1>(rows, kdim, a, b, ldb, c, ldc, acc_in);
  }
}

template <int NR>
static void kstrip(int m, int kdim, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, bool acc_in) {
  constexpr int MR = kMRFor<NR>;
  int r = 0;
  for (; r + MR <= m; r += MR) kblock<MR, NR>(kdim, a + r * kChunk, b, ldb, c + r * ldc, ldc, acc_in);
  if (r < m) krest<NR, MR - 1>(m - r, kdim, a + r * kChunk, b, ldb, c + r * ldc, ldc, acc_in);
}

// C[m][nvec * L] (+)= A[m][kdim] B[kdim][nvec * L], A with row stride kChunk.
static void kgemm(int m, int nvec, int kdim, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc,
                  bool acc_in) {
  int j = 0;
  for (; j + 4 <= nvec; j += 4) kstrip<4>(m, kdim, a, b + j * L, ldb, c + j * L, ldc, acc_in);
  switch (nvec - j) {
    case 3: kstrip<3>(m, kdim, a, b + j * L, ldb, c + j * L, ldc, acc_in); break;
    case 2: kstrip<2>(m, kdim, a, b + j * L, ldb, c + j * L, ldc, acc_in); break;
    case 1: kstrip<1>(m, kdim, a, b + j * L, ldb, c + j * L, ldc, acc_in); break;
    default: break;
  }
}

// ---------------------------------------------------------------- driver

constexpr int64_t kTileRows = 24;  // rows of W per task tile (a multiple of 12, 8, 6 and 4)

// xt[pos][m] = x[m][e(pos)] in fp32 (pos in the decode order), zero for m >= M.
template <typename T>
static void transpose_x(const QLinearParams& p, float* xt, int64_t mp) {
  const int64_t k = p.w.k;
  const bool perm = p.w.format != QFormat::int8;
  const int64_t ce = 2 * L;
  const int64_t units = perm ? k / ce : (k + ce - 1) / ce;
  parallel_for(0, units, grain_for(ce * mp * 4), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c0 = u * ce, c1 = std::min(k, c0 + ce);
      for (int64_t pos = c0; pos < c1; ++pos) {
        float* dst = xt + pos * mp;
        const int64_t j = pos - c0;
        const int64_t e = perm ? c0 + (j < L ? 2 * j : 2 * (j - L) + 1) : pos;
        for (int64_t m = 0; m < p.m; ++m) dst[m] = to_float(static_cast<const T*>(p.x)[m * p.x_stride + e]);
        for (int64_t m = p.m; m < mp; ++m) dst[m] = 0.f;
      }
    }
  });
}

template <typename T>
static void gemm_typed(const QLinearParams& p) {
  const QWeight& w = p.w;
  const int64_t k = w.k, n = w.n;
  const int64_t mp = (p.m + L - 1) / L * L;
  const int nvec = int(mp / L);
  Scratch<float> xt(size_t(k * mp));
  transpose_x<T>(p, xt.ptr, mp);
  const int64_t nt = kTileRows, kc = kChunk;
  const int64_t tiles = (n + nt - 1) / nt;
  parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    Scratch<float> a(size_t(nt * kChunk));
    Scratch<float> c(size_t(nt * mp));
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t n0 = tile * nt, rows = std::min(nt, n - n0);
      for (int64_t c0 = 0; c0 < k; c0 += kc) {
        const int64_t c1 = std::min(k, c0 + kc), gfirst = w.format == QFormat::int8 ? 0 : c0 / w.group;
        for (int64_t r = 0; r < rows; ++r) decode_row(w, n0 + r, c0, c1, gfirst, a.ptr + r * kChunk);
        kgemm(int(rows), nvec, int(c1 - c0), a.ptr, xt.ptr + c0 * mp, mp, c.ptr, mp, c0 > 0);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = n0 + r;
        const float s = w.format == QFormat::int8 ? scale_at(w, j) : 1.f;
        const float b = p.bias ? to_float(static_cast<const T*>(p.bias)[j]) : 0.f;
        const float* cr = c.ptr + r * mp;
        for (int64_t m = 0; m < p.m; ++m) {
          T* out = static_cast<T*>(p.out) + m * p.out_stride + j;
          ScalarVec<float>{cr[m] * s + b}.store(out);
        }
      }
    }
  });
}

}  // namespace

void qlinear_gemm(const QLinearParams& p) {
  switch (p.dtype) {
    case DType::f32: return gemm_typed<float>(p);
    case DType::bf16: return gemm_typed<bf16>(p);
    case DType::f16: return gemm_typed<f16>(p);
    case DType::f64: break;  // not supported: the caller takes the generic path
  }
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
