// Dense linear y = x W^T (+ bias) kernel parameters and CPU entry point (one linear: a group of one).
// x [m, k] and y [m, n] with row strides in elements, W [n, k] with row stride w_stride, bias [n] or null;
// one dtype for all of them, fp32 accumulation (fp64 for the gradcheck dtype), unit stride along k and n.
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

struct LinearParams {
  DType dtype;
  int64_t m = 0, n = 0, k = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w = nullptr;
  int64_t w_stride = 0;
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t y_stride = 0;
};

// Several linears of one x (a layer's q, k and v projections; gate and up): parts[i] computes y_i = x W_i^T (+ b_i),
// every part with the same dtype, m, k, x and x_stride. One parallel region runs them all: x is converted or
// transposed once and the threads share the parts' tiles (demo-target's serving step, q, k, v and gate, up grouped:
// 1.03-1.04x faster at 1 and 16 sequences on 2 cores).
struct LinearGroup {
  const LinearParams* parts = nullptr;
  int count = 0;
};

LLMKERN_DECLARE_CPU_KERNEL(linear_kernel, LinearGroup)

}  // namespace llmkern
