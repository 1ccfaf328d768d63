// Weight-only quantized linear for many rows of x (the GEMM path of qlinear_kernel), compiled once per
// CPU ISA: the outer-product GEMM of kernels/outer_gemm.h over weight rows dequantized chunk by chunk; the
// store applies the int8 row scale, adds the bias and rounds once to the output dtype.
//
// 4-bit decode: one 32-bit lane per packed byte (bytes zero-extended); the high nibble (the even element)
// and the low nibble (the odd element) index a 16-float table holding (q - z) * s (int4) or code * absmax
// (nf4) for the current group (AVX-512: one vpermps; AVX2: two 8-entry permutes and a blend). A chunk of
// 2L elements thus decodes to [the L even elements, the L odd elements]; x^T is stored in that same
// permuted k order, so the product is unchanged. int8 decodes in natural order (the scale at the end).
//
// bf16 x on avx512bf16: W decodes to bf16 pairs instead and the product runs over pairs, one vdpbf16ps per two FMAs
// (4096 x 4096 int4, Zen 4, side by side: 1.47x at M = 16, 1.75x at M = 64); 4-bit W and x in the runs' k order
// (decode_row_runs: 4 vector µops per 32 weights instead of 7; Zen 5, one process alternating, int4 1.09-1.14x at
// M = 16, 1.03-1.06x at 32 and 64; nf4, whose 64-column blocks each build their table, 1.00-1.07x). Up to 32 rows
// with a 4-bit W whose k is a multiple of 128: code_tiles (codes decoded between the products, scales per group). On
// the amx build, bf16 x from 8 to 512 rows runs on the AMX tiles (gemm_tiles, qlinear_tiles).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/vec/vec.h"
#include "kernels/attention_tile.h"
#include "kernels/outer_gemm.h"
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
using outer::L;

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

// Most columns per decode chunk (a multiple of 2L; outer::gemm splits k into equal chunks): long runs per row of
// packed bytes (512 bytes) measured faster than 256 and 512 columns, whose short runs the hardware prefetchers miss.
constexpr int64_t kChunk = 1024;

constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Prefetches the chunk that the decode of row r after columns [.., c1) reads next, with its 4-bit scales: the same
// row's next chunk (rows are far apart, so the hardware prefetchers miss these short runs), or after its last one the
// first chunk of the same row of the next tile (the thread's next task), which was left to demand misses before
// (int4 M = 16, in process: 2.25 -> 1.90 ms at 4096 x 4096, 5.93 -> 5.04 at 11008 x 4096). int8 rows are twice as
// long, and a tile's chunk of them prefetched into L1 (24 KB) is evicted before it is decoded: they go to L2. int8 had
// no prefetch; bf16 x, in process, none / L1 / L2: M = 32 4.57-4.61 / 4.09 / 3.56-3.71 ms at 4096 x 4096, M = 64
// 18.6 / 17.2 / 16.1 ms at 11008 x 4096.
// task_rows: the rows of W per task.
static void prefetch_next_chunk(const QWeight& w, int64_t r, int64_t c1, int64_t task_rows = outer::kTileRows) {
  const int64_t nr = c1 < w.k ? r : r + task_rows, nc = c1 < w.k ? c1 : 0, ne = std::min(w.k, nc + kChunk);
  if (nr >= w.n) return;
  if (w.format == QFormat::int8) {
    prefetch_l2_span(static_cast<const int8_t*>(w.data) + nr * w.k + nc, ne - nc);
    return;
  }
  const int64_t groups = w.k / w.group;
  prefetch_l1_span(static_cast<const uint8_t*>(w.data) + nr * (w.k / 2) + nc / 2, (ne - nc) / 2);
  prefetch_scales(w, nr * groups + nc / w.group, (ne - nc + w.group - 1) / w.group);
}

// Calls run(row, c, hi, base, s, z) for each 4-bit block / group of row r within columns [c0, c1): row = the
// row's packed bytes, [c, hi) the group's columns there, w = (base[q] - z) * s with base the nf4 code or 0..15.
template <typename Run>
static void for_each_group(const QWeight& w, int64_t r, int64_t c0, int64_t c1, Run&& run) {
  const uint8_t* row = static_cast<const uint8_t*>(w.data) + r * (w.k / 2);
  const int64_t gsize = w.group, groups = w.k / gsize;
  const bool nf4 = w.format == QFormat::nf4;
  const float* base = nf4 ? w.code : kIota;
  int64_t b = r * groups + c0 / gsize;
  for (int64_t c = c0, gend = (c0 / gsize + 1) * gsize; c < c1; c = gend, gend += gsize, ++b) {
    const float s = nf4 ? nf4_absmax(w, b) : scale_at(w, b);
    const float z = nf4 ? 0.f : w.zeros ? float(w.zeros[b]) : 8.f;
    run(row, c, std::min(c1, gend), base, s, z);
  }
}

