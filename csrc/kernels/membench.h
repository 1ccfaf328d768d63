// Memory-bandwidth probes for the benchmark harness (bench/harness.py): a copy and a read over float
// buffers with the widest vector of the ISA on every thread. They measure the ceiling that
// memory-bound kernels are quoted against, so they use the same ordinary loads and stores as those
// kernels (no non-temporal stores: a kernel's stores also read the line for ownership first).
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"

namespace llmkern {

// dst[i] = src[i] for i < n; dst and src do not overlap.
struct MemCopyParams {
  const float* src = nullptr;
  float* dst = nullptr;
  int64_t n = 0;
};

// *sum = sum of src[i] for i < n (returned so the loads are not optimised away).
struct MemReadParams {
  const float* src = nullptr;
  int64_t n = 0;
  double* sum = nullptr;
};

LLMKERN_DECLARE_CPU_KERNEL(mem_copy_kernel, MemCopyParams)
LLMKERN_DECLARE_CPU_KERNEL(mem_read_kernel, MemReadParams)

}  // namespace llmkern
