// Softmax cross entropy with its gradient in place, on the CPU (the loss half of ops.linear_cross_entropy).
#include "kernels/loss.h"
#include "ops/common.h"

namespace llmkern {
namespace {

// logits [..., vocab] (unit stride along vocab; written in place), targets [...] int64 -> loss [...] float32
// (float64 for float64 logits).
Tensor cross_entropy_grad_(Tensor& logits, const Tensor& targets, double scale, int64_t ignore_index) {
  check_device(logits, "logits", c10::DeviceType::CPU);
  check_device(targets, "targets", c10::DeviceType::CPU);
  TORCH_CHECK(logits.dim() >= 1, "logits: expected [..., vocab], got a 0-dim tensor");
  CrossEntropyParams p;
  p.dtype = kernel_dtype(logits, "logits");
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "targets: expected dtype int64, got ", targets.scalar_type());
  const c10::IntArrayRef lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(targets.sizes() == lead, "targets: expected shape ", lead, " (logits' without the vocab dim), got ",
              targets.sizes());
  Rows lr = as_rows(logits, "logits", /*writable=*/true);
  const Tensor t = targets.contiguous();
  const bool in_range = ((t >= 0).logical_and(t < lr.cols)).logical_or(t == ignore_index).all().item<bool>();
  TORCH_CHECK_INDEX(in_range, "targets: expected values in [0, ", lr.cols, ") (the vocab of logits) or ignore_index (",
                    ignore_index, "), got min ", t.numel() ? t.min().item<int64_t>() : 0, ", max ",
                    t.numel() ? t.max().item<int64_t>() : 0);
  Tensor loss = at::empty(lead, logits.options().dtype(p.dtype == DType::f64 ? at::kDouble : at::kFloat));
  p.rows = lr.rows;
  p.vocab = lr.cols;
  p.logits = lr.data();
  p.stride = lr.stride;
  p.targets = t.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.scale = float(scale);
  p.loss = loss.data_ptr();
  if (p.rows) cross_entropy_grad_kernel(p);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { m.impl("cross_entropy_grad_", &cross_entropy_grad_); }

}  // namespace llmkern
