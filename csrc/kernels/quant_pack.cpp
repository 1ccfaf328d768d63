// Quantize / dequantize cores for the weight-only formats of kernels/quant.h, compiled once per CPU ISA.
// Quantization follows the contract bit for bit (bitsandbytes' CPU results for nf4 and blockwise8).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "cpu/vec/vec.h"
#include "kernels/parallel.h"
#include "kernels/quant.h"
#include "kernels/quant_linear.h"

namespace llmkern {
namespace LLMKERN_ISA {
namespace {

template <typename T> static inline float load_f(const T* p, int64_t i) { return to_float(p[i]); }

// Rounds v to scales_dtype and back, and stores it there.
static inline float store_scale(const QWeight& w, int64_t i, float v) {
  void* s = const_cast<void*>(w.scales);
  switch (w.scales_dtype) {
    case DType::bf16: static_cast<bf16*>(s)[i] = to_bf16(v); return to_float(to_bf16(v));
    case DType::f16: static_cast<f16*>(s)[i] = to_f16(v); return to_float(to_f16(v));
    case DType::f64: static_cast<double*>(s)[i] = double(v); return v;
    default: static_cast<float*>(s)[i] = v; return v;
  }
}

// ---- dequantize
// nf4 and int4 share one core: every block of `group` flattened elements (an nf4 block, an int4 row group)
// maps its 16 codes through a table of 16 fp32 values (nf4: code[q] * absmax; int4: (q - z) * s, the same
// fp32 products as per element), and the packed nibbles are expanded through it: a vector permute on
// AVX-512 (16 lanes = the whole table) and AVX2 (two 8-lane halves), a table lookup on the scalar path.

// Stores 2 * nbytes values table[nibble] (element 2i = high nibble of src[i]) to out as T.
template <typename T>
static inline void expand_nibbles(const float* table, const uint8_t* src, int64_t nbytes, T* out) {
  int64_t i = 0;
#if defined(LLMKERN_ISA_AVX512)
  if constexpr (!std::is_same_v<T, double>) {
    const __m512 tab = _mm512_loadu_ps(table);
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (; i + 16 <= nbytes; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask), lo = _mm_and_si128(b, mask);
      VecF{_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), tab)}.store(out + 2 * i);
      VecF{_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), tab)}.store(out + 2 * i + 16);
    }
  }
#elif defined(LLMKERN_ISA_AVX2)
  if constexpr (!std::is_same_v<T, double>) {
    const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    const __m128i mask = _mm_set1_epi8(0x0F);
    auto lookup = [&](__m128i idx8) {  // 8 codes in the low bytes -> 8 values
      const __m256i idx = _mm256_cvtepu8_epi32(idx8);
      // code >= 8 (bit 3, shifted into the sign bit) takes the high half of the table
      return VecF{_mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                                   _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))};
    };
    for (; i + 8 <= nbytes; i += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
      const __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
      lookup(idx).store(out + 2 * i);
      lookup(_mm_srli_si128(idx, 8)).store(out + 2 * i + 8);
    }
  }
#endif
  if (i < nbytes) {
    T t[16];
    for (int q = 0; q < 16; ++q) ScalarVec<float>{table[q]}.store(t + q);
    for (; i < nbytes; ++i) {
      out[2 * i] = t[src[i] >> 4];
      out[2 * i + 1] = t[src[i] & 0xF];
    }
  }
}

// Blocks of w.group flattened elements over numel; table(b, float[16]) fills block b's table.
template <typename T, typename Table>
void dequant_blocks(const QWeight& w, int64_t numel, T* out, Table&& table) {
  const int64_t g = w.group, blocks = (numel + g - 1) / g;
  const uint8_t* data = static_cast<const uint8_t*>(w.data);
  parallel_for(0, blocks, grain_for(g * int64_t(sizeof(T))), [&](int64_t b0, int64_t b1) {
    float t[16];
    for (int64_t b = b0; b < b1; ++b) {
      table(b, t);
      const int64_t e0 = b * g, count = std::min(numel - e0, g);  // e0 is even: g is
      expand_nibbles(t, data + e0 / 2, count / 2, out + e0);
      if (count & 1) {  // odd numel: the last value
        ScalarVec<float>{t[data[(e0 + count - 1) / 2] >> 4]}.store(out + e0 + count - 1);
      }
    }
  });
}

template <typename T>
void dequant_nf4(const QWeight& w, T* out) {
  dequant_blocks(w, w.n * w.k, out, [&](int64_t b, float* t) {
    const float am = nf4_absmax(w, b);
    for (int q = 0; q < 16; ++q) t[q] = w.code[q] * am;
  });
}

template <typename T>
void dequant_int4(const QWeight& w, T* out) {
  // Row r's group c / group is flattened block r * (k / group) + c / group: k is a multiple of group.
  dequant_blocks(w, w.n * w.k, out, [&](int64_t b, float* t) {
    const float s = scale_at(w, b);
    const int z = w.zeros ? w.zeros[b] : 8;
    for (int q = 0; q < 16; ++q) t[q] = float(q - z) * s;
  });
}

