// Fused weight-only quantized linear, out = x @ dequant(W)^T (+ bias), compiled once per CPU ISA.
//
// Fast path (nf4 with k % block == 0, int4, int8; x fp32/bf16/fp16): x is converted once per call to an
// fp32 scratch copy whose k order matches the order in which the packed weight decodes, and every output
// tile is a register block of MR rows of x times NR rows of W, the weight decoded on the fly from the
// packed bytes (each packed byte is read once per MR rows of x: once in all for M <= 4, the GEMV case).
//
// 4-bit decode without unpacking: one 32-bit lane holds P nibbles (P = 8: a plain load; 4: 16-bit words
// zero-extended; 2: bytes zero-extended; kMaxP picks per ISA). Shifting the lane right by 4j puts nibble j in its low 4 bits,
// and vpermps (AVX-512: one 16-entry permute; AVX2: two 8-entry permutes and a blend) looks up the
// dequantized value in a 16-float table that already holds (code - z) * s (int4) or code * absmax (nf4)
// for the current group: the table is rebuilt once per group and row, so the inner loop is shift, permute,
// FMA. Nibble j of lane l is element l * P + (j ^ 1) of the chunk (the high nibble is the even element),
// so x is stored in that permuted order per chunk of L * P elements (L = lanes). A chunk never straddles
// a group (L * P <= group).
//
// int8: 16 (8) bytes sign-extended and converted per vector, natural k order, the row scale applied once
// at the end. The k % L tail is added in the epilogue.
//
// Blocking: rows of W are split into tiles of NT rows (parallel over tiles); within a tile, k is split
// into chunks of about 1024 (whole groups) so the x chunk of one MR block stays in L1 while the tile's
// NR-row blocks stream past it; the MR x NR vector accumulators live in a per-tile scratch between chunks
// and are reduced once at the end.
//
// On AVX-512 all three formats take their own GEMV path instead (int16 x and vpmaddwd; see "AVX-512 int16 GEMV"
// below) at M <= 4 for fp32 x and up to gemv_rows<T>() rows (8, 11 or 15 with bf16 pairs, else 64) for bf16 / fp16 x.
//
// Generic path (nf4 whose rows do not start on a block boundary or odd k, fp64): each row of W is
// dequantized to fp32 once and dotted with every row of x.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/vec/dispatch.h"
#include "cpu/vec/vec.h"
#include "kernels/attention_tile.h"
#include "kernels/parallel.h"
#include "kernels/prefetch.h"
#include "kernels/quant.h"
#include "kernels/quant_linear.h"

#if defined(LLMKERN_ISA_AVX512) || defined(LLMKERN_ISA_AVX2)
#include <immintrin.h>
#endif

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

using attn::Scratch;

// ---------------------------------------------------------------- scalar helpers

// Scale s and integer offset z of group g of row r: w = (q - z) * s (nf4: the code value * s, z = 0).
struct GroupScale {
  float s, z;
};

static inline GroupScale group_scale(const QWeight& w, int64_t groups, int64_t r, int64_t g) {
  switch (w.format) {
    case QFormat::nf4: return {nf4_absmax(w, r * groups + g), 0.f};
    case QFormat::int4:
      return {scale_at(w, r * groups + g),
              w.zeros ? float(w.zeros[r * groups + g]) : 8.f};
    case QFormat::int8: return {scale_at(w, r), 0.f};
  }
  return {0.f, 0.f};
}

// Dequantized element e of the flattened weight (fp32), for the generic path.
static inline float dequant_at(const QWeight& w, int64_t r, int64_t c) {
  if (w.format == QFormat::int8) return float(static_cast<const int8_t*>(w.data)[r * w.k + c]) * group_scale(w, 1, r, 0).s;
  const int64_t e = r * w.k + c;
  const uint8_t byte = static_cast<const uint8_t*>(w.data)[e / 2];
  const int q = (e & 1) ? (byte & 15) : (byte >> 4);
  if (w.format == QFormat::nf4) return w.code[q] * nf4_absmax(w, e / w.group);
  const GroupScale gs = group_scale(w, w.k / w.group, r, c / w.group);
  return (float(q) - gs.z) * gs.s;
}

// s[i], z[i] of groups [g0, g0 + ng) of row r (4-bit formats), one switch per call, not per group.
static inline void fill_scales(const QWeight& w, int64_t groups, int64_t r, int64_t g0, int64_t ng, float* s,
                               float* z) {
  const int64_t b = r * groups + g0;
  if (w.format == QFormat::nf4) {
    if (w.nested_q) {
      for (int64_t i = 0; i < ng; ++i) s[i] = nf4_absmax(w, b + i);
    } else {
      std::memcpy(s, w.absmax + b, sizeof(float) * size_t(ng));
    }
    for (int64_t i = 0; i < ng; ++i) z[i] = 0.f;
    return;
  }
  switch (w.scales_dtype) {
    case DType::f32: std::memcpy(s, static_cast<const float*>(w.scales) + b, sizeof(float) * size_t(ng)); break;
    case DType::bf16:
      for (int64_t i = 0; i < ng; ++i) s[i] = to_float(static_cast<const bf16*>(w.scales)[b + i]);
      break;
    case DType::f16:
      for (int64_t i = 0; i < ng; ++i) s[i] = to_float(static_cast<const f16*>(w.scales)[b + i]);
      break;
    case DType::f64:
      for (int64_t i = 0; i < ng; ++i) s[i] = float(static_cast<const double*>(w.scales)[b + i]);
      break;
  }
  if (w.zeros) {
    for (int64_t i = 0; i < ng; ++i) z[i] = float(w.zeros[b + i]);
  } else {
    for (int64_t i = 0; i < ng; ++i) z[i] = 8.f;
  }
}

// ---------------------------------------------------------------- per-ISA decode

#if defined(LLMKERN_ISA_AVX512)

struct Codec {
  using V = VecF;
  static constexpr int L = 16;
  using Raw = __m512i;
  struct Table { __m512 t; };
  // (base - z) * s, computed per lane exactly as (q - z) * s / code * s.
  static Table table(const float* base, float z, float s) {
    return {_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(base), _mm512_set1_ps(z)), _mm512_set1_ps(s))};
  }
  template <int P> static Raw raw(const uint8_t* p) {
    if constexpr (P == 8) return _mm512_loadu_si512(p);
    else if constexpr (P == 4) return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  template <int J> static V decode(Raw r, const Table& t) {
    const __m512i idx = J ? _mm512_srli_epi32(r, 4 * J) : r;  // vpermps reads the low 4 bits only
    return {_mm512_permutexvar_ps(idx, t.t)};
  }
  static V int8(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
};

#elif defined(LLMKERN_ISA_AVX2)

struct Codec {
  using V = VecF;
  static constexpr int L = 8;
  using Raw = __m256i;
  struct Table { __m256 lo, hi; };
  static Table table(const float* base, float z, float s) {
    const __m256 zv = _mm256_set1_ps(z), sv = _mm256_set1_ps(s);
    return {_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(base), zv), sv),
            _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(base + 8), zv), sv)};
  }
  template <int P> static Raw raw(const uint8_t* p) {
    if constexpr (P == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    else if constexpr (P == 4) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    else return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  // Entries 0..7 and 8..15 through two 8-entry permutes (low 3 bits), chosen by bit 3 moved to the sign.
  template <int J> static V decode(Raw r, const Table& t) {
    const __m256i idx = J ? _mm256_srli_epi32(r, 4 * J) : r;
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx), hi = _mm256_permutevar8x32_ps(t.hi, idx);
    const __m256i sel = (J == 7) ? r : _mm256_slli_epi32(r, 28 - 4 * J);
    return {_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(sel))};
  }
  static V int8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
  }
};

