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
  // The mask of the first n elements (all 32 for n >= 32).
  static __mmask32 first(int n) { return n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1; }
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

}  // namespace LLMKERN_ISA
}  // namespace llmkern
