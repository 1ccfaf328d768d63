// Gated activations on the CPU: the shared tensor-level ops (ops/activation.h) over the ISA-dispatched cores.
#include "ops/activation.h"

namespace llmkern {
namespace {

struct CpuActivation {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void fwd(const ActMulParams& p) { act_mul_fwd_kernel(p); }
  static void bwd(const ActMulBwdParams& p) { act_mul_bwd_kernel(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { register_activation_ops<CpuActivation>(m); }

}  // namespace llmkern