#else

struct Codec {
  using V = VecF;  // ArrayVec<8>
  static constexpr int L = V::W;
  struct Raw { uint32_t v[L]; };
  struct Table { float t[16]; };
  static Table table(const float* base, float z, float s) {
    Table t;
    for (int i = 0; i < 16; ++i) t.t[i] = (base[i] - z) * s;
    return t;
  }
  template <int P> static Raw raw(const uint8_t* p) {
    Raw r;
    for (int l = 0; l < L; ++l) {
      uint32_t u = 0;
      for (int b = 0; b < P / 2; ++b) u |= uint32_t(p[l * (P / 2) + b]) << (8 * b);
      r.v[l] = u;
    }
    return r;
  }
  template <int J> static V decode(const Raw& r, const Table& t) {
    return V::make([&](int l) { return t.t[(r.v[l] >> (4 * J)) & 15]; });
  }
  static V int8(const int8_t* p) { return V::make([&](int l) { return float(p[l]); }); }
};

#endif

using V = Codec::V;
constexpr int L = Codec::L;

template <int J, int N, typename F>
static inline void static_for(F&& f) {
  if constexpr (J < N) {
    f(std::integral_constant<int, J>{});
    static_for<J + 1, N>(f);
  }
}

// ---------------------------------------------------------------- fast path

constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

struct Job {
  const QWeight* w;
  const float* table_base;  // nf4: code; int4: 0..15
  const float* xp;          // [mp][k] fp32, permuted per chunk (4-bit) or natural (int8)
  int64_t k, kmain;         // kmain: the k the vector loops cover (int8: k rounded down to L)
  int64_t groups;           // k / group
  float* acc;               // [mp][nt] vectors of L floats (this tile)
  float* sz;                // [2][max NR][kc / group]: scales and zero points of a block's groups
  int64_t nt;
};

// GEMV blocks (MR <= 4) prefetch the next block's rows into L2 in software (x86 only). From memory: nf4 4096 x 4096
// on one core +10-20% (Skylake); int8 M = 1 18-20 -> 27-29 GB/s at 4096 x 4096 (Zen 4; into L1 it measured no gain).
#if defined(LLMKERN_ISA_AVX512) || defined(LLMKERN_ISA_AVX2)
constexpr bool kPrefetchRows = true;
#else
constexpr bool kPrefetchRows = false;
#endif

// GEMV blocks: byte `off` of the next block's NR rows (rows `row_bytes` apart) into L2, once per cache line.
template <int NR, typename B>
static inline void prefetch_next_block(const B* const* rows, int64_t row_bytes, int64_t off) {
  if (off % 64 == 0)
    for (int n = 0; n < NR; ++n)
      prefetch_l2(rows[n] + NR * row_bytes + off);
}

// acc(m, n) += x rows [m0, m0 + MR) . W rows [n0, n0 + NR) over columns [c0, c1) (whole groups).
template <int P, int MR, int NR>
static void block4(const Job& j, int64_t m0, int64_t n0, int64_t nl0, int64_t c0, int64_t c1, bool first) {
  constexpr int CE = L * P;
  const QWeight& w = *j.w;
  const uint8_t* rows[NR];
  for (int n = 0; n < NR; ++n) rows[n] = static_cast<const uint8_t*>(w.data) + (n0 + n) * (w.k / 2);
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = j.xp + (m0 + m) * j.k;
  V a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n] = first ? V::zero() : V::load(j.acc + ((m0 + m) * j.nt + nl0 + n) * L);
  const int64_t gsize = w.group, gfirst = c0 / gsize, ng = (c1 - c0) / gsize;
  float* sc = j.sz;
  float* zc = j.sz + NR * ng;
  for (int n = 0; n < NR; ++n) fill_scales(w, j.groups, n0 + n, gfirst, ng, sc + n * ng, zc + n * ng);
  for (int64_t gi = 0, g0 = c0; g0 < c1; ++gi, g0 += gsize) {
    typename Codec::Table t[NR];
    for (int n = 0; n < NR; ++n) t[n] = Codec::table(j.table_base, zc[n * ng + gi], sc[n * ng + gi]);
    for (int64_t c = g0; c < g0 + gsize; c += CE) {
      typename Codec::Raw r[NR];
      if constexpr (MR <= 4 && kPrefetchRows) prefetch_next_block<NR>(rows, w.k / 2, c / 2);  // GEMV
      for (int n = 0; n < NR; ++n) r[n] = Codec::template raw<P>(rows[n] + c / 2);
      static_for<0, P>([&](auto jj) {
        constexpr int J = decltype(jj)::value;
        V wv[NR];
        for (int n = 0; n < NR; ++n) wv[n] = Codec::template decode<J>(r[n], t[n]);
        for (int m = 0; m < MR; ++m) {
          const V xv = V::load(xr[m] + c + J * L);
          for (int n = 0; n < NR; ++n) a[m][n] = fmadd(xv, wv[n], a[m][n]);
        }
      });
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n].store(j.acc + ((m0 + m) * j.nt + nl0 + n) * L);
}