template <typename T>
void dequant_int8(const QWeight& w, T* out) {
  const int8_t* data = static_cast<const int8_t*>(w.data);
  parallel_for(0, w.n, grain_for(w.k * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = scale_at(w, r);
      const int8_t* src = data + r * w.k;
      T* dst = out + r * w.k;
      int64_t c = 0;
#if defined(LLMKERN_ISA_AVX512)
      if constexpr (!std::is_same_v<T, double>) {
        const __m512 vs = _mm512_set1_ps(s);
        for (; c + 16 <= w.k; c += 16) {
          const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
          VecF{_mm512_mul_ps(_mm512_cvtepi32_ps(q), vs)}.store(dst + c);
        }
      }
#elif defined(LLMKERN_ISA_AVX2)
      if constexpr (!std::is_same_v<T, double>) {
        const __m256 vs = _mm256_set1_ps(s);
        for (; c + 8 <= w.k; c += 8) {
          const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c)));
          VecF{_mm256_mul_ps(_mm256_cvtepi32_ps(q), vs)}.store(dst + c);
        }
      }
#endif
      for (; c < w.k; ++c) ScalarVec<float>{float(src[c]) * s}.store(dst + c);
    }
  });
}

// ---- quantize

// The nf4 code of v: the number of midpoints strictly below v (an exact midpoint takes the lower code).
static inline int nf4_code(float v, const float* mid) {
  int q = 0;
  for (int i = 0; i < 15; ++i) q += mid[i] < v;
  return q;
}

// A full nf4 block of bs (>= 32, a power of two) values on a SIMD path: max|x| and the codes (as floats,
// counting the midpoints below each scaled value) vectorized; the nibbles are packed from `codes`.
// Returns false on the scalar ISA (the caller runs the scalar loop).
template <typename T>
static inline bool nf4_block_simd(const T* x, int64_t bs, const float* mid, float* am_out, float* codes) {
#if defined(LLMKERN_ISA_AVX512) || defined(LLMKERN_ISA_AVX2)
  using V = VecF;
  V vmax = V::zero();
  for (int64_t e = 0; e < bs; e += V::W) {
    const V v = V::load(x + e);
    vmax = max(vmax, max(v, V::zero() - v));
  }
  float lanes[V::W];
  vmax.store(lanes);
  float am = 0.f;
  for (int l = 0; l < V::W; ++l) am = std::max(am, lanes[l]);
  am = am + 0.0f;  // -0 (every value a zero) stores +0, as bitsandbytes
  *am_out = am;
  const V recip = V::set1(1.0f / std::max(am, 1e-38f)), one = V::set1(1.f), lo = V::set1(-1.f), zero = V::zero();
  for (int64_t e = 0; e < bs; e += V::W) {
    const V v = min(max(V::load(x + e) * recip, lo), one);
    V q = zero;
    for (int i = 0; i < 15; ++i) q = q + V::select_gt(v, V::set1(mid[i]), one, zero);
    q.store(codes + e);
  }
  return true;
#else
  (void)x, (void)bs, (void)mid, (void)am_out, (void)codes;
  return false;
#endif
}

template <typename T>
void quant_nf4(const QQuantParams& p) {
  const QWeight& w = p.w;
  const T* x = static_cast<const T*>(p.x);
  const int64_t numel = w.n * w.k, bs = w.group, blocks = (numel + bs - 1) / bs;
  float mid[15];
  for (int i = 0; i < 15; ++i) mid[i] = (w.code[i] + w.code[i + 1]) / 2.0f;
  uint8_t* data = static_cast<uint8_t*>(const_cast<void*>(w.data));
  float* absmax = const_cast<float*>(w.absmax);
  parallel_for(0, blocks, grain_for(bs * int64_t(sizeof(T))), [&](int64_t b0, int64_t b1) {
    float codes[4096];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * bs, e1 = std::min(numel, e0 + bs);
      if (e1 - e0 == bs && nf4_block_simd(x + e0, bs, mid, absmax + b, codes)) {
        for (int64_t i = 0; i < bs; i += 2) data[(e0 + i) >> 1] = uint8_t((int(codes[i]) << 4) | int(codes[i + 1]));
        continue;
      }
      float am = 0.f;
      for (int64_t e = e0; e < e1; ++e) am = std::max(am, std::fabs(load_f(x, e)));
      const bool partial = e1 - e0 < bs;
      const float clamped = std::max(am, 1e-38f), recip = 1.0f / clamped;
      absmax[b] = partial ? clamped : am;
      for (int64_t e = e0; e < e1; e += 2) {
        int q[2] = {7, 7};  // an odd numel pads the last low nibble with code 7 (0.0)
        for (int j = 0; j < 2 && e + j < e1; ++j) {
          const float xv = load_f(x, e + j);
          const float v = std::clamp(partial ? xv / clamped : xv * recip, -1.0f, 1.0f);
          q[j] = nf4_code(v, mid);
        }
        data[e >> 1] = uint8_t((q[0] << 4) | q[1]);
      }
    }
  });
}

