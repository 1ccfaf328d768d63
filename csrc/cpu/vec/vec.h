// The SIMD layer seen by kernel cores. Each kernel .cpp in csrc/kernels is compiled once per ISA with
// LLMKERN_ISA set to that ISA's namespace (scalar, avx2, avx512, avx512bf16, amx); VecF is that ISA's float vector.
// avx512bf16 builds the avx512 code (LLMKERN_ISA_AVX512 is defined there too) plus the bf16 dot products of
// vec_avx512bf16.h and AVX512_VNNI, which kernels use under LLMKERN_ISA_AVX512BF16; amx builds the avx512bf16
// code (both macros hold) plus the tile products of amx.h, which kernels use under LLMKERN_ISA_AMX.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include "cpu/vec/vec_scalar.h"

#if defined(LLMKERN_ISA_AVX512)
#include "cpu/vec/vec_avx512.h"
namespace llmkern { namespace LLMKERN_ISA { using VecF = VecAvx512; } }
#if defined(LLMKERN_ISA_AVX512BF16)
#include "cpu/vec/vec_avx512bf16.h"
#endif
#elif defined(LLMKERN_ISA_AVX2)
#include "cpu/vec/vec_avx2.h"
namespace llmkern { namespace LLMKERN_ISA { using VecF = VecAvx2; } }
#else
namespace llmkern { namespace LLMKERN_ISA { using VecF = ArrayVec<8>; } }
#endif

namespace llmkern {
namespace LLMKERN_ISA {

// exp(x - m), the exponent of every softmax (x <= m there): AVX-512 has a cheaper form of its own (friend of
// VecAvx512, preferred by overload resolution); elsewhere it is exp of the difference.
template <typename V>
inline V exp_sub(V x, V m) {
  return exp(x - m);
}

// Vector type a kernel computes with for storage type T: float lanes (fp32 accumulation) for
// fp32/bf16/fp16, one double lane for fp64 (the gradcheck path, where speed does not matter).
template <typename T> struct VecFor { using type = VecF; };
template <> struct VecFor<double> { using type = ScalarVec<double>; };

// Calls body(V{}, i) for i = 0, W, 2W, ... while a whole vector fits, then body(ScalarVec{}, i) for the
// tail, so one generic lambda is both the SIMD loop and its scalar twin.
template <typename V, typename Body>
inline void for_each_chunk(int64_t n, Body&& body) {
  int64_t i = 0;
  if constexpr (V::W > 1) {
    for (; i + V::W <= n; i += V::W) body(V{}, i);
  }
  for (; i < n; ++i) body(ScalarVec<typename V::value_type>{}, i);
}

// Paired loads: 2W consecutive elements of p as two vectors, in the lane order cheapest for the storage type.
// Generic order: a = p[0, W), b = p[W, 2W). bf16 on AVX2 / AVX-512 (overloads in their headers): a = the even
// elements, b = the odd ones, one load and two integer ops instead of two widening loads and two shifts. Dot
// products and per-element accumulations do not depend on the order as long as every operand goes through the
// same pairing; store_pair puts the elements back. Call unqualified and without template arguments, so the
// overloads win.
template <typename V, typename T>
inline void load_pair(const T* p, V& a, V& b) {
  a = V::load(p), b = V::load(p + V::W);
}
template <typename V, typename T>
inline void store_pair(T* p, V a, V b) {
  a.store(p), b.store(p + V::W);
}

// r[i] becomes column i of the W x W matrix whose rows were r[0..W) (AVX2 / AVX-512: overloads in their
// headers; call unqualified). Generic: lane by lane.
template <typename V>
inline void transpose(V (&r)[V::W]) {
  if constexpr (V::W > 1)
    for (int i = 0; i < V::W; ++i)
      for (int j = i + 1; j < V::W; ++j) std::swap(r[i].v[j], r[j].v[i]);
}

// max(init, the lanes of v), lane by lane with std::max (which keeps its first operand against a NaN lane); AVX-512
// overloads it with a vector tree (vec_avx512.h).
template <typename V>
inline typename V::value_type reduce_max(V v, typename V::value_type init) {
  alignas(64) typename V::value_type lanes[V::W];
  v.store(lanes);
  for (int w = 0; w < V::W; ++w) init = std::max(init, lanes[w]);
  return init;
}

// out[i] = the sum of the lanes of acc[i] for i < N. AVX-512 from 16 vectors: transpose-and-add 16 at a time (the
// last group padded with zeros), ~30 shuffles and adds per 16 against ~8 dependent ones per vector: the 5-8 row dot
// blocks of the linear (20-24 sums) 1.01-1.04x faster, paged decode 1.02-1.03x; with 14 sums (7 rows) 0.92-0.95x.
template <int N, typename V>
inline void reduce_add_each(const V* acc, typename V::value_type* out) {
#if defined(LLMKERN_ISA_AVX512)
  if constexpr (N >= 16 && std::is_same_v<V, VecAvx512>) {
    for (int i = 0; i < N; i += 16) {
      if (i + 16 <= N) {
        reduce_add_16(acc + i, out + i);
        continue;
      }
      VecAvx512 part[16];
      alignas(64) float sums[16];
      for (int j = 0; j < 16; ++j) part[j] = i + j < N ? acc[i + j] : VecAvx512::zero();
      reduce_add_16(part, sums);
      for (int j = 0; i + j < N; ++j) out[i + j] = sums[j];
    }
    return;
  }
#endif
  for (int i = 0; i < N; ++i) out[i] = acc[i].reduce_add();
}

// A sum accumulated by for_each_chunk bodies of either width.
template <typename V>
struct VecSum {
  using S = ScalarVec<typename V::value_type>;
  V vec = V::zero();
  S one = S::zero();
  template <typename X> void add(X x) {
    if constexpr (std::is_same_v<X, V>) vec = vec + x; else one = one + x;
  }
  typename V::value_type total() const { return vec.reduce_add() + one.v; }
};

}  // namespace LLMKERN_ISA
}  // namespace llmkern

namespace llmkern {
namespace LLMKERN_ISA {

// Calls fn(T{}) with the storage type named by dtype.
template <typename Fn>
inline void visit_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::bf16: return fn(bf16{});
    case DType::f16: return fn(f16{});
  }
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