template <int MR, int NR>
static void block8(const Job& j, int64_t m0, int64_t n0, int64_t nl0, int64_t c0, int64_t c1, bool first) {
  const QWeight& w = *j.w;
  const int8_t* rows[NR];
  for (int n = 0; n < NR; ++n) rows[n] = static_cast<const int8_t*>(w.data) + (n0 + n) * w.k;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = j.xp + (m0 + m) * j.k;
  V a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n] = first ? V::zero() : V::load(j.acc + ((m0 + m) * j.nt + nl0 + n) * L);
  for (int64_t c = c0; c < c1; c += L) {
    if constexpr (MR <= 4 && kPrefetchRows) prefetch_next_block<NR>(rows, w.k, c);  // GEMV
    V wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = Codec::int8(rows[n] + c);
    for (int m = 0; m < MR; ++m) {
      const V xv = V::load(xr[m] + c);
      for (int n = 0; n < NR; ++n) a[m][n] = fmadd(xv, wv[n], a[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) a[m][n].store(j.acc + ((m0 + m) * j.nt + nl0 + n) * L);
}

template <int P, int MR, int NR>
static void block(const Job& j, int64_t m0, int64_t n0, int64_t nl0, int64_t c0, int64_t c1, bool first) {
  if constexpr (P == 1) block8<MR, NR>(j, m0, n0, nl0, c0, c1, first);
  else block4<P, MR, NR>(j, m0, n0, nl0, c0, c1, first);
}

// Register blocking per ISA: accumulators MR * NR within the vector registers with room for the decode.
// kMaxP: the widest nibble packing per lane used. On AVX-512, P = 2 (bytes zero-extended, one shift per
// two permutes) measured as fast as P = 4 and faster than P = 8 from memory (4096 x 4096 int4, M = 1,
// 1.7 vs 2.2 ms on one thread), and fewer instantiations.
#if defined(LLMKERN_ISA_AVX512)
constexpr int kBigMR = 8, kBigNR = 3, kSmallNR = 4, kMaxP = 2;
#elif defined(LLMKERN_ISA_AVX2)
constexpr int kBigMR = 4, kBigNR = 2, kSmallNR = 2, kMaxP = 4;
#else
constexpr int kBigMR = 4, kBigNR = 2, kSmallNR = 2, kMaxP = 4;
#endif

// The row tiles of NT rows each that next() hands out (-1: none left), for MR rows of x per block (x padded
// to mp rows).
template <int P, int MR, int NR, typename T, typename Next>
static void run_tiles(const QLinearParams& p, const float* xp, int64_t mp, int64_t nt, int64_t kc, Next&& next) {
  const QWeight& w = p.w;
  const int64_t k = w.k;
  const int64_t kmain = P == 1 ? k / L * L : k;
  Scratch<float> acc(size_t(mp * nt * L));
  Scratch<float> sz(size_t(2 * std::max(NR, 1) * (P == 1 ? 1 : (std::min(kc, k) + w.group - 1) / w.group)));
  Job j{&w, w.format == QFormat::nf4 ? w.code : kIota, xp, k, kmain, P == 1 ? 1 : k / w.group, acc.ptr, sz.ptr, nt};
  for (int64_t tile; (tile = next()) >= 0;) {
    const int64_t n_lo = tile * nt, n_hi = std::min(w.n, n_lo + nt);
    const int64_t rows = n_hi - n_lo, rows_full = rows / NR * NR;
    if (kmain == 0) std::memset(acc.ptr, 0, sizeof(float) * size_t(mp * nt * L));
    for (int64_t c0 = 0; c0 < kmain; c0 += kc) {
      const int64_t c1 = std::min(kmain, c0 + kc);
      for (int64_t m0 = 0; m0 < mp; m0 += MR) {
        for (int64_t nl = 0; nl < rows_full; nl += NR) block<P, MR, NR>(j, m0, n_lo + nl, nl, c0, c1, c0 == 0);
        for (int64_t nl = rows_full; nl < rows; ++nl) block<P, MR, 1>(j, m0, n_lo + nl, nl, c0, c1, c0 == 0);
      }
    }
    // Epilogue: reduce, int8 row scale and k tail, bias, round once to T.
    for (int64_t m = 0; m < p.m; ++m) {
      const T* x = static_cast<const T*>(p.x) + m * p.x_stride;
      T* out = static_cast<T*>(p.out) + m * p.out_stride;
      for (int64_t nl = 0; nl < rows; ++nl) {
        const int64_t n = n_lo + nl;
        float s = V::load(acc.ptr + (m * nt + nl) * L).reduce_add();
        if constexpr (P == 1) {
          const int8_t* q = static_cast<const int8_t*>(w.data) + n * k;
          for (int64_t c = kmain; c < k; ++c) s += to_float(x[c]) * float(q[c]);
          s *= group_scale(w, 1, n, 0).s;
        }
        if (p.bias) s += to_float(static_cast<const T*>(p.bias)[n]);
        ScalarVec<float>{s}.store(out + n);
      }
    }
  }
}

// x rows converted to fp32 [mp][k], zero rows past m; 4-bit: permuted per chunk of L * P.
template <typename T>
static void prepare_x(const QLinearParams& p, int P, float* xp, int64_t mp) {
  const int64_t k = p.w.k;
  const int64_t ce = int64_t(L) * P;
  parallel_for(0, mp, grain_for(k * 8), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      float* dst = xp + m * k;
      if (m >= p.m) {
        std::memset(dst, 0, sizeof(float) * size_t(k));
        continue;
      }
      const T* x = static_cast<const T*>(p.x) + m * p.x_stride;
      if (P == 1) {
        for_each_chunk<V>(k, [&](auto v, int64_t i) { decltype(v)::load(x + i).store(dst + i); });
        continue;
      }
      for (int64_t c = 0; c < k; c += ce)
        for (int jn = 0; jn < P; ++jn)
          for (int l = 0; l < L; ++l) dst[c + jn * L + l] = to_float(x[c + l * P + (jn ^ 1)]);
    }
  });
}

template <int P, int MR, int NR, typename T>
static void fast_with(const QLinearParams& p, int64_t mp, int64_t kc) {
  const int64_t k = p.w.k;
  Scratch<float> xp(size_t(mp * k));
  prepare_x<T>(p, P, xp.ptr, mp);
  // Tiles of nt rows: about 16 register blocks, and enough tiles for every thread.
  int64_t nt = NR * 16;
  const int64_t threads = std::max(1, max_threads());
  while (nt > NR && (p.w.n + nt - 1) / nt < 4 * threads) nt -= NR;
  const int64_t tiles = (p.w.n + nt - 1) / nt;
  parallel_claim(tiles, 1, threads, [&](auto& claim) {
    run_tiles<P, MR, NR, T>(p, xp.ptr, mp, nt, kc, [&] {
      int64_t t0, t1;
      return claim(t0, t1) ? t0 : int64_t(-1);
    });
  });
}

constexpr int64_t kKChunk = 1024;

template <int P, typename T>
static void fast_p(const QLinearParams& p) {
  const int64_t m = p.m;
  // k chunk: whole groups (4-bit), about 1024 columns, so one MR block of x stays in L1.
  const int64_t unit = P == 1 ? L : p.w.group;
  const int64_t kc = m <= 4 ? p.w.k : std::max<int64_t>(unit, kKChunk / unit * unit);
  switch (m) {
    case 1: return fast_with<P, 1, kSmallNR, T>(p, 1, kc);
    case 2: return fast_with<P, 2, kSmallNR, T>(p, 2, kc);
    case 3: return fast_with<P, 3, kSmallNR, T>(p, 3, kc);
    case 4: return fast_with<P, 4, kSmallNR, T>(p, 4, kc);
    default: return fast_with<P, kBigMR, kBigNR, T>(p, (m + kBigMR - 1) / kBigMR * kBigMR, kc);
  }
}