// Row r of W, columns [c0, c1) dequantized into dst (4-bit: permuted per chunk of 2L; int8: natural order,
// unscaled). 4-bit: c0, c1 multiples of 2L (k is a multiple of 32 >= 2L).
static void decode_row(const QWeight& w, int64_t r, int64_t c0, int64_t c1, float* dst) {
  if (w.format == QFormat::int8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + r * w.k;
    int64_t c = c0;
    for (; c + L <= c1; c += L) Dec::int8(q + c, dst + (c - c0));
    for (; c < c1; ++c) dst[c - c0] = float(q[c]);
    return;
  }
  for_each_group(w, r, c0, c1, [&](const uint8_t* row, int64_t c, int64_t hi, const float* base, float s, float z) {
    const typename Dec::Table t = Dec::table(base, z, s);
    for (; c < hi; c += 2 * L) Dec::chunk(row + c / 2, t, dst + (c - c0));
  });
}

#if defined(LLMKERN_ISA_AVX512BF16)
// decode_row for bf16 x on avx512bf16, int8: columns [c0, c1) of row r as bf16 pairs (W[2i], W[2i + 1]) of q itself
// (exact in bf16; the scale at the end). c0, c1 multiples of 32 (pairs_ok). The 4-bit formats take decode_row_runs.
static void decode_row(const QWeight& w, int64_t r, int64_t c0, int64_t c1, attn::Bf16Pair* dst) {
  const int8_t* q = static_cast<const int8_t*>(w.data) + r * w.k;
  const auto widen = [&](int64_t c) {  // 16 codes as fp32
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c))));
  };
  for (int64_t c = c0; c < c1; c += 32)
    _mm512_storeu_si512(dst + (c - c0) / 2, (__m512i)_mm512_cvtne2ps_pbh(widen(c + 16), widen(c)));
}

// The runs' k order for a 4-bit W (the AMX tiles' and, for bf16 x, the pairs'): each run of run_cols(w) columns holds
// its even columns, then its odd ones (the high nibbles of its bytes, then the low ones), so a run decodes by one
// zero-extend, one shift or and, and one vpermw per 32 values (pairs of adjacent columns took 7 µops per 32); x is
// permuted the same way (permute_runs), which leaves the product unchanged. Runs never straddle a group. int8 keeps
// the natural order (0).
static int run_cols(const QWeight& w) { return w.format == QFormat::int8 ? 0 : w.group % 64 == 0 ? 64 : 32; }

// The 16-entry bf16 table (base[q] - z) s (entries 0-15 in the low 256 bits, for vpermw).
static inline __m512i bf16_table(const float* base, float z, float s) {
  const __m512 t32 = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(base), _mm512_set1_ps(z)), _mm512_set1_ps(s));
  return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(t32));
}

// cols columns (whole runs) of 4-bit codes at src to bf16 through table, in the runs' k order: runs of 64 columns
// (wide) or of 32.
static inline void decode_runs(const uint8_t* src, int64_t cols, bool wide, __m512i table, bf16* out) {
  const __m512i low4 = _mm512_set1_epi16(15);
  if (wide) {
#pragma GCC unroll 2
    for (int64_t q = 0; q < cols; q += 64) {
      const __m512i u = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + q / 2)));
      _mm512_storeu_si512(out + q, _mm512_permutexvar_epi16(_mm512_srli_epi16(u, 4), table));
      _mm512_storeu_si512(out + q + 32, _mm512_permutexvar_epi16(_mm512_and_si512(u, low4), table));
    }
    return;
  }
#pragma GCC unroll 4
  for (int64_t q = 0; q < cols; q += 32) {
    const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + q / 2)));
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(u, 4)),
                                           _mm256_and_si256(u, _mm512_castsi512_si256(low4)), 1);
    _mm512_storeu_si512(out + q, _mm512_permutexvar_epi16(idx, table));
  }
}

// Row r of a 4-bit W, columns [c0, c1) (multiples of the run), to bf16 in the runs' k order: each value rounded to
// bf16, as a bf16 dequantize-then-matmul rounds it.
static void decode_row_runs(const QWeight& w, int64_t r, int64_t c0, int64_t c1, bf16* dst) {
  const bool wide = run_cols(w) == 64;
  for_each_group(w, r, c0, c1, [&](const uint8_t* row, int64_t c, int64_t hi, const float* base, float s, float z) {
    decode_runs(row + c / 2, hi - c, wide, bf16_table(base, z, s), dst + (c - c0));
  });
}

