// Ceiling probes for the benchmark harness (bench/harness.py). A copy and a read over float buffers with the
// widest vector of the ISA on every thread: the ceiling that memory-bound kernels are quoted against, so they use
// the same ordinary loads and stores as those kernels (no non-temporal stores: a kernel's stores also read the line
// for ownership first). And the float32 FMA peak: the ceiling of compute-bound fp32 kernels, which torch.mm's rate
// understates (its own overheads included).
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

// Each of `tasks` tasks (spread over the threads) runs `iters` rounds of independent vector FMA chains in registers,
// x = 0.5 x + 1 (settling at 2), and writes the sum of its chains' lanes to out[task]; *flops = the FLOPs done, 2
// per lane and FMA.
struct FmaPeakParams {
  float* out = nullptr;
  int64_t tasks = 0, iters = 0;
  int64_t* flops = nullptr;
};

LLMKERN_DECLARE_CPU_KERNEL(mem_copy_kernel, MemCopyParams)
LLMKERN_DECLARE_CPU_KERNEL(mem_read_kernel, MemReadParams)
LLMKERN_DECLARE_CPU_KERNEL(fma_peak_kernel, FmaPeakParams)

}  // namespace llmkern