// ---------------------------------------------------------------- AVX-512 int16 GEMV (M <= gemv_rows<T>())
//
// int4, nf4 and int8 at few rows of x (gemv_rows). x is quantized once per call to int16 with one fp32 scale per
// block of XB = max(group, 128) elements (int8: 128; xs = max|x| / kXMax (32639) over the block: error <= xs / 2 per
// element, ~1e-5 of the block's largest), and each chunk of 128 weights of a row is dotted with it by vpmaddwd,
// 32 products a µop (fp32 FMA: 16). A 4-bit chunk is one 64-byte load of 32 words; nibble j of word w is element
// 4w + (j ^ 1) of the chunk (high nibble first), so x is stored as four permuted vectors of 32 int16 per chunk
// and each nibble comes out by one shift:
// - int4: and with 15 after the shift; q * xq (<= 15 * 32767) sums exactly in int32. Zero points leave the
//   loop: y = sum_g s_g (sum q x - z_g sum x) with sum_g x of the quantized x precomputed per call.
// - int4 with one or two rows of x, on AVX512_VNNI ("bytes"): each x16 is split into a high and a low signed
//   byte, x16 = 256 h + l (hence |x16| <= kXMax = 32639, so h fits), and the chunk's 64 bytes give two vectors of
//   nibbles as bytes (and; shift and and). vpdpbusd takes 64 byte products a µop; the high bytes' sum is shifted by
//   8 before the low bytes' products add in, exactly, so the sums equal the words'. At one row, 10 vector µops per
//   64 weight bytes against the words' 12, which bound the GEMV beside the memory stream (Emerald Rapids: 4096 x
//   4096 with the weight in L2, 44 -> 35 us; from memory 1.01-1.09x, two rows 1.01-1.03x). Each further row costs 7
//   µops against the words' 6, so from three rows the words stay.
// - nf4: vpermw looks the nibble up in the 16 codes as int16 (code * 8192 / max|code|; vpermw reads 5 index
//   bits, so the table is held twice and needs no and). Rounding the codes costs <= max|code| / 16384 per
//   weight (6e-5 of the block's absmax for NF4), and 8 products <= 8192 * 32767 each stay below 2^31.
//   Measured on L2-resident weights (one core): 12 cycles per 128 weights and row vs 17 for the fp32 table
//   decode (shift, vpermps, FMA per 16 weights, vpmovzxbd per 32), whose vpermps + vpmovzxbd saturate port 5.
// - int8: a chunk is 128 bytes, sign-extended 32 at a time (vpmovsxbw) in natural order, x likewise; 8 products
//   <= 128 * 32767 each stay below 2^31. Each chunk is its own "group" with s_g = 1; the row scale multiplies the
//   sum once. The fp32 path it replaces converted every 16 weights to fp32 (vpmovsxbd + vcvtdq2ps) for 16 FMAs
//   per row of x: at M >= 2 compute-bound (4096 x 4096, M = 4: 34% of the read rate).
// Per 128 weights and row: decode, 4 vpmaddwd, 3 adds, cvt and one fp32 FMA with s_g * xs (nf4: absmax_g *
// xs * max|code| / 8192). Lane l of a 4-bit chunk holds elements 8l .. 8l + 7, so groups of 32 or 64 take their
// scale per lane (one permute) and groups that are multiples of 128 one broadcast. Blocks of R rows;
// software prefetch of the next block's rows into L2. Threads claim runs
// of blocks from a shared counter. x with a non-finite element, groups that are not 32, 64 or a multiple of
// 128, or non-finite nf4 codes take the fp32 path.
#if defined(LLMKERN_ISA_AVX512)

constexpr int kQC = 128;           // chunk of weights per vpmaddwd pass (4-bit: 64 bytes, int8: 128)
constexpr float kXMax = 32639.f;   // the largest |x16|: 256 * 127 + 127, so x16's high byte (bytes path) fits int8
constexpr float kCodeOne = 8192.f;  // int16 value of the largest |nf4 code|

struct XqGemv {
  const QWeight* w;
  int64_t group;        // of the scales of x and W: the 4-bit group, int8 kQC
  int64_t nch, groups;  // nch = ceil(k / 128), groups = ceil(k / group)
  const int16_t* xq;    // [m][nch][128], permuted per chunk (4-bit) or natural (int8), zero past k
  const float* xsg;     // [m][groups + 16]: the x scale of each group's block (zero padded)
  const float* sx;      // [m][groups + 16]: sum over each group of the quantized x (zero padded)
  float code_scale;     // nf4: max|code| / kCodeOne (a code's value per int16 unit)
  bool bytes;           // int4, one or two rows of x, AVX512_VNNI: xq holds x's high and low bytes (see above)
  alignas(64) int16_t code16[32];  // nf4: the codes in int16 units, twice
};

