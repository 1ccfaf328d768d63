// AVX2 + FMA + F16C vector of 8 floats.
#pragma once
#include <immintrin.h>
#include "cpu/vec/vec_exp.h"
#include "kernels/dtype.h"

namespace llmkern {
namespace LLMKERN_ISA {

struct VecAvx2 {
  using value_type = float;
  static constexpr int W = 8;
  __m256 v;

  static VecAvx2 zero() { return {_mm256_setzero_ps()}; }
  static VecAvx2 set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecAvx2 load(const bf16* p) {
    __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
  }
  static VecAvx2 load(const f16* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    __m256i r = _mm256_srli_epi32(bf16_round(v), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  // The fp32 bits rounded to nearest even in the upper 16 bits (the bf16); NaN lanes become quiet NaNs (same as
  // to_bf16 in dtype.h).
  static __m256i bf16_round(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  }
  void store(f16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }

  friend VecAvx2 operator+(VecAvx2 a, VecAvx2 b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend VecAvx2 operator-(VecAvx2 a, VecAvx2 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend VecAvx2 operator*(VecAvx2 a, VecAvx2 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend VecAvx2 operator/(VecAvx2 a, VecAvx2 b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend VecAvx2 fmadd(VecAvx2 a, VecAvx2 b, VecAvx2 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend VecAvx2 min(VecAvx2 a, VecAvx2 b) { return {_mm256_min_ps(a.v, b.v)}; }
  friend VecAvx2 max(VecAvx2 a, VecAvx2 b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend VecAvx2 exp(VecAvx2 a) { return exp_cephes(a); }
  friend VecAvx2 tanh(VecAvx2 a) { return tanh_cephes(a); }
  friend VecAvx2 abs(VecAvx2 a) { return max(a, zero() - a); }
  float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static VecAvx2 round_nearest(VecAvx2 a) {
    return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  static VecAvx2 pow2i(VecAvx2 n) {
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(e, 23))};
  }
  static VecAvx2 select_gt(VecAvx2 x, VecAvx2 t, VecAvx2 a, VecAvx2 b) {
    return {_mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, t.v, _CMP_GT_OQ))};
  }
};

// r[i] becomes column i of the 8 x 8 matrix whose rows were r[0..8): pairs interleaved, quadruples within
// 128-bit lanes, then the lanes exchanged; 24 shuffles.
inline void transpose(VecAvx2 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2)
    t[i] = _mm256_unpacklo_ps(r[i].v, r[i + 1].v), t[i + 1] = _mm256_unpackhi_ps(r[i].v, r[i + 1].v);
  for (int q = 0; q < 2; ++q) {
    const __m256 *lo = t + 4 * q, *hi = t + 4 * q + 2;
    u[4 * q] = _mm256_shuffle_ps(lo[0], hi[0], 0x44), u[4 * q + 1] = _mm256_shuffle_ps(lo[0], hi[0], 0xEE);
    u[4 * q + 2] = _mm256_shuffle_ps(lo[1], hi[1], 0x44), u[4 * q + 3] = _mm256_shuffle_ps(lo[1], hi[1], 0xEE);
  }
  for (int j = 0; j < 4; ++j)
    r[j].v = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20), r[j + 4].v = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
}

// Paired bf16 (see load_pair in vec.h): even elements from the low halves of the 32-bit words, odd ones from
// the high halves.
inline void load_pair(const bf16* p, VecAvx2& a, VecAvx2& b) {
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a.v = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  b.v = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int(0xffff0000u))));
}
inline void store_pair(bf16* p, VecAvx2 a, VecAvx2 b) {
  const __m256i lo = _mm256_srli_epi32(VecAvx2::bf16_round(a.v), 16);
  const __m256i hi = _mm256_and_si256(VecAvx2::bf16_round(b.v), _mm256_set1_epi32(int(0xffff0000u)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(lo, hi));
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