// x's m rows (row stride ld) with each run of `run` columns rearranged into its even columns, then its odd ones (the
// runs' k order), into dst [m][k]; k a multiple of run.
static void permute_runs(const bf16* x, int64_t m, int64_t ld, int64_t k, int run, bf16* dst) {
  alignas(64) uint16_t idx[64] = {};  // run 32 fills the first half (hi is then unused)
  for (int t = 0; t < run / 2; ++t) idx[t] = uint16_t(2 * t), idx[run / 2 + t] = uint16_t(2 * t + 1);
  const __m512i lo = _mm512_load_si512(idx), hi = _mm512_load_si512(idx + 32);
  for (int64_t i = 0; i < m; ++i) {
    const bf16* src = x + i * ld;
    bf16* out = dst + i * k;
    for (int64_t c = 0; c < k; c += run) {
      const __m512i a = _mm512_loadu_si512(src + c);
      if (run == 32) {
        _mm512_storeu_si512(out + c, _mm512_permutexvar_epi16(lo, a));
        continue;
      }
      const __m512i b = _mm512_loadu_si512(src + c + 32);
      _mm512_storeu_si512(out + c, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(out + c + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// ---------------------------------------------------------------- 4-bit W, bf16 x, up to 32 rows (avx512bf16)
//
// code_tiles: the GEMM of one or two vectors of x rows (m <= 32) with a 4-bit W, where the decode, not the products,
// set the pace of the chunked form above (gemm_typed: each weight's 7 -> 4 decode µops still took a fifth of an int4
// M = 16 call, in a pass of its own beside the products). Each weight decodes to the bf16 of its code alone (int4
// q - 8, exact; nf4 the code value), from one fixed table, so a tile's rows need no table of their own; the scale,
// and an asymmetric zero point's share through the group's column sums of x, is applied once per group and row:
//   y[i][r] = sum_g s[r][g] (sum_{c in g} code(W[r][c]) x[i][c] - (z[r][g] - 8) sum_{c in g} x[i][c])
// each inner sum an fp32 chain of at most kPiece columns, added into the tile's fp32 C. (The chunked form rounds each
// (q - z) s to bf16 first; here the scale multiplies in fp32: errors against float64 the same or smaller.) A tile's
// rows decode piece by piece (kPiece columns), each row's next piece between the k steps of the piece before, so the
// decode's shuffles issue beside the vdpbf16ps chains instead of in a pass of their own (a piece's rows all decoded
// before its products ran 1.13x slower, in an earlier form of this loop). Int4 M = 16 against the chunked form, Zen 5:
// see bench/RESULTS.md (1.2-1.3x; 2.07-2.17x torch's int4pack op). Two vectors (M = 32, 12-row tiles): 1.10-1.15x the
// chunked form; three and four (M = 48, 64) 1.06-1.09x and 0.90-1.04x, there x^T (k x 48 or 64 bf16) outgrows L2 at
// k = 11008 (the chunked form reads it a chunk at a time): not taken.
constexpr int64_t kPiece = 128;

// Rows of W per tile against one vector of x rows (half as many against two): 24 accumulators (16, in separate runs:
// 0.94-1.02x the speed at the three issue shapes).
constexpr int kCodeRows = 24;

// Columns ahead that each row's line is prefetched into L2 (the next tile's first lines at the end of a row): a tile's
// rows are 24 streams the hardware prefetchers do not keep up with (without: 1.18 against 0.84 ms at int4 4096 x 4096,
// M = 16); 256 to 4096 columns measured alike; prefetching into L1 as well, or several lines at once, 0.93-0.99x.
constexpr int64_t kCodeAhead = 1024;

// Whether code_tiles takes this weight: 4-bit, k whole pieces, and groups that are whole pieces or divide one.
static bool code_tiles_ok(const QWeight& w) {
  return run_cols(w) > 0 && w.k % kPiece == 0 && (w.group % kPiece == 0 || kPiece % w.group == 0);
}

// The runs' k order (run_cols) over one piece of a 4-bit row, as bf16 codes from a fixed 16-entry table.
struct CodeDecoder {
  const uint8_t* data;
  int64_t half;   // bytes per row
  __m512i table;  // int4: q - 8; nf4: bf16(code[q])
  bool wide;      // runs of 64 columns (else 32)
  explicit CodeDecoder(const QWeight& w)
      : data(static_cast<const uint8_t*>(w.data)), half(w.k / 2),
        table(w.format == QFormat::nf4 ? bf16_table(w.code, 0.f, 1.f) : bf16_table(kIota, 8.f, 1.f)),
        wide(run_cols(w) == 64) {}
  void piece(int64_t row, int64_t c, bf16* out) const { decode(data + row * half + c / 2, out); }
  void decode(const uint8_t* src, bf16* out) const { decode_runs(src, kPiece, wide, table, out); }
};

// Per group, the column sums of x's rows (fp32 [groups][pw]) from x^T's pairs (xt, k / 2 pairs of pw rows).
static void group_sums(const attn::Bf16Pair* xt, int64_t k, int64_t group, int64_t pw, float* out) {
  const __m512bh ones = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // the pair (1, 1)
  for (int64_t g = 0; g < k / group; ++g)
    for (int64_t j = 0; j < pw; j += 16) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t kk = g * group / 2; kk < (g + 1) * group / 2; ++kk)
        sum = _mm512_dpbf16_ps(sum, ones, (__m512bh)_mm512_loadu_si512(xt + kk * pw + j));
      _mm512_storeu_ps(out + g * pw + j, sum);
    }
}

// Row `row`'s scales as fp32 (s[g], nf4: its absmax) and, for asymmetric int4, s[g] (z[g] - 8) (sz[g]).
static void row_scales(const QWeight& w, int64_t row, float* s, float* sz) {
  const int64_t groups = w.k / w.group, b0 = row * groups;
  if (w.format == QFormat::nf4) {
    for (int64_t g = 0; g < groups; ++g) s[g] = nf4_absmax(w, b0 + g);
  } else if (w.scales_dtype == DType::bf16) {  // (the usual case, as a loop the compiler vectorizes)
    const bf16* src = static_cast<const bf16*>(w.scales) + b0;
    for (int64_t g = 0; g < groups; ++g) s[g] = to_float(src[g]);
  } else {
    for (int64_t g = 0; g < groups; ++g) s[g] = scale_at(w, b0 + g);
  }
  if (sz)
    for (int64_t g = 0; g < groups; ++g) sz[g] = s[g] * (float(w.zeros[b0 + g]) - 8.f);
}

// Tiles [t0, t1) of MR rows of W (rows past n repeat the last row; their outputs are not stored), the pieces of each
// tile in order, against xt (x^T as pairs, one panel of NR vectors of x rows, in the runs' k order). Every FG columns
// (the group, or kPiece for larger groups) the products fold into c (MR x 16 NR fp32), which store(n0, rows, c) takes
// after a tile's last piece. buf: two pieces of MR decoded rows. xsum: group_sums, for asymmetric int4 (else null).
template <int MR, int NR, int FG, typename Store>
static void code_tiles(const QWeight& w, const CodeDecoder& d, const attn::Bf16Pair* xt, const float* xsum,
                       int64_t t0, int64_t t1, bf16* buf, float* c, float* ts, Store&& store) {
  // k steps (pairs): a piece; after each row's decode (a power of two: fold points fall between them); a fold
  constexpr int KP = kPiece / 2, GP = FG / 2, PW = 16 * NR;
  constexpr int KS = KP / MR >= 8 ? 8 : KP / MR >= 4 ? 4 : KP / MR >= 2 ? 2 : 1;
  static_assert(KS * MR <= KP && GP % KS == 0 && KP % GP == 0 && NR <= 2);
  const int64_t pieces = w.k / kPiece, items = (t1 - t0) * pieces, groups = w.k / w.group;
  const auto row_of = [&](int64_t t, int r) { return std::min(t * MR + r, w.n - 1); };
  float* tsz = xsum ? ts + MR * groups : nullptr;  // ts: [MR][groups] scales, then (asymmetric) [MR][groups] s (z - 8)
  for (int r = 0; r < MR; ++r) d.piece(row_of(t0, r), 0, buf + r * kPiece);
  for (int64_t i = 0; i < items; ++i) {  // item i: tile t's piece at column p0; the next item's rows decode meanwhile
    const int64_t t = t0 + i / pieces, p0 = i % pieces * kPiece;
    const int64_t nt = t0 + (i + 1) / pieces, np0 = (i + 1) % pieces * kPiece;
    const bool more = i + 1 < items;
    const uint32_t* a = reinterpret_cast<const uint32_t*>(buf + i % 2 * MR * kPiece);
    bf16* next = buf + (i + 1) % 2 * MR * kPiece;
    const attn::Bf16Pair* b = xt + p0 / 2 * PW;
    const int64_t ac = p0 + kCodeAhead, at = ac < w.k ? t : t + 1, acol = ac < w.k ? ac : ac - w.k;
    const bool ahead = at * MR < w.n;
    if (p0 == 0) {
      std::memset(c, 0, sizeof(float) * MR * PW);
      for (int r = 0; r < MR; ++r) row_scales(w, row_of(t, r), ts + r * groups, tsz ? tsz + r * groups : nullptr);
    }
    __m512 acc[MR * NR];  // acc[r * NR + j]: row r of W, vector j of x rows
#pragma GCC unroll 32
    for (int i = 0; i < MR * NR; ++i) acc[i] = _mm512_setzero_ps();
    const auto fold = [&](int64_t col) {  // acc (the group's columns up to the piece's col) into c
      const int64_t g = (p0 + col - 1) / w.group;
#pragma GCC unroll 32  // (one flat loop: a rolled one indexes acc at run time, which puts it on the stack; a
      // nested loop over x's vectors spilled general registers in the k steps' loop)
      for (int i = 0; i < MR * NR; ++i) {  // i = r NR + j: c's row r, x's vector j
        const int r = i / NR;
        __m512 v = _mm512_fmadd_ps(acc[i], _mm512_set1_ps(ts[r * groups + g]), _mm512_loadu_ps(c + i * 16));
        if (tsz)
          v = _mm512_fnmadd_ps(_mm512_loadu_ps(xsum + g * PW + i % NR * 16), _mm512_set1_ps(tsz[r * groups + g]), v);
        _mm512_storeu_ps(c + i * 16, v);
        acc[i] = _mm512_setzero_ps();
      }
    };
    const auto kstep = [&](int kk) {  // (written out per NR: a loop over x's vectors cost 3-7% at M = 16)
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kk * PW);
      if constexpr (NR == 1) {
#pragma GCC unroll 32
        for (int r = 0; r < MR; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(int(a[r * KP + kk])), b0);
      } else {
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kk * PW + 16);
#pragma GCC unroll 32
        for (int r = 0; r < MR; ++r) {
          const __m512bh ar = (__m512bh)_mm512_set1_epi32(int(a[r * KP + kk]));
          acc[2 * r] = _mm512_dpbf16_ps(acc[2 * r], ar, b0);
          acc[2 * r + 1] = _mm512_dpbf16_ps(acc[2 * r + 1], ar, b1);
        }
      }
    };
    const int64_t nrow0 = nt * MR, arow0 = at * MR;
    const uint8_t* nsrc = d.data + np0 / 2;
    const uint8_t* asrc = d.data + acol / 2;
#pragma GCC unroll 2
    for (int slot = 0; slot < MR; ++slot) {
      if (more) d.decode(nsrc + std::min(nrow0 + slot, w.n - 1) * d.half, next + slot * kPiece);
      if (ahead) prefetch_l2(asrc + std::min(arow0 + slot, w.n - 1) * d.half);
#pragma GCC unroll 8
      for (int s = 0; s < KS; ++s) kstep(slot * KS + s);
      if ((slot + 1) * KS % GP == 0) fold((slot + 1) * KS * 2);
    }
#pragma GCC unroll 2
    for (int slot = MR; slot < KP / KS; ++slot) {
#pragma GCC unroll 8
      for (int s = 0; s < KS; ++s) kstep(slot * KS + s);
      if ((slot + 1) * KS % GP == 0) fold((slot + 1) * KS * 2);
    }
    if (p0 + kPiece == w.k) store(t * MR, std::min<int64_t>(MR, w.n - t * MR), c);
  }
}

// code_tiles over all of W (MR rows a tile against NR vectors of x rows, one panel), parallel over tiles.
template <int MR, int NR>
static void code_gemm(const QLinearParams& p, const attn::Bf16Pair* xt,
                      const std::function<void(int64_t, int64_t, const float*)>& store) {
  const QWeight& w = p.w;
  Scratch<float> xsum(size_t(w.zeros ? w.k / w.group * 16 * NR : 1));
  if (w.zeros) group_sums(xt, w.k, w.group, 16 * NR, xsum.ptr);
  const CodeDecoder d(w);
  parallel_for(0, (w.n + MR - 1) / MR, 1, [&](int64_t t0, int64_t t1) {
    Scratch<bf16> buf(size_t(2 * MR * kPiece));
    Scratch<float> c(size_t(MR * 16 * NR));
    Scratch<float> ts(size_t(MR * (w.k / w.group) * (w.zeros ? 2 : 1)));
    const float* xs = w.zeros ? xsum.ptr : nullptr;
    if (w.group == 32) code_tiles<MR, NR, 32>(w, d, xt, xs, t0, t1, buf.ptr, c.ptr, ts.ptr, store);
    else if (w.group == 64) code_tiles<MR, NR, 64>(w, d, xt, xs, t0, t1, buf.ptr, c.ptr, ts.ptr, store);
    else code_tiles<MR, NR, kPiece>(w, d, xt, xs, t0, t1, buf.ptr, c.ptr, ts.ptr, store);
  });
}
#endif

// Whether bf16 x takes the pair path: every chunk whole 32-column runs (4-bit: k is a multiple of 32 already).
static inline bool pairs_ok(const QWeight& w) { return w.format != QFormat::int8 || w.k % 32 == 0; }

// ---------------------------------------------------------------- driver

// E = float: W decoded to fp32, x^T in the decode order (4-bit chunks of 2L columns hold the even columns, then
// the odd ones). E = attn::Bf16Pair (bf16 x, avx512bf16): both as bf16 pairs, 4-bit W and x in the runs' k order
// (each pair two columns of the same parity), int8 in natural order.
template <typename T, typename E = float>
static void gemm_typed(const QLinearParams& p) {
  const QWeight& w = p.w;
  const outer::Panels pn(p.m, w.k, outer::kPer<E>);
  Scratch<E> xt(size_t(pn.size()));
  // bf16 pairs of a 4-bit W: x permuted into the runs' k order (run_cols), as W decodes.
  int run = 0;
  const T* x = static_cast<const T*>(p.x);
  int64_t x_stride = p.x_stride;
#if defined(LLMKERN_ISA_AVX512BF16)
  if constexpr (!std::is_same_v<E, float>) run = run_cols(w);
  Scratch<T> xr(size_t(run > 0 ? p.m * w.k : 1));  // the permuted copy (none for int8 or fp32 elements)
  if constexpr (!std::is_same_v<E, float>) {
    if (run > 0) {
      permute_runs(x, p.m, x_stride, w.k, run, xr.ptr);
      x = xr.ptr, x_stride = w.k;
    }
  }
#endif
  const bool perm = w.format != QFormat::int8;  // (fp32 only: pairs are in natural order)
  outer::transpose_x(x, x_stride, pn, xt.ptr, [&](int64_t pos) {
    const int64_t j = pos % (2 * L), c0 = pos - j;
    return perm ? c0 + (j < L ? 2 * j : 2 * (j - L) + 1) : pos;
  });
  const auto decode = [&](int64_t r, int64_t c0, int64_t c1, E* dst) {
    prefetch_next_chunk(w, r, c1);
#if defined(LLMKERN_ISA_AVX512BF16)
    if constexpr (!std::is_same_v<E, float>) {
      if (run > 0) return decode_row_runs(w, r, c0, c1, reinterpret_cast<bf16*>(dst));
    }
#endif
    decode_row(w, r, c0, c1, dst);
  };
  const auto store = [&](int64_t n0, int64_t rows, int64_t r0, int64_t nr, const float* c, int64_t ldc) {
    float s[outer::kTileRows];  // the int8 row scales (the 4-bit formats' scales are decoded into the weights)
    const bool int8 = w.format == QFormat::int8;
    for (int64_t j = 0; int8 && j < rows; ++j) s[j] = scale_at(w, n0 + j);
    outer::store_rows(static_cast<T*>(p.out), p.out_stride, n0, rows, r0, nr, c, ldc, int8 ? s : nullptr,
                      static_cast<const T*>(p.bias));
  };
#if defined(LLMKERN_ISA_AVX512BF16)
  if constexpr (!std::is_same_v<E, float>) {
    if (pn.width <= 32 && code_tiles_ok(w)) {
      const auto st = [&](int64_t n0, int64_t rows, const float* c) { store(n0, rows, 0, p.m, c, pn.width); };
      if (pn.width == 16) return code_gemm<kCodeRows, 1>(p, xt.ptr, st);
      return code_gemm<kCodeRows / 2, 2>(p, xt.ptr, st);
    }
  }
#endif
  outer::gemm<kChunk>(w.n, pn, xt.ptr, decode, store, {}, std::max(run, 2 * L));
}

#if defined(LLMKERN_ISA_AMX)
// bf16 x on the AMX tiles (the amx build): y^T = W x^T as in the dense linear (kernels/linear.cpp, run_tiles), each
// task's kTileW rows of W decoded to bf16 (the values the vdpbf16ps GEMM multiplies; 4-bit in the runs' k order,
// decode_row_runs) kTileChunk columns at a time into a scratch the tiles read as A, x^T packed once a call as B tiles
// of column pairs in the same k order, and C^T (kTileW rows x all of x's rows, fp32) accumulated over the chunks,
// then stored through outer::store_rows. Against the vdpbf16ps GEMM (which issues at half the fp32 FMA rate on these
// Xeons), int4 bf16 on Emerald Rapids: 4096 x 4096 M = 16 5.5 -> 1.7 ms, M = 64 18.0 -> 4.0 ms.
// A 4-bit chunk is decoded while the one before it is on the tiles (between its k steps). Against decoding after the
// products, int4 and nf4 in process, alternating, the three issue shapes twice: M = 16 0.97-1.19x (>= 1.10x in 8 of
// 12), M = 64 0.93-1.14x (a wash), M = 8 0.98-1.01x.
constexpr int64_t kTileW = 32;
static_assert(kTileW <= outer::kStoreRows);
// Columns decoded per pass. int4 bf16, in process, alternating (512 / 1024 / 2048 / 4096 / dense bf16 ms): M = 64
// 4096 x 4096 5.02 / 4.40 / 4.34 / 4.16 / 5.78, 4096 x 11008 13.90 / 13.40 / 13.33 / 13.75 / 14.19; M = 16 4096 x 4096
// 2.07 / 1.76 / 1.76 / 1.64 / 2.67, 4096 x 11008 5.48 / 4.75 / 4.82 / 4.89 / 7.35.
constexpr int64_t kTileChunk = 2048;
// Rows of x the tiles take: from this many (below, the int16 GEMV: int4 / nf4 bf16 at 4096 x 4096, in process,
// GEMV / tiles ms: M = 4 1.07 / 1.54, 6 1.65 / 1.70, 8 2.04 / 1.74, 12 3.05 / 1.72; 11008 x 4096 M = 8 5.68 / 4.32) up
// to kTileMaxRows, beyond which each task's pass over all of x^T (k x m bf16) outgrows L2 (the dense linear's tiles
// stop at 512 rows too).
constexpr int64_t kTileMinRows = 8, kTileMaxRows = 512;

static bool tiles_ok(const QLinearParams& p) {
  return p.dtype == DType::bf16 && p.w.k % 32 == 0 && p.m >= kTileMinRows && p.m <= kTileMaxRows;
}

constexpr int64_t kTileLd = kTileChunk + 32;  // decoded rows, bf16; 64 bytes past 4 KB: rows do not share L1's sets
constexpr int64_t kTileBuf = kTileW * kTileLd / 2;  // one decoded chunk, in pairs

static int64_t tile_rows(const QWeight& w, int64_t t) { return std::min(kTileW, w.n - t * kTileW); }
static int64_t tile_rows16(const QWeight& w, int64_t t) { return (tile_rows(w, t) + 15) / 16 * 16; }

// Row r of tile t's chunk ci into buf (kTileBuf pairs): W's row decoded and the chunk after it prefetched, or, past
// the last tile's rows, zeros (their outputs are not stored).
static void decode_tile_row(const QWeight& w, int64_t t, int64_t ci, int64_t r, attn::Bf16Pair* buf) {
  const int64_t c0 = ci * kTileChunk, c1 = std::min(w.k, c0 + kTileChunk);
  attn::Bf16Pair* dst = buf + r * (kTileLd / 2);
  if (r >= tile_rows(w, t)) {
    std::memset(dst, 0, sizeof(uint32_t) * size_t(c1 - c0) / 2);
    return;
  }
  const int64_t row = t * kTileW + r;
  prefetch_next_chunk(w, row, c1, kTileW);
  if (w.format == QFormat::int8) decode_row(w, row, c0, c1, dst);
  else decode_row_runs(w, row, c0, c1, reinterpret_cast<bf16*>(dst));
}

// Tiles [t0, t1) of W against xt (x^T packed, mp columns): the task's chunks in order, each multiplied while the one
// after it (this tile's next chunk or the next tile's first) is decoded into the other buffer of a (2 kTileBuf).
static void run_tile_tasks(const QLinearParams& p, const uint32_t* xt, int64_t mp, int64_t t0, int64_t t1,
                           attn::Bf16Pair* a, float* c) {
  const QWeight& w = p.w;
  const bool int8 = w.format == QFormat::int8;
  const int64_t chunks = (w.k + kTileChunk - 1) / kTileChunk, items = (t1 - t0) * chunks;
  for (int64_t r = 0; r < tile_rows16(w, t0); ++r) decode_tile_row(w, t0, 0, r, a);
  for (int64_t i = 0; i < items; ++i) {
    const int64_t t = t0 + i / chunks, ci = i % chunks, c0 = ci * kTileChunk;
    const int64_t kp = (std::min(w.k, c0 + kTileChunk) - c0) / 2, r16 = tile_rows16(w, t);
    attn::Bf16Pair *cur = a + (i % 2) * kTileBuf, *next = a + ((i + 1) % 2) * kTileBuf;
    const int64_t nt = t0 + (i + 1) / chunks, nci = (i + 1) % chunks;
    const int64_t next_rows = i + 1 < items ? tile_rows16(w, nt) : 0;
    const int64_t steps = tmul::gemm_steps(int(r16), int(mp), int(kp));
    int64_t step = 0, done = 0;
    tmul::gemm(int(r16), int(mp), int(kp), reinterpret_cast<const uint32_t*>(cur), kTileLd / 2, xt + c0 / 2 * mp,
               mp, c, mp, ci > 0, [&] {  // the next chunk's rows spread evenly over this one's k steps
                 // int8 decodes after the products instead: its rows come from L2 (prefetch_next_chunk), and those
                 // reads beside the tiles' own L2 loads ran 0.89-0.97x in 7 of 9 shapes (M = 8, 16, 64).
                 if (int8) return;
                 const int64_t due = std::min(next_rows, (++step * next_rows + steps - 1) / steps);
                 for (; done < due; ++done) decode_tile_row(w, nt, nci, done, next);
               });
    for (; done < next_rows; ++done) decode_tile_row(w, nt, nci, done, next);
    if (ci + 1 < chunks) continue;
    const int64_t n0 = t * kTileW, rows = tile_rows(w, t);
    float s[kTileW];  // the int8 row scales (the 4-bit formats' scales are decoded into the weights)
    for (int64_t j = 0; int8 && j < rows; ++j) s[j] = scale_at(w, n0 + j);
    outer::store_rows(static_cast<bf16*>(p.out), p.out_stride, n0, rows, 0, p.m, c, mp, int8 ? s : nullptr,
                      static_cast<const bf16*>(p.bias));
  }
}

static void gemm_tiles(const QLinearParams& p) {
  const QWeight& w = p.w;
  const int64_t m = p.m, mp = (m + 15) / 16 * 16;
  Scratch<uint32_t> xt(size_t(w.k / 2 * mp));
  const int run = run_cols(w);
  if (run > 0) {
    Scratch<bf16> xr(size_t(m * w.k));
    permute_runs(static_cast<const bf16*>(p.x), m, p.x_stride, w.k, run, xr.ptr);
    outer::pack_xt_shared(xr.ptr, m, w.k, w.k, xt.ptr);
  } else {
    outer::pack_xt_shared(static_cast<const bf16*>(p.x), m, p.x_stride, w.k, xt.ptr);
  }
  parallel_for(0, (w.n + kTileW - 1) / kTileW, 1, [&](int64_t t0, int64_t t1) {
    tmul::TileScope scope;
    Scratch<attn::Bf16Pair> a(size_t(2 * kTileBuf));  // the chunk on the tiles and the next one, being decoded
    Scratch<float> c(size_t(kTileW * mp));
    run_tile_tasks(p, xt.ptr, mp, t0, t1, a.ptr, c.ptr);
  });
}
#endif

}  // namespace

bool qlinear_tiles(const QLinearParams& p) {
#if defined(LLMKERN_ISA_AMX)
  if (tiles_ok(p)) {
    gemm_tiles(p);
    return true;
  }
#endif
  (void)p;
  return false;
}

bool qlinear_code_tiles(const QWeight& w) {
#if defined(LLMKERN_ISA_AVX512BF16)
  return code_tiles_ok(w);
#else
  (void)w;
  return false;
#endif
}

void qlinear_gemm(const QLinearParams& p) {
  switch (p.dtype) {
    case DType::f32: return gemm_typed<float>(p);
    case DType::bf16:
      if constexpr (attn::kPairProducts<bf16>)
        if (pairs_ok(p.w)) return gemm_typed<bf16, attn::Bf16Pair>(p);
      return gemm_typed<bf16>(p);
    case DType::f16: return gemm_typed<f16>(p);
    case DType::f64: break;  // not supported: the caller takes the generic path
  }
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
