// RoPE cores, compiled once per CPU ISA (see cpu/vec/vec.h).
// Memory-bound: each head is read and written once; a token's cos/sin row (rotary_dim floats) stays in L1
// across its heads, so the floor is (read x + write out) / bandwidth.
// NeoX pairs (i, i + r/2) are four unit-stride vector loads (x1, x2, cos, sin). GPT-J pairs (2i, 2i+1)
// are adjacent lanes: the vector path loads x as is, duplicates each cos/sin per pair and swaps the pair
// members in registers; fmaddsub supplies the alternating signs. Its scalar twin is the pair loop below.
#include "kernels/rope.h"

#include <algorithm>
#include <cstring>

#include "cpu/vec/vec.h"
#include "kernels/parallel.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

// GPT-J helpers on the ISA's float vector VecF (W lanes = W/2 pairs):
//   dup_pairs(p) = [p0, p0, p1, p1, ...] (reads W/2 floats), swap_pairs(x) = [x1, x0, x3, x2, ...],
//   fmaddsub(a, b, c) = a*b - c on even lanes, a*b + c on odd lanes.
#if defined(LLMKERN_ISA_AVX512)
static inline VecF dup_pairs(const float* p) {
  const __m512i idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  return {_mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(p)))};
}
static inline VecF swap_pairs(VecF x) { return {_mm512_permute_ps(x.v, 0xB1)}; }
static inline VecF fmaddsub(VecF a, VecF b, VecF c) { return {_mm512_fmaddsub_ps(a.v, b.v, c.v)}; }
#elif defined(LLMKERN_ISA_AVX2)
static inline VecF dup_pairs(const float* p) {
  const __m256i idx = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);
  return {_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), idx)};
}
static inline VecF swap_pairs(VecF x) { return {_mm256_permute_ps(x.v, 0xB1)}; }
static inline VecF fmaddsub(VecF a, VecF b, VecF c) { return {_mm256_fmaddsub_ps(a.v, b.v, c.v)}; }
#else
static inline VecF dup_pairs(const float* p) { return VecF::make([&](int l) { return p[l / 2]; }); }
static inline VecF swap_pairs(VecF x) { return VecF::make([&](int l) { return x.v[l ^ 1]; }); }
static inline VecF fmaddsub(VecF a, VecF b, VecF c) {
  return VecF::make([&](int l) { return (l & 1) ? a.v[l] * b.v[l] + c.v[l] : a.v[l] * b.v[l] - c.v[l]; });
}
#endif

// One head: rotates features [0, rotary_dim) of src into dst; `sign` is -1 for the inverse rotation.
// Takes the sizes by value, not the params: stores through T* (and the vector types, which may alias
// anything) would otherwise force the compiler to reload the params' fields in every iteration.
template <typename T>
void rotate_head(int64_t rotary_dim, bool is_neox, const T* src, T* dst, const float* cos, const float* sin,
                 float sign) {
  using V = typename VecFor<T>::type;
  using A = typename V::value_type;
  const int64_t half = rotary_dim / 2;
  if (is_neox) {
    for_each_chunk<V>(half, [&](auto v, int64_t i) {
      using Vv = decltype(v);
      Vv c = Vv::load(cos + i), s = Vv::load(sin + i) * Vv::set1(A(sign));
      Vv x1 = Vv::load(src + i), x2 = Vv::load(src + half + i);  // both loaded before either store (in place)
      (x1 * c - x2 * s).store(dst + i);
      (x2 * c + x1 * s).store(dst + half + i);
    });
    return;
  }
  int64_t i = 0;  // feature index, even
  if constexpr (V::W > 1) {
    for (; i + V::W <= rotary_dim; i += V::W) {
      V x = V::load(src + i);
      V c = dup_pairs(cos + i / 2), s = dup_pairs(sin + i / 2) * V::set1(sign);
      fmaddsub(x, c, swap_pairs(x) * s).store(dst + i);
    }
  }
  using S = ScalarVec<A>;
  for (; i < rotary_dim; i += 2) {
    S c = S::load(cos + i / 2), s = S::load(sin + i / 2) * S::set1(A(sign));
    S a = S::load(src + i), b = S::load(src + i + 1);
    (a * c - b * s).store(dst + i);
    (b * c + a * s).store(dst + i + 1);
  }
}

// Work items [w0, w1) of tokens * heads, item w = (token w / heads, head w % heads), walked token by token:
// one division per call, and one position lookup and cos/sin row per token, shared by its heads (a head
// is only a few vector iterations, so per-head index math was a large share of the bf16 time).
template <typename T>
void rope_heads(const RopeParams& p, int64_t w0, int64_t w1) {
  const float sign = p.inverse ? -1.f : 1.f;
  const int64_t heads = p.heads, rotary_dim = p.rotary_dim, pass = p.head_dim - p.rotary_dim;
  const bool is_neox = p.is_neox, in_place = p.src == p.dst;
  const int64_t src_ts = p.src_token_stride, src_hs = p.src_head_stride;
  const int64_t dst_ts = p.dst_token_stride, dst_hs = p.dst_head_stride;
  int64_t t = w0 / heads, h = w0 % heads;
  for (int64_t w = w0; w < w1; ++t, h = 0) {
    const float* cos = p.cos_sin_cache + p.positions[t] * rotary_dim;
    const T* src = static_cast<const T*>(p.src) + t * src_ts;
    T* dst = static_cast<T*>(p.dst) + t * dst_ts;
    const int64_t h1 = std::min(heads, h + (w1 - w));
    w += h1 - h;
    for (; h < h1; ++h) {
      rotate_head<T>(rotary_dim, is_neox, src + h * src_hs, dst + h * dst_hs, cos, cos + rotary_dim / 2, sign);
      // Features past rotary_dim pass through unchanged (partial rotary); in place they already are.
      if (pass && !in_place)
        std::memcpy(dst + h * dst_hs + rotary_dim, src + h * src_hs + rotary_dim, size_t(pass) * sizeof(T));
    }
  }
}

}  // namespace

void rope_kernel(const RopeParams& p) {
  visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const int64_t head_bytes = p.head_dim * int64_t(sizeof(T)) * 2;
    parallel_for(0, p.tokens * p.heads, grain_for(head_bytes),
                 [&](int64_t w0, int64_t w1) { rope_heads<T>(p, w0, w1); });
  });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
