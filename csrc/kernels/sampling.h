// Greedy token selection: kernel parameters and CPU entry point.
// out[r] = the index of the largest element of row r of x [rows, cols] (row stride `stride` elements, unit stride
// along cols), the first one on ties; a row holding NaN gives its first NaN, as torch.argmax does. cols >= 1.
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

struct ArgmaxParams {
  DType dtype;
  int64_t rows = 0, cols = 0, stride = 0;
  const void* x = nullptr;
  int64_t* out = nullptr;  // [rows]
};

LLMKERN_DECLARE_CPU_KERNEL(argmax_kernel, ArgmaxParams)

}  // namespace llmkern
