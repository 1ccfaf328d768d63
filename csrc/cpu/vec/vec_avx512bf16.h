// AVX512_BF16 on raw bf16 (the avx512bf16 build only): vdpbf16ps multiplies 32 bf16 pairs exactly and adds
// each pair's two products into one fp32 lane, so bf16 operands need no widening and an instruction does two
// fp32 FMAs' work.
#pragma once
#include <immintrin.h>
#include "cpu/vec/vec_avx512.h"

namespace llmkern {
namespace LLMKERN_ISA {

// 32 bf16 in a register.
struct Bf16x32 {
  __m512i v;
  static Bf16x32 load(const bf16* p) { return {_mm512_loadu_si512(p)}; }
  // The elements of p selected by mask (first), zeros elsewhere; unselected ones are never read.
  static Bf16x32 load(const bf16* p, __mmask32 mask) { return {_mm512_maskz_loadu_epi16(mask, p)}; }
  // The mask of the first n elements (none for n <= 0, all 32 for n >= 32).
  static __mmask32 first(int n) { return n <= 0 ? 0 : n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }
  // The 32-bit word w (a bf16 pair) in every lane.
  static Bf16x32 set1_pair(uint32_t w) { return {_mm512_set1_epi32(int(w))}; }
};

// acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1].
inline VecAvx512 dot_pairs(VecAvx512 acc, Bf16x32 a, Bf16x32 b) {
  return {_mm512_dpbf16_ps(acc.v, (__m512bh)a.v, (__m512bh)b.v)};
}

// Rows a and b interleaved element by element into pairs (a[e], b[e]): lo holds e = 0-3, 8-11, 16-19, 24-27,
// hi e = 4-7, 12-15, 20-23, 28-31 (unpack works within 128-bit lanes). A dot_pairs with (p, q) in every
// lane then adds p a[e] + q b[e] to lane e of that order; unpermute_pairs restores natural order.
inline void interleave(Bf16x32 a, Bf16x32 b, Bf16x32& lo, Bf16x32& hi) {
  lo.v = _mm512_unpacklo_epi16(a.v, b.v);
  hi.v = _mm512_unpackhi_epi16(a.v, b.v);
}

// 32 floats in interleave's order (lo = p[0, 16), hi = p[16, 32)) back to natural order, in place.
inline void unpermute_pairs(float* p) {
  // Natural element n comes from lane n / 8 of lo (n % 8 < 4) or hi, at position 4 (n / 8) + n % 4.
  alignas(64) static constexpr int kFirst[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static constexpr int kSecond[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
  _mm512_storeu_ps(p, _mm512_permutex2var_ps(lo, _mm512_load_si512(kFirst), hi));
  _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(lo, _mm512_load_si512(kSecond), hi));
}

// 32 floats to bf16 (round to nearest even), in order, in place: p's first 64 bytes become the 32 bf16.
inline void to_bf16_in_place(float* p) {
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
  _mm512_storeu_si512(p, (__m512i)x);
}

// dst[e] = the pair (a[e], b[e]) for e < n, (0, 0) for e in [n, n_pad) (n_pad a multiple of 16); a null b
// reads as zeros. Two rows of keys interleaved into one row of pairs over the key dimension.
inline void interleave_rows(const bf16* a, const bf16* b, int n, int n_pad, uint32_t* dst) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int e = 0; e < n_pad; e += 32) {
    const __mmask32 in = Bf16x32::first(n - e);
    const __m512i x = Bf16x32::load(a + e, in).v;
    const __m512i y = b ? Bf16x32::load(b + e, in).v : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + e, _mm512_permutex2var_epi16(x, lo_idx, y));
    if (e + 16 < n_pad) _mm512_storeu_si512(dst + e + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
  }
}

// dst[c] = the pair (bf16(a[c]), bf16(b[c])) for c < 16.
inline void store_pairs(VecAvx512 a, VecAvx512 b, uint32_t* dst) {
  alignas(64) static constexpr uint16_t kMix[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b.v, a.v);  // a's 16 bf16, then b's
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(_mm512_load_si512(kMix), ab));
}

// dst[c] = the pair (bf16(a[c]), bf16(b[c])) for c < n (a multiple of 16); a null b reads as zeros. dst may be a:
// each 16 floats are read before their 16 pairs are written.
inline void pair_rows(const float* a, const float* b, int n, uint32_t* dst) {
  for (int c = 0; c < n; c += 16)
    store_pairs(VecAvx512::load(a + c), b ? VecAvx512::load(b + c) : VecAvx512::zero(), dst + c);
}

// Rows (2i, 2i + 1) of the fp32 tile x [rows][n] become row i of bf16 pairs (pair_rows), in place; a missing
// last row reads as zeros.
inline void pair_up_rows(float* x, int rows, int n) {
  for (int i = 0; 2 * i < rows; ++i)
    pair_rows(x + 2 * i * n, 2 * i + 1 < rows ? x + (2 * i + 1) * n : nullptr, n,
              reinterpret_cast<uint32_t*>(x + i * n));
}

// dst[i * ld + t] = the pair (src[t][2i], src[t][2i + 1]) for 2i < n, t < 16 (a null src[t], and elements past
// n, read as zeros): 16 bf16 rows transposed into columns of pairs, in 16 x 16 blocks of 32-bit words.
inline void transpose_pairs(const bf16* const* src, int n, uint32_t* dst, int64_t ld) {
  for (int e = 0; e < n; e += 32) {
    const __mmask32 in = Bf16x32::first(n - e);
    VecAvx512 x[16];
    for (int t = 0; t < 16; ++t)
      x[t].v = src[t] ? _mm512_castsi512_ps(Bf16x32::load(src[t] + e, in).v) : _mm512_setzero_ps();
    transpose(x);  // moves 32-bit words only: the bf16 bits are kept
    for (int i = 0; i < 16 && e + 2 * i < n; ++i) x[i].store(reinterpret_cast<float*>(dst + int64_t(e / 2 + i) * ld));
  }
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
