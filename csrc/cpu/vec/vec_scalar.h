// Portable vectors: ScalarVec (one lane) is the tail loop of every path and, as ScalarVec<double>, the
// float64 path used by gradcheck; ArrayVec (N lanes of plain C++) is the scalar ISA's main vector.
#pragma once
#include <cmath>
#include "kernels/dtype.h"

namespace llmkern {
namespace LLMKERN_ISA {

template <typename T>
struct ScalarVec {
  using value_type = T;
  static constexpr int W = 1;
  T v;

  static ScalarVec zero() { return {T(0)}; }
  static ScalarVec set1(T x) { return {x}; }
  static ScalarVec load(const float* p) { return {T(*p)}; }
  static ScalarVec load(const double* p) { return {T(*p)}; }
  static ScalarVec load(const bf16* p) { return {T(to_float(*p))}; }
  static ScalarVec load(const f16* p) { return {T(to_float(*p))}; }
  void store(float* p) const { *p = float(v); }
  void store(double* p) const { *p = double(v); }
  void store(bf16* p) const { *p = to_bf16(float(v)); }
  void store(f16* p) const { *p = to_f16(float(v)); }

  friend ScalarVec operator+(ScalarVec a, ScalarVec b) { return {a.v + b.v}; }
  friend ScalarVec operator-(ScalarVec a, ScalarVec b) { return {a.v - b.v}; }
  friend ScalarVec operator*(ScalarVec a, ScalarVec b) { return {a.v * b.v}; }
  friend ScalarVec operator/(ScalarVec a, ScalarVec b) { return {a.v / b.v}; }
  friend ScalarVec fmadd(ScalarVec a, ScalarVec b, ScalarVec c) { return {a.v * b.v + c.v}; }
  // min / max as x86's minps / maxps: when either operand is NaN the result is the second one.
  friend ScalarVec min(ScalarVec a, ScalarVec b) { return {a.v < b.v ? a.v : b.v}; }
  friend ScalarVec max(ScalarVec a, ScalarVec b) { return {a.v > b.v ? a.v : b.v}; }
  friend ScalarVec abs(ScalarVec a) { return {std::fabs(a.v)}; }
  friend ScalarVec exp(ScalarVec a) { return {std::exp(a.v)}; }
  friend ScalarVec tanh(ScalarVec a) { return {std::tanh(a.v)}; }
  static ScalarVec select_gt(ScalarVec x, ScalarVec t, ScalarVec a, ScalarVec b) { return {x.v > t.v ? a.v : b.v}; }
  T reduce_add() const { return v; }
};

// The scalar ISA's "vector": N independent lanes in plain C++ (no intrinsics). Several partial sums keep
// long reductions as accurate as a SIMD path's, and the compiler may vectorize the lane loops.
template <int N>
struct ArrayVec {
  using value_type = float;
  static constexpr int W = N;
  float v[N];

  template <typename F> static ArrayVec make(F&& f) {
    ArrayVec r;
    for (int l = 0; l < N; ++l) r.v[l] = f(l);
    return r;
  }
  static ArrayVec zero() { return set1(0.f); }
  static ArrayVec set1(float x) { return make([&](int) { return x; }); }
  template <typename T> static ArrayVec load(const T* p) {
    return make([&](int l) { return ScalarVec<float>::load(p + l).v; });
  }
  template <typename T> void store(T* p) const {
    for (int l = 0; l < N; ++l) ScalarVec<float>{v[l]}.store(p + l);
  }
  friend ArrayVec operator+(ArrayVec a, ArrayVec b) { return make([&](int l) { return a.v[l] + b.v[l]; }); }
  friend ArrayVec operator-(ArrayVec a, ArrayVec b) { return make([&](int l) { return a.v[l] - b.v[l]; }); }
  friend ArrayVec operator*(ArrayVec a, ArrayVec b) { return make([&](int l) { return a.v[l] * b.v[l]; }); }
  friend ArrayVec operator/(ArrayVec a, ArrayVec b) { return make([&](int l) { return a.v[l] / b.v[l]; }); }
  friend ArrayVec fmadd(ArrayVec a, ArrayVec b, ArrayVec c) {
    return make([&](int l) { return a.v[l] * b.v[l] + c.v[l]; });
  }
  friend ArrayVec min(ArrayVec a, ArrayVec b) { return make([&](int l) { return a.v[l] < b.v[l] ? a.v[l] : b.v[l]; }); }
  friend ArrayVec max(ArrayVec a, ArrayVec b) { return make([&](int l) { return a.v[l] > b.v[l] ? a.v[l] : b.v[l]; }); }
  friend ArrayVec abs(ArrayVec a) { return make([&](int l) { return std::fabs(a.v[l]); }); }
  friend ArrayVec exp(ArrayVec a) { return make([&](int l) { return std::exp(a.v[l]); }); }
  friend ArrayVec tanh(ArrayVec a) { return make([&](int l) { return std::tanh(a.v[l]); }); }
  static ArrayVec select_gt(ArrayVec x, ArrayVec t, ArrayVec a, ArrayVec b) {
    return make([&](int l) { return x.v[l] > t.v[l] ? a.v[l] : b.v[l]; });
  }
  float reduce_add() const {
    float s = 0.f;
    for (int l = 0; l < N; ++l) s += v[l];
    return s;
  }
};

}  // namespace LLMKERN_ISA
}  // namespace llmkern
