// Benchmark ceilings on the CPU: bench_copy_ and bench_read over contiguous float32 tensors, and bench_fma_.
#include "kernels/membench.h"
#include "ops/common.h"

namespace llmkern {
namespace {

// The probes address raw float memory: t must be a contiguous float32 CPU tensor.
const float* probe_data(const Tensor& t, const char* name) {
  check_device(t, name, c10::DeviceType::CPU);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
  return t.data_ptr<float>();
}

// dst: any shape, src: same numel; dst = src.
void bench_copy_(Tensor& dst, const Tensor& src) {
  MemCopyParams p;
  p.dst = const_cast<float*>(probe_data(dst, "dst"));
  p.src = probe_data(src, "src");
  TORCH_CHECK(dst.numel() == src.numel(), "src: expected the numel of dst (", dst.numel(), "), got ",
              src.numel());
  p.n = src.numel();
  if (p.n) mem_copy_kernel(p);
}

// src: any shape -> sum of its elements.
double bench_read(const Tensor& src) {
  MemReadParams p;
  double sum = 0;
  p.src = probe_data(src, "src");
  p.n = src.numel();
  p.sum = &sum;
  if (p.n) mem_read_kernel(p);
  return sum;
}

// out: float32 [tasks], one entry per parallel task, each running `iters` rounds of FMA chains -> the FLOPs done.
int64_t bench_fma_(Tensor& out, int64_t iters) {
  TORCH_CHECK(iters >= 0, "iters: expected a count >= 0, got ", iters);
  FmaPeakParams p;
  int64_t flops = 0;
  p.out = const_cast<float*>(probe_data(out, "out"));
  p.tasks = out.numel();
  p.iters = iters;
  p.flops = &flops;
  if (p.tasks) fma_peak_kernel(p);
  return flops;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) {
  m.impl("bench_copy_", &bench_copy_);
  m.impl("bench_read", &bench_read);
  m.impl("bench_fma_", &bench_fma_);
}

}  // namespace llmkern
