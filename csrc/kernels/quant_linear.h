// Internal entry points shared between the weight-only linear TUs (quant_linear.cpp, quant_gemm.cpp),
// compiled once per CPU ISA: declared inside LLMKERN_ISA so each ISA's definition stays its own symbol.
#pragma once
#include "kernels/quant.h"

namespace llmkern {
namespace LLMKERN_ISA {

// The many-row (GEMM) path of qlinear_kernel: W is dequantized tile by tile into an fp32 scratch once
// per call and reused for every row of x. Requires dtype f32/bf16/f16, k > 0, and for the 4-bit formats
// group % 32 == 0 and k % group == 0 (nf4: blocks start on row boundaries).
void qlinear_gemm(const QLinearParams& p);

}  // namespace LLMKERN_ISA
}  // namespace llmkern
