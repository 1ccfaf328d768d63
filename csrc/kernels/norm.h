// RMSNorm kernel parameters (shared by the CPU and CUDA cores) and the CPU entry points.
// All tensors are [rows, hidden] with a row stride in elements and unit stride along hidden.
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

// y = x * rstd * w', rstd = 1 / sqrt(mean(x^2) + eps), w' = w, 1 + w (Gemma) or 1 (no weight).
// Fused add (residual != nullptr): s = x + residual is written to residual_out and normalized instead
// of x, in one pass (vLLM fused_add_rms_norm); out and residual_out may alias x and residual.
struct RmsNormParams {
  DType dtype;  // of x, residual, weight, out
  int64_t rows = 0, hidden = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  void* residual_out = nullptr;
  int64_t residual_out_stride = 0;
  const void* weight = nullptr;  // [hidden] or nullptr
  bool weight_offset = false;
  double eps = 1e-6;  // narrowed to the accumulation type by the kernel, so float64 keeps it exact
  void* out = nullptr;
  int64_t out_stride = 0;
  void* rstd = nullptr;  // [rows] accumulation type (float, double for f64) or nullptr
};

// dx = rstd * (dy*w' - x * rstd^2 * mean(dy*w'*x)) (+ dresidual), dw = sum_rows dy * x * rstd.
struct RmsNormBwdParams {
  DType dtype;
  int64_t rows = 0, hidden = 0;
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* x = nullptr;  // the tensor that was normalized (s for the fused variant)
  int64_t x_stride = 0;
  const void* weight = nullptr;
  bool weight_offset = false;
  const void* rstd = nullptr;       // [rows] from the forward
  const void* dresidual = nullptr;  // gradient of residual_out (fused variant), added to dx; or nullptr
  int64_t dresidual_stride = 0;
  void* dx = nullptr;
  int64_t dx_stride = 0;
  void* dweight = nullptr;          // [hidden] in dtype, or nullptr to skip dw
  void* dweight_partial = nullptr;  // [blocks, hidden] accumulation-type workspace when dweight is set
  int64_t blocks = 1;               // row blocks, each summing its own dw partial
};

LLMKERN_DECLARE_CPU_KERNEL(rms_norm_fwd_kernel, RmsNormParams)
LLMKERN_DECLARE_CPU_KERNEL(rms_norm_bwd_kernel, RmsNormBwdParams)

}  // namespace llmkern
