// AVX-512 (F, BW, VL, DQ) vector of 16 floats. Conversions to bf16 are done with integer ops, so no
// AVX512_BF16 is needed; fp16 uses the F16C-style vcvtph2ps/vcvtps2ph of AVX-512F.
#pragma once
#include <immintrin.h>

#include <algorithm>

#include "cpu/vec/vec_exp.h"
#include "kernels/dtype.h"

namespace llmkern {
namespace LLMKERN_ISA {

struct VecAvx512 {
  using value_type = float;
  static constexpr int W = 16;
  __m512 v;

  static VecAvx512 zero() { return {_mm512_setzero_ps()}; }
  static VecAvx512 set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecAvx512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static VecAvx512 load(const bf16* p) {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
  }
  static VecAvx512 load(const f16* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // Rounded to nearest even, NaN lanes quiet NaNs. On the avx512bf16 builds by vcvtneps2bf16 (2 uops against the
  // 9 of bf16_round and the narrowing: bf16 silu_and_mul, compute-bound on Intel cores, 1.10-1.14x from memory and
  // 1.21-1.25x in cache, side by side), which flushes denormals (|x| < 2^-126) to zero.
  void store(bf16* p) const {
#if defined(LLMKERN_ISA_AVX512BF16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_round(v), 16)));
#endif
  }
  // The fp32 bits rounded to nearest even in the upper 16 bits (the bf16); NaN lanes become quiet NaNs (same as
  // to_bf16 in dtype.h).
  static __m512i bf16_round(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  }
  void store(f16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }

  friend VecAvx512 operator+(VecAvx512 a, VecAvx512 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend VecAvx512 operator-(VecAvx512 a, VecAvx512 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend VecAvx512 operator*(VecAvx512 a, VecAvx512 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend VecAvx512 operator/(VecAvx512 a, VecAvx512 b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend VecAvx512 fmadd(VecAvx512 a, VecAvx512 b, VecAvx512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend VecAvx512 min(VecAvx512 a, VecAvx512 b) { return {_mm512_min_ps(a.v, b.v)}; }
  friend VecAvx512 max(VecAvx512 a, VecAvx512 b) { return {_mm512_max_ps(a.v, b.v)}; }
  // exp_cephes' polynomial, with p * 2^n and the over/underflow done by one vscalefps (inf above ~88.72,
  // denormals below -87.34, 0 below -103.98, as std::exp gives): the clamp to [-110, 89] only keeps
  // r = x - n ln2 from becoming inf - inf. 1.2x the throughput of the generic path (pow2i and two selects),
  // measured side by side. Lanes below -104 (0 either way) are masked off, see scale_pow2.
  friend VecAvx512 exp(VecAvx512 a) {
    VecAvx512 n;
    const VecAvx512 p = exp_reduced(max(set1(-110.f), min(set1(89.f), a)), n);
    return scale_pow2(p, n, a, -104.f);
  }
  // 2^t with relative error ~3e-6 in ~10 vector ops (Cephes' exp takes ~14): n = round(t), 2^(t - n) by a
  // degree-5 Taylor polynomial, 2^n applied by vscalefps (exact inf above 128, 0 below -150). For results
  // rounded to 16 bits (2^-8 / 2^-11 relative), whose rounding swamps that error.
  friend VecAvx512 exp2_fast(VecAvx512 t) {
    static constexpr float kTaylor[] = {1.3333558146e-3f, 9.6181291076e-3f, 5.5504108665e-2f,  // ln2^k / k!
                                        2.4022650696e-1f, 6.9314718056e-1f, 1.f};
    // +-inf - n would be NaN; NaN passes (min and max return their second operand)
    return pow2_poly(max(set1(-256.f), min(set1(256.f), t)), t, kTaylor);
  }
  // exp(x - m), the softmax's exponent, in 13 vector ops against exp's 16 (side by side, in process:
  // cross_entropy_grad_ 1.11-1.18x fp32, 1.19-1.30x bf16; logprobs 1.11-1.15x; sample_ 1.03-1.05x; the fp32
  // attention forward, whose softmax is ~8% of it, 0.99-1.03x). 2^t for t = (x - m) log2 e: n = round(t), 2^(t - n)
  // by a degree-6 near-minimax polynomial (<= 1.3 ulp on [-0.5, 0.5]), 2^n by vscalefps. Rounding t adds a relative
  // error of |x - m| 6e-8 to exp(x - m)'s, which a softmax cannot see: it is largest where exp(x - m) is smallest.
  // The clamp at 128 keeps +inf from becoming inf - inf (NaN); NaN passes (min returns its second operand); lanes
  // below 2^-150 are masked off as in exp (see scale_pow2).
  friend VecAvx512 exp_sub(VecAvx512 x, VecAvx512 m) {
    static constexpr float kMinimax[] = {1.5337577497120947e-4f, 1.3399859890341759e-3f, 9.618519805371761e-3f,
                                         5.550329014658928e-2f, 2.4022646248340607e-1f, 6.931471824645996e-1f, 1.f};
    const VecAvx512 t = min(set1(128.f), (x - m) * set1(1.44269504088896341f));
    return pow2_poly(t, t, kMinimax);
  }
  friend VecAvx512 tanh(VecAvx512 a) { return tanh_cephes(a); }
  friend VecAvx512 abs(VecAvx512 a) { return max(a, zero() - a); }
  float reduce_add() const { return _mm512_reduce_add_ps(v); }

  static VecAvx512 round_nearest(VecAvx512 a) {
    return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  // 2^x for x clamped to where x - round(x) is finite: n = round(x), 2^(x - n) by the polynomial c (highest degree
  // first) in x - n, within [-0.5, 0.5], and 2^n by vscalefps, 0 in the lanes where t < -150 (see scale_pow2). The
  // two fast exps differ only in their clamp and polynomial.
  template <size_t N>
  static VecAvx512 pow2_poly(VecAvx512 x, VecAvx512 t, const float (&c)[N]) {
    const VecAvx512 n = round_nearest(x), f = x - n;
    VecAvx512 p = set1(c[0]);
    for (size_t i = 1; i < N; ++i) p = fmadd(p, f, set1(c[i]));
    return scale_pow2(p, n, t, -150.f);
  }
  // p * 2^n, 0 in the lanes where x < zero_below (those whose result is 0 anyway). Those lanes are masked off
  // instead of computed: on Intel cores every vscalefps whose result underflows takes a microcode assist
  // (~200 cycles), and the masked keys (-inf) of every causal diagonal tile hit it (attention forward 1.06-1.08x
  // in fp32, 1.10x in bf16, side by side). NaN lanes stay live.
  static VecAvx512 scale_pow2(VecAvx512 p, VecAvx512 n, VecAvx512 x, float zero_below) {
    const __mmask16 live = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(zero_below), _CMP_NLT_UQ);
    return {_mm512_maskz_scalef_ps(live, p.v, n.v)};
  }
  static VecAvx512 pow2i(VecAvx512 n) {
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
  }
  static VecAvx512 select_gt(VecAvx512 x, VecAvx512 t, VecAvx512 a, VecAvx512 b) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, t.v, _CMP_GT_OQ), b.v, a.v)};
  }
};

// r[i] becomes column i of the 16 x 16 matrix whose rows were r[0..16): pairs of rows interleaved, then
// quadruples (within 128-bit lanes), then 128-bit lanes exchanged twice; 64 shuffles.
inline void transpose(VecAvx512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2)
    t[i] = _mm512_unpacklo_ps(r[i].v, r[i + 1].v), t[i + 1] = _mm512_unpackhi_ps(r[i].v, r[i + 1].v);
  // u[4q + j] holds element j (of each 128-bit lane) of rows 4q..4q+3.
  for (int q = 0; q < 4; ++q) {
    const __m512 *lo = t + 4 * q, *hi = t + 4 * q + 2;
    u[4 * q] = _mm512_shuffle_ps(lo[0], hi[0], 0x44), u[4 * q + 1] = _mm512_shuffle_ps(lo[0], hi[0], 0xEE);
    u[4 * q + 2] = _mm512_shuffle_ps(lo[1], hi[1], 0x44), u[4 * q + 3] = _mm512_shuffle_ps(lo[1], hi[1], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {  // rows 0-7 and 8-15: lanes {0, 2} and {1, 3} of each pair
    t[j] = _mm512_shuffle_f32x4(u[j], u[j + 4], 0x88), t[j + 4] = _mm512_shuffle_f32x4(u[j], u[j + 4], 0xDD);
    t[j + 8] = _mm512_shuffle_f32x4(u[j + 8], u[j + 12], 0x88);
    t[j + 12] = _mm512_shuffle_f32x4(u[j + 8], u[j + 12], 0xDD);
  }
  for (int j = 0; j < 8; ++j)
    r[j].v = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88), r[j + 8].v = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
}

// max(init, the lanes of v) as a tree of vector maxima rather than vec.h's lane-by-lane loop (a chain of 16 scalar
// maxima: paged decode's softmax, one per query row and 32 keys, ran 1.7-3.4% faster with the tree). A NaN lane may
// survive the tree where the loop skipped it; callers let NaN through their sums, as before.
inline float reduce_max(VecAvx512 v, float init) { return std::max(init, _mm512_reduce_max_ps(v.v)); }

// out[i] = the sum of the lanes of acc[i], i < 16: a 16 x 16 transpose-and-add in four halving steps (256-bit
// halves, 128-bit quarters, pairs, singles); the input order below makes lane i of the result the sum of acc[i].
inline void reduce_add_16(const VecAvx512* acc, float* out) {
  static constexpr int kOrder[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[kOrder[i]] = acc[i].v;
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x88), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[i], y[i + 2], 0x44), _mm512_shuffle_ps(y[i], y[i + 2], 0xEE));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD)));
}

// Paired bf16 (see load_pair in vec.h): one 64-byte load gives the even elements (low halves of the 32-bit
// words, shifted up) and the odd ones (high halves, masked): two integer ops per 32 values.
inline void load_pair(const bf16* p, VecAvx512& a, VecAvx512& b) {
  const __m512i u = _mm512_loadu_si512(p);
  a.v = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  b.v = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xffff0000u))));
}
inline void store_pair(bf16* p, VecAvx512 a, VecAvx512 b) {
  const __m512i lo = _mm512_srli_epi32(VecAvx512::bf16_round(a.v), 16);
  const __m512i hi = _mm512_and_si512(VecAvx512::bf16_round(b.v), _mm512_set1_epi32(int(0xffff0000u)));
  _mm512_storeu_si512(p, _mm512_or_si512(lo, hi));
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
