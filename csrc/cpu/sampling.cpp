// Token selection on the CPU: the sampler's argmax and its top-k / top-p filter.
#include "kernels/sampling.h"
#include "ops/common.h"

namespace llmkern {
namespace {

// x [..., n] (n >= 1, unit stride along n) -> int64 [...]: the index of each row's first maximum (first NaN).
Tensor argmax(const Tensor& x) {
  check_device(x, "x", c10::DeviceType::CPU);
  TORCH_CHECK(x.dim() >= 1, "x: expected [..., n], got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) > 0, "x: expected a non-empty last dim (argmax of nothing), got shape ", x.sizes());
  ArgmaxParams p;
  p.dtype = kernel_dtype(x, "x");
  const Rows xr = as_rows(x, "x");
  Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.stride = xr.stride;
  p.x = xr.data();
  p.out = out.data_ptr<int64_t>();
  if (p.rows) argmax_kernel(p);
  return out;
}

// logits [rows, vocab] float32 (unit stride along vocab), top_k int64 [rows], top_p float32 [rows] in (0, 1]: removed
// tokens become -inf in place (kernels/sampling.h).
void top_k_top_p_(Tensor& logits, const Tensor& top_k, const Tensor& top_p) {
  check_device(logits, "logits", c10::DeviceType::CPU);
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "logits: expected float32 [rows, vocab], got ", logits.scalar_type(), " ", logits.sizes());
  const int64_t rows = logits.size(0);
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == rows && top_k.scalar_type() == at::kLong,
              "top_k: expected int64 [", rows, "], got ", top_k.scalar_type(), " ", top_k.sizes());
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == rows && top_p.scalar_type() == at::kFloat,
              "top_p: expected float32 [", rows, "], got ", top_p.scalar_type(), " ", top_p.sizes());
  check_device(top_k, "top_k", c10::DeviceType::CPU);
  check_device(top_p, "top_p", c10::DeviceType::CPU);
  const Tensor k = top_k.contiguous(), pp = top_p.contiguous();
  for (int64_t r = 0; r < rows; ++r) {
    const float v = pp.data_ptr<float>()[r];
    TORCH_CHECK(v > 0.f && v <= 1.f, "top_p: expected values in (0, 1], got ", v, " in row ", r);
  }
  const Rows xr = as_rows(logits, "logits", /*writable=*/true);
  TopKTopPParams p;
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.stride = xr.stride;
  p.x = static_cast<float*>(xr.data());
  p.top_k = k.data_ptr<int64_t>();
  p.top_p = pp.data_ptr<float>();
  if (p.rows && p.cols) top_k_top_p_kernel(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) {
  m.impl("argmax", &argmax);
  m.impl("top_k_top_p_", &top_k_top_p_);
}

}  // namespace llmkern
