// RMSNorm ops at the tensor level: checks, output allocation and params, shared by the CPU and CUDA
// bindings. Backend supplies `device`, fwd(RmsNormParams), bwd(RmsNormBwdParams) and dweight_blocks(rows).
#pragma once
#include <optional>
#include <tuple>

#include "kernels/norm.h"
#include "ops/common.h"

namespace llmkern {

template <typename Backend>
struct NormOps {
  // x: [..., hidden]; weight: [hidden] or None. Fills the input side of the params.
  static RmsNormParams params(const Tensor& x, const Rows& xr, const std::optional<Tensor>& weight,
                              double eps, bool weight_offset) {
    check_device(x, "x", Backend::device);
    RmsNormParams p;
    p.dtype = kernel_dtype(x, "x");
    TORCH_CHECK(xr.cols > 0, "x: expected a non-empty last (hidden) dim, got sizes ", x.sizes());
    TORCH_CHECK(eps >= 0, "eps: expected >= 0, got ", eps);
    if (weight) {
      check_like(*weight, "weight", x, "x");
      TORCH_CHECK(weight->dim() == 1 && weight->size(0) == xr.cols, "weight: expected shape [", xr.cols,
                  "] (the hidden size of x), got ", weight->sizes());
      TORCH_CHECK(weight->stride(0) == 1 || xr.cols == 1, "weight: expected a contiguous tensor, got stride ",
                  weight->stride(0));
      p.weight = weight->data_ptr();
    } else {
      TORCH_CHECK(!weight_offset, "weight_offset: needs a weight, got weight=None");
    }
    p.rows = xr.rows;
    p.hidden = xr.cols;
    p.x = xr.data();
    p.x_stride = xr.stride;
    p.weight_offset = weight_offset;
    p.eps = eps;
    return p;
  }

  // rstd's dtype: the kernels' accumulation type for x.
  static at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

  static Tensor rstd_for(const Tensor& x, int64_t rows) { return at::empty({rows}, x.options().dtype(acc_type(x))); }

  // -> (out [..., hidden], rstd [rows] float32 (float64 for float64 x))
  static std::tuple<Tensor, Tensor> rms_norm(const Tensor& x, const std::optional<Tensor>& weight, double eps,
                                             bool weight_offset) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Rows xr = as_rows(x, "x");
    RmsNormParams p = params(x, xr, weight, eps, weight_offset);
    Tensor out = empty_like_contiguous(x), rstd = rstd_for(x, xr.rows);
    p.out = out.data_ptr();
    p.out_stride = xr.cols;
    p.rstd = rstd.data_ptr();
    if (p.rows) Backend::fwd(p);
    return {out, rstd};
  }