template <typename T>
static bool quantize_x16(const QLinearParams& p, const XqGemv& j, int16_t* xq, float* xsg, float* sx) {
  const int64_t k = p.w.k, G = j.group, xb = std::max<int64_t>(G, kQC), gs = j.groups + 16;
  const bool natural = p.w.format == QFormat::int8;
  alignas(64) float buf[kQC];
  alignas(64) int32_t qi[kQC];
  // The permutations of a chunk's 128 int16 (as two vectors of 64): the words' nibble orders (see above) and the
  // bytes' even and odd elements, made once a call.
  __m512i word_idx[4], byte_idx[2];
  {
    alignas(64) int16_t id[32];
    for (int jn = 0; jn < 4; ++jn) {  // word wd of order jn: element 4 wd + (jn ^ 1) of its half
      for (int wd = 0; wd < 32; ++wd) id[wd] = int16_t(4 * (wd % 16) + (jn ^ 1));
      word_idx[jn] = _mm512_load_si512(id);
    }
    for (int e = 0; e < 2; ++e) {  // element 2 i + e
      for (int i = 0; i < 32; ++i) id[i] = int16_t(2 * i + e);
      byte_idx[e] = _mm512_load_si512(id);
    }
  }
  for (int64_t m = 0; m < p.m; ++m) {
    const T* x = static_cast<const T*>(p.x) + m * p.x_stride;
    float* xs_m = xsg + m * gs;
    float* sx_m = sx + m * gs;
    std::memset(xs_m, 0, sizeof(float) * size_t(gs));
    std::memset(sx_m, 0, sizeof(float) * size_t(gs));
    for (int64_t b0 = 0; b0 < k; b0 += xb) {
      const int64_t len = std::min(xb, k - b0);
      // NaN is flagged on its own: vmaxps (and std::max) return one operand, so a NaN would be dropped.
      __m512 amax = _mm512_setzero_ps();
      __mmask16 nan = 0;
      int64_t i = 0;
      for (; i + 16 <= len; i += 16) {
        const __m512 v = _mm512_abs_ps(V::load(x + b0 + i).v);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        amax = _mm512_max_ps(amax, v);
      }
      float a = _mm512_reduce_max_ps(amax);
      for (; i < len; ++i) {
        const float v = std::fabs(to_float(x[b0 + i]));
        nan |= std::isnan(v);
        a = std::max(a, v);
      }
      if (nan || !(a <= 3.4e38f)) return false;  // NaN or inf: the fp32 path propagates them
      const float xs = a / kXMax, inv = a > 0.f ? kXMax / a : 0.f;
      const __m512 iv = _mm512_set1_ps(inv);
      for (int64_t c0 = b0; c0 < b0 + len; c0 += kQC) {  // chunks of the block
        const int64_t cl = std::min<int64_t>(kQC, k - c0);
        int64_t e = 0;
        for (; e + 16 <= cl; e += 16) _mm512_store_ps(buf + e, V::load(x + c0 + e).v);
        for (; e < kQC; ++e) buf[e] = e < cl ? to_float(x[c0 + e]) : 0.f;
        __m512i w16[4];  // the chunk as 128 int16 in k order
        for (int t = 0; t < 4; ++t) {  // |x * inv| <= kXMax (rounded): no clamp needed
          const __m512i a0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(buf + 32 * t), iv));
          const __m512i a1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(buf + 32 * t + 16), iv));
          _mm512_store_si512(qi + 32 * t, a0);
          _mm512_store_si512(qi + 32 * t + 16, a1);
          w16[t] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a0)), _mm512_cvtepi32_epi16(a1), 1);
        }
        int16_t* dst = xq + (m * j.nch + c0 / kQC) * kQC;
        for (int t = 0; natural && t < 4; ++t) _mm512_store_si512(dst + 32 * t, w16[t]);
        if (j.bytes) {  // dst bytes [h][e] then [l][e] for e = even, odd: byte b is element 2 b + e's high / low byte
          int8_t* db = reinterpret_cast<int8_t*>(dst);
          for (int e = 0; e < 2; ++e) {
            for (int half = 0; half < 2; ++half) {  // elements 64 half + 2 i + e, i < 32
              const __m512i v = _mm512_permutex2var_epi16(w16[2 * half], byte_idx[e], w16[2 * half + 1]);
              const __m512i h = _mm512_srai_epi16(_mm512_add_epi16(v, _mm512_set1_epi16(128)), 8);
              const __m512i l = _mm512_sub_epi16(v, _mm512_slli_epi16(h, 8));
              _mm256_store_si256(reinterpret_cast<__m256i*>(db + 64 * e + 32 * half), _mm512_cvtepi16_epi8(h));
              _mm256_store_si256(reinterpret_cast<__m256i*>(db + 128 + 64 * e + 32 * half), _mm512_cvtepi16_epi8(l));
            }
          }
        }
        for (int jn = 0; !natural && !j.bytes && jn < 4; ++jn) {  // dst[jn][wd] = chunk[4 wd + (jn ^ 1)]
          const __m512i lo = _mm512_permutex2var_epi16(w16[0], word_idx[jn], w16[1]);
          const __m512i hi = _mm512_permutex2var_epi16(w16[2], word_idx[jn], w16[3]);
          _mm512_store_si512(dst + 32 * jn, _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
        }
        const int64_t gl = std::min<int64_t>(G, kQC);  // a group (or a group's part) in this chunk
        for (int64_t g0 = 0; g0 < cl; g0 += gl) {
          __m512i sv = _mm512_load_si512(qi + g0);
          for (int64_t t = g0 + 16; t < g0 + gl; t += 16) sv = _mm512_add_epi32(sv, _mm512_load_si512(qi + t));
          const int64_t g = (c0 + g0) / G;
          sx_m[g] += float(_mm512_reduce_add_epi32(sv)) * xs;
          xs_m[g] = xs;
        }
      }
    }
  }
  return true;
}

// absmax of nf4 blocks [b, b + 16) (lanes outside mk: 0), nested ones each rounded as in nf4_absmax.
static inline __m512 nf4_absmax16(const QWeight& w, int64_t b, __mmask16 mk) {
  if (w.absmax) return _mm512_maskz_loadu_ps(mk, w.absmax + b);
  const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, w.nested_q + b));
  const __m512 c = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, q, w.nested_code, 4);
  // nested_absmax[(b + i) / 256]: one value, or two when the 16 blocks cross a multiple of 256.
  __m512 a2 = _mm512_set1_ps(w.nested_absmax[b / 256]);
  const int cross = int(256 - (b & 255));  // lanes >= cross take the next value
  if (cross < 16 && (mk >> cross))
    a2 = _mm512_mask_mov_ps(a2, __mmask16(mk & ~((1u << cross) - 1)), _mm512_set1_ps(w.nested_absmax[b / 256 + 1]));
  return _mm512_maskz_add_ps(mk, _mm512_mul_ps(c, a2), _mm512_set1_ps(w.nested_offset));
}

