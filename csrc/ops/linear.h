// Dense linear op at the tensor level: checks, output allocation and params. Backend supplies `device` and
// linear(LinearGroup) (one linear is a group of one).
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "kernels/linear.h"
#include "ops/common.h"

namespace llmkern {

template <typename Backend>
struct LinearOps {
  // x [..., K], weight [N, K], bias [N] -> [..., N], all of x's dtype.
  static Tensor linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
    std::vector<Tensor> biases;
    if (bias) biases.push_back(*bias);
    return std::move(linear_group(x, {weight}, biases)[0]);
  }

  // x [..., K], weights[i] [N_i, K], biases empty or biases[i] [N_i] -> [linear(x, weights[i], biases[i])], in
  // one call.
  static std::vector<Tensor> linear_group(const Tensor& x, at::TensorList weights, at::TensorList biases) {
    const c10::DeviceGuard guard(x.device());
    check_device(x, "x", Backend::device);
    const DType dtype = kernel_dtype(x, "x");
    TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension [..., K], got a 0-dim tensor");
    TORCH_CHECK(!weights.empty(), "weights: expected at least one weight [N, K], got an empty list");
    TORCH_CHECK(biases.empty() || biases.size() == weights.size(), "biases: expected none or one per weight (",
                weights.size(), "), got ", biases.size());
    const Rows xr = as_rows(x, "x");
    std::vector<Tensor> outs, keep;  // keep: contiguous copies the kernel reads
    std::vector<LinearParams> parts;
    for (size_t i = 0; i < weights.size(); ++i) {
      const Tensor& weight = weights[i];
      const std::optional<Tensor> bias = biases.empty() ? std::nullopt : std::optional<Tensor>(biases[i]);
      const std::string wname = weights.size() == 1 ? "weight" : "weights[" + std::to_string(i) + "]";
      const std::string bname = weights.size() == 1 ? "bias" : "biases[" + std::to_string(i) + "]";
      check_like(weight, wname.c_str(), x, "x");
      TORCH_CHECK(weight.dim() == 2, wname, ": expected 2 dimensions [N, K], got sizes ", weight.sizes());
      TORCH_CHECK(weight.size(1) == x.size(-1), wname, ": expected K = ", x.size(-1),
                  " columns (x's last dim), got sizes ", weight.sizes());
      if (bias) {
        check_like(*bias, bname.c_str(), x, "x");
        TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), bname, ": expected shape [",
                    weight.size(0), "] (N, out features), got ", bias->sizes());
      }
      std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
      out_shape.back() = weight.size(0);
      Tensor out = outs.emplace_back(at::empty(out_shape, x.options()));
      if (out.numel() == 0) continue;
      if (x.size(-1) == 0) {  // empty sums
        bias ? out.copy_(bias->expand_as(out)) : out.zero_();
        continue;
      }
      const Rows wr = as_rows(weight, wname.c_str());
      keep.push_back(wr.tensor);
      LinearParams& p = parts.emplace_back();
      p.dtype = dtype;
      p.m = xr.rows, p.n = wr.rows, p.k = xr.cols;
      p.x = xr.data(), p.x_stride = xr.stride;
      p.w = wr.data(), p.w_stride = wr.stride;
      p.bias = bias ? keep.emplace_back(bias->contiguous()).data_ptr() : nullptr;
      p.y = out.data_ptr(), p.y_stride = p.n;
    }
    if (!parts.empty()) Backend::linear({parts.data(), static_cast<int>(parts.size())});
    return outs;
  }
};

template <typename Backend>
void register_linear_ops(torch::Library& m) {
  m.impl("linear", &LinearOps<Backend>::linear);
  m.impl("linear_group", &LinearOps<Backend>::linear_group);
}

}  // namespace llmkern
