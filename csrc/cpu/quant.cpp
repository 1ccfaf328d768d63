// Weight-only quantization on the CPU: the shared tensor-level ops (ops/quant.h) over the ISA-dispatched cores.
#include "ops/quant.h"

namespace llmkern {
namespace {

struct CpuQuant {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void qlinear(const QLinearParams& p) { qlinear_kernel(p); }
  static void dequantize(const QDequantParams& p) { dequantize_kernel(p); }
  static void quantize(const QQuantParams& p) { quantize_kernel(p); }
  static void blockwise8(const Blockwise8Params& p) { quantize_blockwise8_kernel(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { register_quant_ops<CpuQuant>(m); }

}  // namespace llmkern