// sv[m][g] = s_g * xs(m, g) for groups [0, groups) of row r (zero padded), and corr[m] = 16 partial sums of
// sum_g s_g z_g sx[m][g], 16 groups a step (nf4: s_g = absmax_g * code_scale, no zero point: corr = 0).
template <int MR, QFormat F>
static inline void row_scales(const XqGemv& j, int64_t r, float* sv, int64_t svs, __m512* corr) {
  const QWeight& w = *j.w;
  const int64_t groups = j.groups, b = r * groups, gs = groups + 16;
  for (int m = 0; m < MR; ++m) corr[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mk = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
    __m512 s;
    if constexpr (F == QFormat::nf4) {
      s = _mm512_mul_ps(nf4_absmax16(w, b + g, mk), _mm512_set1_ps(j.code_scale));
    } else {
      switch (w.scales_dtype) {
        case DType::bf16:
          s = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(w.scales) + b + g)), 16));
          break;
        case DType::f16: s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(w.scales) + b + g)); break;
        case DType::f32: s = _mm512_maskz_loadu_ps(mk, static_cast<const float*>(w.scales) + b + g); break;
        default: {
          alignas(64) float t[16] = {};
          for (int i = 0; i < 16 && g + i < groups; ++i) t[i] = float(static_cast<const double*>(w.scales)[b + g + i]);
          s = _mm512_load_ps(t);
        }
      }
    }
    for (int m = 0; m < MR; ++m) _mm512_storeu_ps(sv + m * svs + g, _mm512_mul_ps(s, _mm512_loadu_ps(j.xsg + m * gs + g)));
    if constexpr (F == QFormat::int4) {
      const __m512 z = w.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, w.zeros + b + g)))
                               : _mm512_set1_ps(8.f);
      const __m512 sz = _mm512_mul_ps(s, z);
      for (int m = 0; m < MR; ++m) corr[m] = _mm512_fmadd_ps(sz, _mm512_loadu_ps(j.sx + m * gs + g), corr[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(sv + m * svs + groups, _mm512_setzero_ps());
}

// res[m][i] = x_m . W row (n0 + i), i < R, before bias. sbuf: R * MR * (groups + 32) floats. Bytes: j.bytes (int4).
template <int MR, int R, QFormat F, bool Bytes>
static void xq_rows(const XqGemv& j, int64_t n0, int64_t n_next, float* sbuf, float (*res)[R]) {
  const QWeight& w = *j.w;
  constexpr bool kInt8 = F == QFormat::int8;
  // int8: s_g = 1 and no zero points, so sv is x's own scales (j.xsg, rows groups + 16 apart) and corr = 0.
  const int64_t G = j.group, svs = kInt8 ? j.groups + 16 : j.groups + 32;
  constexpr int64_t CB = kInt8 ? kQC : kQC / 2;  // bytes per chunk of a row
  const int64_t rb = kInt8 ? w.k : w.k / 2;      // bytes per row
  const uint8_t* rows[R];
  const float* sv[R];
  __m512 corr[R][MR];
  // The next block's scales, beside its rows: the first loads of a block's absmax were the nf4 GEMV's largest stall
  // from memory (M = 1, in process: 0.370 -> 0.352 ms at 4096 x 4096, 0.943 -> 0.871 at 11008 x 4096).
  if constexpr (!kInt8)
    if (n_next >= 0) prefetch_scales(w, n_next * j.groups, std::min<int64_t>(R, w.n - n_next) * j.groups);
  const uint8_t* next = n_next >= 0 ? static_cast<const uint8_t*>(w.data) + n_next * rb : nullptr;
  for (int r = 0; r < R; ++r) {
    rows[r] = static_cast<const uint8_t*>(w.data) + (n0 + r) * rb;
    if constexpr (kInt8) {
      sv[r] = j.xsg;
      for (int m = 0; m < MR; ++m) corr[r][m] = _mm512_setzero_ps();
    } else {
      sv[r] = sbuf + r * MR * svs;
      row_scales<MR, F>(j, n0 + r, sbuf + r * MR * svs, svs, corr[r]);
    }
  }
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i gidx = _mm512_srli_epi32(lane, G == 32 ? 2 : 3);  // a lane's group within the chunk
  const __m512i m15 = _mm512_set1_epi16(15), m15b = _mm512_set1_epi8(15);
  const __m512i codes = _mm512_load_si512(j.code16);
  __m512 acc[MR][R];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  // si: the group of the chunk (G >= 128) or of its lane 0 (G < 128); valid: its weights within k (the last
  // chunk's may be fewer than kQC: the rest are masked off and read as 0, and their x is 0, xq being zero past k).
  // Inlined at every call: out of line (GCC 12 kept it so), acc lived on the stack, a load and store per FMA.
  auto chunk = [&](int64_t ci, int64_t si, int64_t valid) __attribute__((always_inline)) {
    const bool masked = valid < kQC;
    // Masks of the partial last chunk's bytes (unused otherwise): 4-bit one of 64 bytes, int8 four of 32.
    const __mmask64 lm4 = (__mmask64(1) << (valid / 2)) - 1;
    __mmask32 lm8[4];
    for (int t = 0; t < 4; ++t) {
      const int64_t n = std::clamp<int64_t>(valid - 32 * t, 0, 32);
      lm8[t] = n == 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1);
    }
    __m512i x[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int q = 0; q < 4; ++q) x[m][q] = _mm512_load_si512(j.xq + (m * j.nch + ci) * kQC + 32 * q);
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = rows[r] + ci * CB;
      // The same chunk of the row in the block this thread takes next (n_next), one block ahead whatever k is.
      // Into L2 (prefetcht1): from memory, 27-30 GB/s against 17-20 GB/s into L1 (Zen 4, 4096 and 11008 x 4096,
      // M = 1, side by side); two or four blocks ahead measured no faster.
      if (!masked && next) prefetch_l2_span(next + r * rb + ci * CB, CB);
      __m512i q0, q1, q2, q3;
      if constexpr (Bytes) {  // q0: the high nibbles (even elements), q1: the low ones, as bytes
        const __m512i raw = masked ? _mm512_maskz_loadu_epi8(lm4, src) : _mm512_loadu_si512(src);
        q0 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m15b);
        q1 = _mm512_and_si512(raw, m15b);
      } else if constexpr (kInt8) {
        __m512i q[4];
        for (int t = 0; t < 4; ++t) {
          const __m256i b = masked ? _mm256_maskz_loadu_epi8(lm8[t], src + 32 * t)
                                   : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * t));
          q[t] = _mm512_cvtepi8_epi16(b);
        }
        q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
      } else {
        const __m512i raw = masked ? _mm512_maskz_loadu_epi8(lm4, src) : _mm512_loadu_si512(src);
        if constexpr (F == QFormat::nf4) {
          q0 = _mm512_permutexvar_epi16(raw, codes);
          q1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 4), codes);
          q2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 8), codes);
          q3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 12), codes);
        } else {
          q0 = _mm512_and_si512(raw, m15);
          q1 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m15);
          q2 = _mm512_and_si512(_mm512_srli_epi16(raw, 8), m15);
          q3 = _mm512_srli_epi16(raw, 12);
        }
      }
      for (int m = 0; m < MR; ++m) {
#if defined(LLMKERN_ISA_AVX512BF16)  // AVX512_VNNI: vpdpwssd adds the pair products into d itself
        __m512i d;
        if constexpr (Bytes) {  // x[m]: high bytes of the even, odd elements, then the low bytes
          d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q0, x[m][0]), q1, x[m][1]);
          d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(d, 8), q0, x[m][2]), q1, x[m][3]);
        } else {
          d = _mm512_madd_epi16(q0, x[m][0]);
          d = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_dpwssd_epi32(d, q1, x[m][1]), q2, x[m][2]), q3, x[m][3]);
        }
#else
        static_assert(!Bytes, "the bytes path needs AVX512_VNNI");
        const __m512i d = _mm512_add_epi32(_mm512_add_epi32(_mm512_madd_epi16(q0, x[m][0]), _mm512_madd_epi16(q1, x[m][1])),
                                           _mm512_add_epi32(_mm512_madd_epi16(q2, x[m][2]), _mm512_madd_epi16(q3, x[m][3])));
