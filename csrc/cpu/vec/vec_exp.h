// exp(x) and tanh(x) for float vectors, shared by the AVX2 and AVX-512 paths. exp: Cephes expf
// (range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp on the normal range).
// V provides: set1, fmadd, *, +, round_nearest, pow2i (2^n for integral-valued n in [-126, 127]),
// min, max and select_gt(x, t, a, b) = x > t ? a : b.
#pragma once
#include <limits>

namespace llmkern {
namespace LLMKERN_ISA {

// exp(xc) = p * 2^n for a finite xc of magnitude below ~110 (the callers clamp): returns p, sets n (integral-valued).
template <typename V>
inline V exp_reduced(V xc, V& n) {
  n = V::round_nearest(xc * V::set1(1.44269504088896341f));
  // r = x - n ln2, with ln2 split in two so n * ln2_hi is exact.
  V r = fmadd(n, V::set1(-0.693359375f), xc);
  r = fmadd(n, V::set1(2.12194440e-4f), r);
  V p = V::set1(1.9875691500e-4f);
  p = fmadd(p, r, V::set1(1.3981999507e-3f));
  p = fmadd(p, r, V::set1(8.3334519073e-3f));
  p = fmadd(p, r, V::set1(4.1665795894e-2f));
  p = fmadd(p, r, V::set1(1.6666665459e-1f));
  p = fmadd(p, r, V::set1(5.0000001201e-1f));
  return fmadd(p, r * r, r + V::set1(1.0f));
}

template <typename V>
inline V exp_cephes(V x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;  // 2^n stays a normal float
  // x86 min/max return the second operand when one is NaN: x goes second so NaN propagates.
  V n;
  const V p = exp_reduced(max(V::set1(lo), min(V::set1(hi), x)), n);
  V y = p * V::pow2i(n);
  // Beyond the clamp the true result over/underflows: give inf / 0 as std::exp does.
  y = V::select_gt(x, V::set1(hi), V::set1(std::numeric_limits<float>::infinity()), y);
  y = V::select_gt(V::set1(lo), x, V::zero(), y);
  return y;
}

// Cephes tanhf: odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above (no cancellation on either
// side; exp's overflow to inf gives exactly +-1).
template <typename V>
inline V tanh_cephes(V x) {
  const V a = max(x, V::zero() - x), one = V::set1(1.f), z = x * x;
  V big = one - V::set1(2.f) / (exp_cephes(a + a) + one);
  big = V::select_gt(V::zero(), x, V::zero() - big, big);
  V pz = fmadd(V::set1(-5.70498872745e-3f), z, V::set1(2.06390887954e-2f));
  pz = fmadd(pz, z, V::set1(-5.37397155531e-2f));
  pz = fmadd(pz, z, V::set1(1.33314422036e-1f));
  pz = fmadd(pz, z, V::set1(-3.33332819422e-1f));
  const V small = fmadd(x * z, pz, x);
  return V::select_gt(a, V::set1(0.625f), big, small);
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
