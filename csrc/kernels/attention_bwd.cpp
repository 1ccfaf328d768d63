// STUB: replaced by the backward kernel branch.
#include <stdexcept>
#include "kernels/attention.h"
namespace llmkern {
namespace LLMKERN_ISA {
void attn_bwd_kernel(const AttnBwdParams&) { throw std::runtime_error("attn_bwd_kernel: not implemented"); }
}  // namespace LLMKERN_ISA
}  // namespace llmkern