#endif
        const float* s = sv[r] + m * svs + si;
        const __m512 sc = G >= kQC ? _mm512_set1_ps(*s) : _mm512_permutexvar_ps(gidx, _mm512_loadu_ps(s));
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[m][r]);
      }
    }
  };
  const int64_t full = w.k / kQC, tail = w.k - full * kQC;
  if (G == kQC) {
    for (int64_t ci = 0; ci < full; ++ci) chunk(ci, ci, kQC);
    if (tail) chunk(full, full, tail);  // int8 (the 4-bit formats' k is a multiple of G here)
  } else if (G > kQC) {
    const int64_t cpg = G / kQC;  // k % G == 0: no tail
    for (int64_t g = 0, ci = 0; g < j.groups; ++g)
      for (int64_t c = 0; c < cpg; ++c, ++ci) chunk(ci, g, kQC);
  } else {
    const int64_t gpc = kQC / G;
    for (int64_t ci = 0; ci < full; ++ci) chunk(ci, ci * gpc, kQC);
    if (tail) chunk(full, full * gpc, tail);
  }
  for (int r = 0; r < R; ++r) {
    const float row_scale = kInt8 ? scale_at(w, n0 + r) : 1.f;
    for (int m = 0; m < MR; ++m) res[m][r] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[m][r], corr[r][m])) * row_scale;
  }
}

// x rows [m0, m0 + MR) against W rows [n0, n0 + R) (fewer at the end of W): written to out, bias added.
template <int MR, int R, QFormat F, typename T, bool Bytes = false>
static void xq_block(const QLinearParams& p, const XqGemv& j, int64_t m0, int64_t n0, int64_t n_next, float* sbuf) {
  const QWeight& w = p.w;
  XqGemv jm = j;  // the group's rows of the quantized x
  const int64_t gs = j.groups + 16;
  jm.xq += m0 * j.nch * kQC, jm.xsg += m0 * gs, jm.sx += m0 * gs;
  const int rr = int(std::min<int64_t>(R, w.n - n0));
  float res[MR][R];
  if (rr == R) {
    xq_rows<MR, R, F, Bytes>(jm, n0, n_next, sbuf, res);
  } else {
    float r1[MR][1];
    for (int r = 0; r < rr; ++r) {
      xq_rows<MR, 1, F, Bytes>(jm, n0 + r, r + 1 < rr ? n0 + r + 1 : -1, sbuf, r1);
      for (int m = 0; m < MR; ++m) res[m][r] = r1[m][0];
    }
  }
  for (int m = 0; m < MR; ++m) {
    T* out = static_cast<T*>(p.out) + (m0 + m) * p.out_stride;
    for (int r = 0; r < rr; ++r) {
      float v = res[m][r];
      if (p.bias) v += to_float(static_cast<const T*>(p.bias)[n0 + r]);
      ScalarVec<float>{v}.store(out + n0 + r);
    }
  }
}

// Blocks of R rows of W, each against every row of x in groups of up to 4 (the accumulators and x of a group fill
// the registers): the block's weight bytes come from memory for the first group and from L1 for the others.
template <int R, QFormat F, typename T, bool Bytes = false>
static void xq_gemv(const QLinearParams& p, const XqGemv& j) {
  const QWeight& w = p.w;
  const int64_t nb = (w.n + R - 1) / R;
  // Threads claim runs of `step` blocks (parallel_claim).
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, w.k));  // blocks worth a thread
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(max_threads(), nb / grain));
  const int64_t step = std::max<int64_t>(1, std::min<int64_t>(16, nb / (8 * threads)));
  parallel_claim(nb, step, threads, [&](auto& claim) {
    Scratch<float> sbuf(size_t(R * 4 * (j.groups + 32)));
    int64_t b0, b1;
    for (bool more = claim(b0, b1); more;) {
      int64_t c0 = -1, c1 = -1;
      for (int64_t b = b0; b < b1; ++b) {
        // The block this thread takes next, whose rows the current one prefetches: the next run is claimed before
        // the run's last block, so a run starts on prefetched rows too. Before, a run's last block prefetched the
        // block after it (another thread's) and each run began cold: M = 1 to 4, from memory, 1.03-1.09x now.
        if (b + 1 == b1) more = claim(c0, c1);
        const int64_t n_next = (b + 1 < b1 ? b + 1 : more ? c0 : -1) * R;
        int64_t m0 = 0;
        if constexpr (R == 2)
          for (; p.m - m0 >= 3; m0 += 4) {
            if (p.m - m0 >= 4) xq_block<4, R, F, T>(p, j, m0, b * R, n_next, sbuf.ptr);
            else xq_block<3, R, F, T>(p, j, m0, b * R, n_next, sbuf.ptr);
          }
        if (p.m - m0 == 2) xq_block<2, R, F, T, Bytes>(p, j, m0, b * R, n_next, sbuf.ptr);
        else if (p.m - m0 == 1) xq_block<1, R, F, T, Bytes>(p, j, m0, b * R, n_next, sbuf.ptr);
      }
      b0 = c0, b1 = c1;
    }
  });
}

// Rows of W per block: 4 while x has at most 2 rows, else 2 (accumulators MR * R and x (4 MR) in registers); 8 for
// one row of x as bytes (from memory 1.01-1.07x against 4; 16 no faster, and at two rows 8 measured 0.93-1.02x).
template <QFormat F, typename T>
static void gemv_xq_with(const QLinearParams& p, const XqGemv& j) {
#if defined(LLMKERN_ISA_AVX512BF16)
  if constexpr (F == QFormat::int4)
    if (j.bytes) return p.m == 1 ? xq_gemv<8, F, T, true>(p, j) : xq_gemv<4, F, T, true>(p, j);
#endif
  if (p.m <= 2) xq_gemv<4, F, T>(p, j);
  else xq_gemv<2, F, T>(p, j);
}

template <typename T>
static bool gemv_xq(const QLinearParams& p) {
  const QWeight& w = p.w;
  const bool int8 = w.format == QFormat::int8, nf4 = w.format == QFormat::nf4;
  const int64_t G = int8 ? kQC : w.group;
  if (!int8 && (!(G == 32 || G == 64 || G % kQC == 0) || w.k % G)) return false;
  const int64_t nch = (w.k + kQC - 1) / kQC, groups = (w.k + G - 1) / G;
  Scratch<int16_t> xq(size_t(p.m * nch * kQC));
  Scratch<float> xsg(size_t(p.m * (groups + 16))), sx(size_t(p.m * (groups + 16)));
  XqGemv j{&w, G, nch, groups, xq.ptr, xsg.ptr, sx.ptr, 1.f, false, {}};
#if defined(LLMKERN_ISA_AVX512BF16)
  j.bytes = w.format == QFormat::int4 && p.m <= 2;
#endif
  if (nf4) {
    float cmax = 0.f;
    for (int i = 0; i < 16; ++i) {
      if (!std::isfinite(w.code[i])) return false;
      cmax = std::max(cmax, std::fabs(w.code[i]));
    }
    if (cmax == 0.f) return false;
    for (int i = 0; i < 32; ++i) j.code16[i] = int16_t(std::lrint(w.code[i % 16] * (kCodeOne / cmax)));
    j.code_scale = cmax / kCodeOne;
  }
  if (!quantize_x16<T>(p, j, xq.ptr, xsg.ptr, sx.ptr)) return false;
  switch (w.format) {
    case QFormat::nf4: gemv_xq_with<QFormat::nf4, T>(p, j); break;
    case QFormat::int4: gemv_xq_with<QFormat::int4, T>(p, j); break;
    case QFormat::int8: gemv_xq_with<QFormat::int8, T>(p, j); break;
  }
  return true;
}

