// Greedy token selection on the CPU (the sampler's argmax).
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

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { m.impl("argmax", &argmax); }

}  // namespace llmkern
