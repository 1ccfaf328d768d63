// Internals shared by the CPU quant kernels (quant_pack.cpp, quant_linear.cpp, quant_gemm.cpp), compiled once
// per CPU ISA: inside LLMKERN_ISA so each ISA's definitions stay its own symbols.
#pragma once
#include "kernels/prefetch.h"
#include "kernels/quant.h"

namespace llmkern {
namespace LLMKERN_ISA {

// Keeps the compiler from fusing the rounded product or sum around it into an FMA (the formats round
// each fp32 operation; GCC contracts a * b + c by default).
static inline float rounded(float x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(x));
#else
  volatile float v = x;
  x = v;
#endif
  return x;
}

// Scale i of an int4 / int8 weight as fp32.
static inline float scale_at(const QWeight& w, int64_t i) {
  switch (w.scales_dtype) {
    case DType::bf16: return to_float(static_cast<const bf16*>(w.scales)[i]);
    case DType::f16: return to_float(static_cast<const f16*>(w.scales)[i]);
    case DType::f64: return float(static_cast<const double*>(w.scales)[i]);
    default: return static_cast<const float*>(w.scales)[i];
  }
}

// absmax of nf4 block b (nested: bitsandbytes' code2[q] * absmax2[b / 256] + offset, each rounded to fp32).
static inline float nf4_absmax(const QWeight& w, int64_t b) {
  if (w.absmax) return w.absmax[b];
  return rounded(w.nested_code[w.nested_q[b]] * w.nested_absmax[b / 256]) + w.nested_offset;
}

// Prefetches into L2 the scale bytes of groups (nf4: blocks) [g0, g0 + ng): nf4 absmax or its nested codes, int4
// scales and zero points. The GEMV and GEMM stream them beside the weight rows, whose own prefetches do not cover them.
static inline void prefetch_scales(const QWeight& w, int64_t g0, int64_t ng) {
  if (ng <= 0) return;
  if (w.format == QFormat::nf4) {
    if (w.absmax) prefetch_l2_span(w.absmax + g0, ng * int64_t(sizeof(float)));
    else prefetch_l2_span(w.nested_q + g0, ng);
    return;
  }
  const int64_t size = dtype_size(w.scales_dtype);
  prefetch_l2_span(static_cast<const char*>(w.scales) + g0 * size, ng * size);
  if (w.zeros) prefetch_l2_span(w.zeros + g0, ng);
}

// The many-row (GEMM) path of qlinear_kernel (kernels/outer_gemm.h): W is dequantized tile by tile into an fp32
// scratch once per panel of up to 64 rows of x and reused for every row of the panel. Requires dtype f32/bf16/f16,
// k > 0, and for the 4-bit formats group % 32 == 0 and k % group == 0 (nf4: blocks start on row boundaries).
void qlinear_gemm(const QLinearParams& p);

// bf16 x on the amx build, 8 to 512 rows, k a multiple of 32 (and qlinear_gemm's conditions): y = x W^T on the AMX
// tiles (quant_gemm.cpp), returning true; false (nothing done) elsewhere.
bool qlinear_tiles(const QLinearParams& p);

// Whether qlinear_gemm runs w against bf16 x of up to 32 rows as code_tiles (quant_gemm.cpp: avx512bf16, a 4-bit W
// with k a multiple of 128 and groups of 32, 64 or a multiple of 128).
bool qlinear_code_tiles(const QWeight& w);

}  // namespace LLMKERN_ISA
}  // namespace llmkern
