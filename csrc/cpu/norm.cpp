// RMSNorm family on the CPU: the shared tensor-level ops (ops/norm.h) over the ISA-dispatched cores.
#include "kernels/parallel.h"
#include "ops/norm.h"

namespace llmkern {
namespace {

struct CpuNorm {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void fwd(const RmsNormParams& p) { rms_norm_fwd_kernel(p); }
  static void bwd(const RmsNormBwdParams& p) { rms_norm_bwd_kernel(p); }
  static int64_t dweight_blocks(int64_t) { return max_threads(); }
};

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { register_norm_ops<CpuNorm>(m); }

}  // namespace llmkern
