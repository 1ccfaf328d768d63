// Gated activations (SwiGLU / GeGLU) kernel parameters and CPU entry points.
// out = act(gate) * up, row by row: gate, up, out are [rows, d] with row strides in elements and unit
// stride along d. For a packed [rows, 2d] input, gate = x[:, :d] and up = x[:, d:] (stride 2d each).
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

enum class Activation : int {
  silu,       // x * sigmoid(x)
  gelu_tanh,  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))
};

struct ActMulParams {
  DType dtype;
  Activation act;
  int64_t rows = 0, d = 0;
  const void* gate = nullptr;
  int64_t gate_stride = 0;
  const void* up = nullptr;
  int64_t up_stride = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
};

// dgate = dy * up * act'(gate), dup = dy * act(gate).
struct ActMulBwdParams {
  DType dtype;
  Activation act;
  int64_t rows = 0, d = 0;
  const void* dy = nullptr;
  int64_t dy_stride = 0;
  const void* gate = nullptr;
  int64_t gate_stride = 0;
  const void* up = nullptr;
  int64_t up_stride = 0;
  void* dgate = nullptr;
  int64_t dgate_stride = 0;
  void* dup = nullptr;
  int64_t dup_stride = 0;
};

LLMKERN_DECLARE_CPU_KERNEL(act_mul_fwd_kernel, ActMulParams)
LLMKERN_DECLARE_CPU_KERNEL(act_mul_bwd_kernel, ActMulBwdParams)

}  // namespace llmkern
