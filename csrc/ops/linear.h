// Dense linear op at the tensor level: checks, output allocation and params. Backend supplies `device` and
// linear(LinearParams).
#pragma once
#include <optional>
#include <vector>

#include "kernels/linear.h"
#include "ops/common.h"

namespace llmkern {

template <typename Backend>
struct LinearOps {
  // x [..., K], weight [N, K], bias [N] -> [..., N], all of x's dtype.
  static Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
    const c10::DeviceGuard guard(x.device());
    check_device(x, "x", Backend::device);
    LinearParams p;
    p.dtype = kernel_dtype(x, "x");
    TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension [..., K], got a 0-dim tensor");
    check_like(weight, "weight", x, "x");
    TORCH_CHECK(weight.dim() == 2, "weight: expected 2 dimensions [N, K], got sizes ", weight.sizes());
    TORCH_CHECK(weight.size(1) == x.size(-1), "weight: expected K = ", x.size(-1), " columns (x's last dim), got sizes ",
                weight.sizes());
    if (bias) {
      check_like(*bias, "bias", x, "x");
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape [", weight.size(0),
                  "] (N, out features), got ", bias->sizes());
    }
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = weight.size(0);
    Tensor out = at::empty(out_shape, x.options());
    if (out.numel() == 0) return out;
    if (x.size(-1) == 0) return bias ? out.copy_(bias->expand_as(out)) : out.zero_();  // empty sums
    Rows xr = as_rows(x, "x"), wr = as_rows(weight, "weight");
    const Tensor b = bias ? bias->contiguous() : Tensor();
    p.m = xr.rows, p.n = wr.rows, p.k = xr.cols;
    p.x = xr.data(), p.x_stride = xr.stride;
    p.w = wr.data(), p.w_stride = wr.stride;
    p.bias = bias ? b.data_ptr() : nullptr;
    p.y = out.data_ptr(), p.y_stride = p.n;
    Backend::linear(p);
    return out;
  }
};

template <typename Backend>
void register_linear_ops(torch::Library& m) {
  m.impl("linear", &LinearOps<Backend>::linear);
}

}  // namespace llmkern
