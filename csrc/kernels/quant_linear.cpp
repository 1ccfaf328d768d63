// Fused weight-only quantized linear (kernels/quant.h). STUB: the real kernels land with helper qlinear.
#include <stdexcept>

#include "kernels/quant.h"

namespace llmkern {
namespace LLMKERN_ISA {

void qlinear_kernel(const QLinearParams&) { throw std::runtime_error("qlinear_kernel: not implemented yet"); }

}  // namespace LLMKERN_ISA
}  // namespace llmkern