  static void rms_norm_out(Tensor& out, const Tensor& x, const std::optional<Tensor>& weight, double eps,
                           bool weight_offset) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Rows xr = as_rows(x, "x");
    RmsNormParams p = params(x, xr, weight, eps, weight_offset);
    check_same_shape(out, "out", x, "x");
    check_no_partial_overlap(out, "out", x, "x");
    Rows outr = as_rows(out, "out", /*writable=*/true);
    p.out = outr.data();
    p.out_stride = outr.stride;
    if (p.rows) Backend::fwd(p);
  }

  static void set_residual(RmsNormParams& p, const Tensor& x, const Tensor& residual, const Rows& rr) {
    check_same_shape(residual, "residual", x, "x");
    p.residual = rr.data();
    p.residual_stride = rr.stride;
  }

  // -> (out, residual_out = x + residual, rstd); differentiable through rms_norm_bwd.
  static std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm(const Tensor& x, const Tensor& residual,
                                                               const std::optional<Tensor>& weight, double eps,
                                                               bool weight_offset) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Rows xr = as_rows(x, "x");
    RmsNormParams p = params(x, xr, weight, eps, weight_offset);
    set_residual(p, x, residual, as_rows(residual, "residual"));
    Tensor out = empty_like_contiguous(x), sum = empty_like_contiguous(x), rstd = rstd_for(x, xr.rows);
    p.out = out.data_ptr();
    p.out_stride = xr.cols;
    p.residual_out = sum.data_ptr();
    p.residual_out_stride = xr.cols;
    p.rstd = rstd.data_ptr();
    if (p.rows) Backend::fwd(p);
    return {out, sum, rstd};
  }

  // In place, for inference: residual += x, then x = rms_norm(residual).
  static void fused_add_rms_norm_(Tensor& x, Tensor& residual, const std::optional<Tensor>& weight, double eps,
                                  bool weight_offset) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Rows xr = as_rows(x, "x", /*writable=*/true);
    RmsNormParams p = params(x, xr, weight, eps, weight_offset);
    Rows rr = as_rows(residual, "residual", /*writable=*/true);
    set_residual(p, x, residual, rr);
    check_disjoint(residual, "residual", x, "x");  // both written: x + residual to one, its norm to the other
    p.out = xr.data();
    p.out_stride = xr.stride;
    p.residual_out = rr.data();
    p.residual_out_stride = rr.stride;
    if (p.rows) Backend::fwd(p);
  }

  // Fills dx (and dweight, given exactly when weight is) from dy, x, rstd and the optional dresidual.
  static void bwd_into(Tensor& dx, const std::optional<Tensor>& dweight, const Tensor& dy, const Tensor& x,
                       const std::optional<Tensor>& weight, const Tensor& rstd, bool weight_offset,
                       const std::optional<Tensor>& dresidual) {
    Rows xr = as_rows(x, "x");
    RmsNormParams fp = params(x, xr, weight, 0.0, weight_offset);
    check_same_shape(dy, "dy", x, "x");
    Tensor rstd_c = rstd.contiguous();
    const auto acc = acc_type(x);
    TORCH_CHECK(rstd.scalar_type() == acc && rstd.numel() == xr.rows, "rstd: expected the [", xr.rows, "] ", acc,
                " tensor returned by the forward, got ", rstd.scalar_type(), " ", rstd.sizes());
    check_device(rstd, "rstd", Backend::device);
    check_same_shape(dx, "dx", x, "x");
    check_no_partial_overlap(dx, "dx", x, "x");
    check_no_partial_overlap(dx, "dx", dy, "dy");
    TORCH_CHECK(dweight.has_value() == weight.has_value(), "dweight: expected a tensor exactly when weight is given",
                " (weight is ", weight ? "given" : "None", ")");
    Rows dyr = as_rows(dy, "dy"), dxr = as_rows(dx, "dx", /*writable=*/true);
    RmsNormBwdParams p;
    p.dtype = fp.dtype;
    p.rows = xr.rows;
    p.hidden = xr.cols;
    p.dy = dyr.data();
    p.dy_stride = dyr.stride;
    p.x = xr.data();
    p.x_stride = xr.stride;
    p.weight = fp.weight;
    p.weight_offset = weight_offset;
    p.rstd = rstd_c.data_ptr();
    p.dx = dxr.data();
    p.dx_stride = dxr.stride;
    Rows dresr;
    if (dresidual) {
      check_same_shape(*dresidual, "dresidual", x, "x");
      check_no_partial_overlap(dx, "dx", *dresidual, "dresidual");
      dresr = as_rows(*dresidual, "dresidual");
      p.dresidual = dresr.data();
      p.dresidual_stride = dresr.stride;
    }
    Tensor partial;
    if (dweight) {
      check_like(*dweight, "dweight", x, "x");
      TORCH_CHECK(dweight->dim() == 1 && dweight->size(0) == xr.cols && dweight->is_contiguous(),
                  "dweight: expected a contiguous [", xr.cols, "] tensor, got sizes ", dweight->sizes(), " strides ",
                  dweight->strides());
      p.blocks = std::max<int64_t>(1, std::min<int64_t>(xr.rows, Backend::dweight_blocks(xr.rows)));
      partial = at::empty({p.blocks, xr.cols}, rstd_c.options());
      p.dweight = dweight->data_ptr();
      p.dweight_partial = partial.data_ptr();
    }
    if (p.rows) {
      Backend::bwd(p);
    } else if (dweight) {
      dweight->zero_();
    }
  }

  // -> (dx, dweight); dweight is empty when weight is None.
  static std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x,
                                                 const std::optional<Tensor>& weight, const Tensor& rstd,
                                                 bool weight_offset, const std::optional<Tensor>& dresidual) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Tensor dx = empty_like_contiguous(x);
    Tensor dweight = at::empty({weight ? x.size(-1) : 0}, x.options());
    bwd_into(dx, weight ? std::optional<Tensor>(dweight) : std::nullopt, dy, x, weight, rstd, weight_offset,
             dresidual);
    return {dx, dweight};
  }

  static void rms_norm_bwd_out(Tensor& dx, const std::optional<Tensor>& dweight, const Tensor& dy, const Tensor& x,
                               const std::optional<Tensor>& weight, const Tensor& rstd, bool weight_offset,
                               const std::optional<Tensor>& dresidual) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    bwd_into(dx, dweight, dy, x, weight, rstd, weight_offset, dresidual);
  }
};

// Registers the family's ops for one dispatch key; called inside TORCH_LIBRARY_IMPL.
template <typename Backend>
void register_norm_ops(torch::Library& m) {
  m.impl("rms_norm", &NormOps<Backend>::rms_norm);
  m.impl("rms_norm_out", &NormOps<Backend>::rms_norm_out);
  m.impl("fused_add_rms_norm", &NormOps<Backend>::fused_add_rms_norm);
  m.impl("fused_add_rms_norm_", &NormOps<Backend>::fused_add_rms_norm_);
  m.impl("rms_norm_bwd", &NormOps<Backend>::rms_norm_bwd);
  m.impl("rms_norm_bwd_out", &NormOps<Backend>::rms_norm_bwd_out);
}

}  // namespace llmkern
