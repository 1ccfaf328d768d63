// Storage types and scalar conversions shared by every kernel (CPU and CUDA host side).
// Torch-free on purpose: kernels take raw pointers plus one of these tags.
// Functions here are `static inline`: this header is compiled into every ISA's translation units, and
// an external inline function compiled with AVX-512 flags could be the copy the linker keeps for all.
#pragma once
#include <cstdint>
#include <cstring>

namespace llmkern {

enum class DType : int { f32, f16, bf16, f64 };

// Bytes of one element.
static inline int64_t dtype_size(DType dt) { return dt == DType::f64 ? 8 : dt == DType::f32 ? 4 : 2; }

// 16-bit storage types: plain bit containers, converted through float.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float to_float(bf16 h) { return bits_to_float(uint32_t(h.bits) << 16); }

// Round to nearest even, quiet NaNs kept NaN (same rounding as c10::BFloat16).
static inline bf16 to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// IEEE half <-> float in software (the scalar path cannot assume F16C).
static inline float to_float(f16 h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {                                                               // zero / subnormal
    float f = float(man) * (1.0f / 16777216.0f);                               // man * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline f16 to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)}; // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                       // below 2^-14: subnormal half
    // Adding 0.5 (2^-1) aligns the mantissa so the FPU rounds to the 2^-24 grid for us.
    float r = bits_to_float(a) + 0.5f;
    return f16{uint16_t(sign | uint16_t(float_to_bits(r) - 0x3f000000u))};
  }
  uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);  // rebias, round to even
  return f16{uint16_t(sign | uint16_t(rounded >> 13))};
}

static inline float to_float(float f) { return f; }

}  // namespace llmkern
