// exp(x) for float vectors, shared by the AVX2 and AVX-512 paths: Cephes expf
// (range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; ~1 ulp on the normal range).
// V provides: set1, fmadd, *, +, round_nearest, pow2i (2^n for integral-valued n in [-126, 127]),
// min, max and select_gt(x, t, a, b) = x > t ? a : b.
#pragma once
#include <limits>

namespace llmkern {
namespace LLMKERN_ISA {

template <typename V>
inline V exp_cephes(V x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;  // 2^n stays a normal float
  // x86 min/max return the second operand when one is NaN: x goes second so NaN propagates.
  V xc = max(V::set1(lo), min(V::set1(hi), x));
  V n = V::round_nearest(xc * V::set1(1.44269504088896341f));
  // r = x - n ln2, with ln2 split in two so n * ln2_hi is exact.
  V r = fmadd(n, V::set1(-0.693359375f), xc);
  r = fmadd(n, V::set1(2.12194440e-4f), r);
  V p = V::set1(1.9875691500e-4f);
  p = fmadd(p, r, V::set1(1.3981999507e-3f));
  p = fmadd(p, r, V::set1(8.3334519073e-3f));
  p = fmadd(p, r, V::set1(4.1665795894e-2f));
  p = fmadd(p, r, V::set1(1.6666665459e-1f));
  p = fmadd(p, r, V::set1(5.0000001201e-1f));
  p = fmadd(p, r * r, r + V::set1(1.0f));
  V y = p * V::pow2i(n);
  // Beyond the clamp the true result over/underflows: give inf / 0 as std::exp does.
  y = V::select_gt(x, V::set1(hi), V::set1(std::numeric_limits<float>::infinity()), y);
  y = V::select_gt(V::set1(lo), x, V::zero(), y);
  return y;
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