#else

template <typename T>
static bool gemv_xq(const QLinearParams&) { return false; }

#endif

// Rows of x up to which the int16 GEMV (x in groups of 4 against each block of W) runs, measured on 4096 x 4096 int4
// and nf4 (Zen 4): at M = 5..15 it is 2.1-3.1x faster than fast() (which decodes W once per 4 rows), and it beats
// the tile GEMM up to M = 15 when that runs over bf16 pairs (bf16 x with AVX512_BF16: 2.26 vs 2.76 ms at M = 12,
// 2.99 vs 2.80 at M = 16) and up to at least M = 64 when it runs in fp32 (10.8 vs 12.8 ms). fp32 x stays at
// M <= 4: its int16 copy (rel. error ~1e-5 of a block's largest element) is below bf16 / fp16 rounding but not
// below fp32's, and beyond the GEMV shapes the fp32 paths are exact to PyTorch's rule. int8 sits at the same
// boundaries (4096 x 4096, in process, GEMV vs the paths after it): bf16 x on avx512bf16 2.28-2.67 vs 2.01-2.37 ms at
// M = 16, 3.55-3.83 vs 3.37-3.65 at M = 24; on plain avx512 11.3 vs 13.1 ms at M = 64; fp32 x at M = 1, 2, 4 0.67,
// 0.68, 0.99 vs 0.72, 1.20, 2.14 ms. Zen 5 issues the bf16 pairs' products at twice Zen 4's rate, and there the GEMM
// beat the GEMV from M = 12 (int4 / int8 / nf4 at the three issue shapes, in process, GEMV time / GEMM time: M = 12
// 1.05-1.32, 13 1.09-1.36, 15 1.16-1.41; M = 11 0.91-1.13, M = 10 0.79-1.06); the 4-bit weights' code_tiles from M = 9
// (int4 / nf4, GEMV / code_tiles: M = 9 1.11-1.26, 10 1.20-1.39, 11 1.26-1.49; M = 8 0.97-1.05).
template <typename T>
static int64_t gemm_rows(const QWeight& w) {
  if (!attn::kPairProducts<T> || avx512_double_pumped()) return 16;
  return qlinear_code_tiles(w) ? 9 : 12;
}

template <typename T>
static int64_t gemv_rows(const QWeight& w) {
  if constexpr (std::is_same_v<T, float>) return 4;
  else return attn::kPairProducts<T> ? gemm_rows<T>(w) - 1 : 64;
}

template <typename T>
static void fast(const QLinearParams& p) {
  if (p.w.format == QFormat::int8) return fast_p<1, T>(p);
  const int64_t g = p.w.group;  // a multiple of 32 dividing k
  if constexpr (kMaxP >= 8) {
    if (g % (L * 8) == 0) return fast_p<8, T>(p);
  }
  if constexpr (kMaxP >= 4) {
    if (g % (L * 4) == 0) return fast_p<4, T>(p);
  }
  return fast_p<2, T>(p);
}

// ---------------------------------------------------------------- generic path

template <typename T>
static void generic(const QLinearParams& p) {
  using GV = typename VecFor<T>::type;
  const QWeight& w = p.w;
  parallel_for(0, w.n, grain_for(w.k * 4 * std::max<int64_t>(1, p.m)), [&](int64_t n0, int64_t n1) {
    Scratch<float> row(size_t(w.k));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < w.k; ++c) row.ptr[c] = dequant_at(w, n, c);
      for (int64_t m = 0; m < p.m; ++m) {
        const T* x = static_cast<const T*>(p.x) + m * p.x_stride;
        VecSum<GV> s;
        for_each_chunk<GV>(w.k, [&](auto v, int64_t i) {
          using Vv = decltype(v);
          s.add(Vv::load(x + i) * Vv::load(row.ptr + i));
        });
        auto total = s.total();
        T* out = static_cast<T*>(p.out) + m * p.out_stride;
        if constexpr (std::is_same_v<T, double>) {
          if (p.bias) total += static_cast<const double*>(p.bias)[n];
          out[n] = total;
        } else {
          if (p.bias) total += to_float(static_cast<const T*>(p.bias)[n]);
          ScalarVec<float>{float(total)}.store(out + n);
        }
      }
    }
  });
}

static bool fast_ok(const QLinearParams& p) {
  const QWeight& w = p.w;
  if (p.dtype == DType::f64) return false;
  switch (w.format) {
    case QFormat::int8: return true;
    case QFormat::int4: return w.group % 32 == 0 && w.k % w.group == 0;
    case QFormat::nf4: return w.group % 32 == 0 && w.k % w.group == 0;
  }
  return false;
}

}  // namespace

void qlinear_kernel(const QLinearParams& p) {
  if (p.m <= 0 || p.w.n <= 0) return;
  visit_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.w.k == 0) {
      for (int64_t m = 0; m < p.m; ++m)
        for (int64_t n = 0; n < p.w.n; ++n) {
          T* out = static_cast<T*>(p.out) + m * p.out_stride + n;
          if constexpr (std::is_same_v<T, double>) *out = p.bias ? static_cast<const double*>(p.bias)[n] : 0.0;
          else ScalarVec<float>{p.bias ? to_float(static_cast<const T*>(p.bias)[n]) : 0.f}.store(out);
        }
      return;
    }
    if constexpr (std::is_same_v<T, double>) {
      generic<T>(p);
    } else {
      // M >= gemm_rows (16; 9 or 12 for bf16 pairs on full-width AVX-512): the tile-dequantizing GEMM path
      // (qlinear_gemm, quant_gemm.cpp); measured on 4096 x 4096 int4 bf16 it is on par with fast() at M = 12..16 and
      // 1.7x faster at M = 64, slower at M = 8 (before the GEMM moved to kernels/outer_gemm.h, which made M = 16
      // another 1.2-1.3x faster). The int16 GEMV (AVX-512) goes first up to gemv_rows<T>(). On the amx build, bf16 x
      // from 8 rows runs on the AMX tiles before any of them (qlinear_tiles).
      if (!fast_ok(p)) return generic<T>(p);
      if (qlinear_tiles(p)) return;
      if (p.m <= gemv_rows<T>(p.w) && gemv_xq<T>(p)) return;
      if (p.m >= gemm_rows<T>(p.w)) return qlinear_gemm(p);
      fast<T>(p);
    }
  });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
