// STUB: replaced by the forward kernel branch.
#include <stdexcept>
#include "kernels/attention.h"
namespace llmkern {
namespace LLMKERN_ISA {
void attn_fwd_kernel(const AttnParams&) { throw std::runtime_error("attn_fwd_kernel: not implemented"); }
void kv_write_kernel(const KvWriteParams&) { throw std::runtime_error("kv_write_kernel: not implemented"); }
}  // namespace LLMKERN_ISA
}  // namespace llmkern