template <typename T>
void quant_int4(const QQuantParams& p) {
  const QWeight& w = p.w;
  const T* x = static_cast<const T*>(p.x);
  const int64_t groups = w.k / w.group;
  uint8_t* data = static_cast<uint8_t*>(const_cast<void*>(w.data));
  uint8_t* zeros = const_cast<uint8_t*>(w.zeros);
  parallel_for(0, w.n, grain_for(w.k * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * w.group, c1 = c0 + w.group, i = r * groups + g;
        const T* xr = x + r * w.k;
        float lo = 0.f, hi = 0.f, s;
        int z;
        for (int64_t c = c0; c < c1; ++c) {
          const float v = load_f(xr, c);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        if (!zeros) {
          const float xmax = std::max(-lo, hi);
          s = store_scale(w, i, xmax == 0.f ? 1.0f : 2.0f * xmax / 15.0f);
          z = 8;
        } else {
          if (lo == 0.f && hi == 0.f) lo = -1.f, hi = 1.f;
          s = store_scale(w, i, (hi - lo) / 15.0f);
          z = int(std::clamp(std::nearbyint(-lo / s), 0.0f, 15.0f));
          zeros[i] = uint8_t(z);
        }
        for (int64_t c = c0; c < c1; c += 2) {
          int q[2];
          for (int j = 0; j < 2; ++j)
            q[j] = int(std::clamp(std::nearbyint(load_f(xr, c + j) / s) + float(z), 0.0f, 15.0f));
          data[r * (w.k / 2) + (c >> 1)] = uint8_t((q[0] << 4) | q[1]);
        }
      }
    }
  });
}

template <typename T>
void quant_int8(const QQuantParams& p) {
  const QWeight& w = p.w;
  const T* x = static_cast<const T*>(p.x);
  int8_t* data = static_cast<int8_t*>(const_cast<void*>(w.data));
  parallel_for(0, w.n, grain_for(w.k * int64_t(sizeof(T))), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * w.k;
      float am = 0.f;
      for (int64_t c = 0; c < w.k; ++c) am = std::max(am, std::fabs(load_f(xr, c)));
      const float s = store_scale(w, r, am / 127.0f);
      for (int64_t c = 0; c < w.k; ++c)
        data[r * w.k + c] = s == 0.f ? 0 : int8_t(std::clamp(std::nearbyint(load_f(xr, c) / s), -127.0f, 127.0f));
    }
  });
}

}  // namespace

void dequantize_kernel(const QDequantParams& p) {
  visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    T* out = static_cast<T*>(p.out);
    switch (p.w.format) {
      case QFormat::nf4: return dequant_nf4(p.w, out);
      case QFormat::int4: return dequant_int4(p.w, out);
      case QFormat::int8: return dequant_int8(p.w, out);
    }
  });
}

void quantize_kernel(const QQuantParams& p) {
  visit_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (!std::is_same_v<T, double>) {
      switch (p.w.format) {
        case QFormat::nf4: return quant_nf4<T>(p);
        case QFormat::int4: return quant_int4<T>(p);
        case QFormat::int8: return quant_int8<T>(p);
      }
    }
  });
}

void quantize_blockwise8_kernel(const Blockwise8Params& p) {
  // bitsandbytes' CPU LUT: lut[j] = #{ i : mid[i] < -1 + 2 j / 65535 }.
  float mid[255];
  for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (p.code[i] + p.code[i + 1]);
  static thread_local uint8_t lut[65536];
  for (int j = 0; j < 65536; ++j) {
    const float val = -1.0f + (2.0f * float(j)) / 65535.0f;
    int q = 0;
    while (q < 255 && mid[q] < val) ++q;  // mid is sorted
    lut[j] = uint8_t(q);
  }
  const uint8_t* table = lut;
  const int64_t blocks = (p.numel + p.block - 1) / p.block;
  parallel_for(0, blocks, grain_for(p.block * 4), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * p.block, e1 = std::min(p.numel, e0 + p.block);
      float am = 0.f;
      for (int64_t e = e0; e < e1; ++e) am = std::max(am, std::fabs(p.x[e]));
      p.absmax[b] = am;
      if (am == 0.f) {
        std::memset(p.q + e0, 0, size_t(e1 - e0));
        continue;
      }
      const float recip = 1.0f / am;
      for (int64_t e = e0; e < e1; ++e) {
        const float v = std::clamp(p.x[e] * recip, -1.0f, 1.0f);
        const float t = rounded(((v + 1.0f) * 0.5f) * 65535.0f);
        p.q[e] = table[int(t + 0.5f)];
      }
    }
  });
}

}  // namespace LLMKERN_ISA
}  // namespace llmkern
