// fp32 matrix product C = A B on the CPU (training's GEMMs: a linear's forward over many rows and its backward).
// A [m, k] with element (i, l) at a[i * a_rs + l * a_ks], one of the two strides 1 (row-major, or a transposed
// view such as dy^T); B [k, n] rows ldb apart, unit stride along n; C [m, n] rows ldc apart, overwritten.
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"

namespace llmkern {

struct MatmulParams {
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t a_rs = 0, a_ks = 0;
  const float* b = nullptr;
  int64_t ldb = 0;
  float* c = nullptr;
  int64_t ldc = 0;
};

LLMKERN_DECLARE_CPU_KERNEL(matmul_kernel, MatmulParams)

}  // namespace llmkern
