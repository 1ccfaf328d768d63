// Softmax cross entropy with its gradient in place: kernel parameters and CPU entry point.
// Row r of logits [rows, vocab] (row stride `stride` elements, unit stride along vocab) with target t = targets[r]:
// loss[r] = logsumexp(x) - x[t], and x becomes scale * (softmax(x) - onehot(t)), the gradient of scale * loss[r].
// A row whose target is ignore_index gets loss 0 and gradient 0; every other target is in [0, vocab) (the binding
// checks).
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

struct CrossEntropyParams {
  DType dtype;
  int64_t rows = 0, vocab = 0;
  void* logits = nullptr;
  int64_t stride = 0;
  const int64_t* targets = nullptr;
  int64_t ignore_index = -100;
  float scale = 1.f;
  void* loss = nullptr;  // [rows], float32 (float64 for float64 logits)
};

LLMKERN_DECLARE_CPU_KERNEL(cross_entropy_grad_kernel, CrossEntropyParams)

}  // namespace llmkern
