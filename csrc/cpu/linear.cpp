// Dense linear on the CPU: the shared tensor-level op (ops/linear.h) over the ISA-dispatched core.
#include "ops/linear.h"

namespace llmkern {
namespace {

struct CpuLinear {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void linear(const LinearGroup& g) { linear_kernel(g); }
};

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { register_linear_ops<CpuLinear>(m); }

}  // namespace llmkern
