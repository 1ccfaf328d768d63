// Gated activation ops (SwiGLU / GeGLU) at the tensor level: checks, output allocation and params, shared
// by the CPU and CUDA bindings. Backend supplies `device`, fwd(ActMulParams) and bwd(ActMulBwdParams).
// Packed x [..., 2d] is gate = x[..., :d], up = x[..., d:]: two row views of x with x's row stride.
#pragma once
#include <tuple>
#include <utility>

#include <ATen/MemoryOverlap.h>

#include "kernels/activation.h"
#include "ops/common.h"

namespace llmkern {

template <typename Backend>
struct ActivationOps {
  static Activation parse(c10::string_view name) {
    if (name == "silu") return Activation::silu;
    if (name == "gelu_tanh") return Activation::gelu_tanh;
    TORCH_CHECK_VALUE(false, "activation: expected \"silu\" or \"gelu_tanh\", got \"", name, "\"");
  }

  // `cols` elements of t's dtype past base: where the up half of a packed row starts.
  static void* skip(void* base, const Tensor& t, int64_t cols) {
    return static_cast<char*>(base) + cols * t.element_size();
  }

  // x [..., 2d]: fills dtype, act, rows, d and the gate/up views of x.
  static ActMulParams packed(const Tensor& x, const Rows& xr, c10::string_view activation) {
    check_device(x, "x", Backend::device);
    ActMulParams p;
    p.dtype = kernel_dtype(x, "x");
    p.act = parse(activation);
    TORCH_CHECK(xr.cols > 0 && xr.cols % 2 == 0,
                "x: expected a non-empty, even last dim (gate and up halves), got sizes ", x.sizes());
    p.rows = xr.rows;
    p.d = xr.cols / 2;
    p.gate = xr.data();
    p.up = skip(xr.data(), x, p.d);
    p.gate_stride = p.up_stride = xr.stride;
    return p;
  }

  // The shape of x [..., 2d] with the last dim halved: [..., d].
  static std::vector<int64_t> half_shape(const Tensor& x) {
    std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
    s.back() /= 2;
    return s;
  }

  // t (out or dy) is [..., d] for x [..., 2d], with x's dtype and device.
  static void check_half_of(const Tensor& t, const char* name, const Tensor& x) {
    check_like(t, name, x, "x");
    const std::vector<int64_t> want = half_shape(x);
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(want), name, ": expected shape ", c10::IntArrayRef(want),
                " (x's with the last dim halved), got ", t.sizes());
  }

  // -> act(x[..., :d]) * x[..., d:], [..., d]
  static Tensor act_and_mul(const Tensor& x, c10::string_view activation) {
    check_device(x, "x", Backend::device);  // before allocating on x's device
    TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a 0-dim tensor");
    Tensor out = at::empty(half_shape(x), x.options());
    act_and_mul_out(out, x, activation);
    return out;
  }

  // out [..., d], possibly with strided rows.
  static void act_and_mul_out(Tensor& out, const Tensor& x, c10::string_view activation) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Rows xr = as_rows(x, "x");
    ActMulParams p = packed(x, xr, activation);
    check_half_of(out, "out", x);
    Rows outr = as_rows(out, "out", /*writable=*/true);
    check_no_partial_overlap(out, "out", x, "x");
    p.out = outr.data();
    p.out_stride = outr.stride;
    if (p.rows) Backend::fwd(p);
  }

  // dy [..., d] -> dx [..., 2d] = [dgate, dup].
  static Tensor act_and_mul_bwd(const Tensor& dy, const Tensor& x, c10::string_view activation) {
    check_device(x, "x", Backend::device);  // before allocating on x's device
    Tensor dx = empty_like_contiguous(x);
    act_and_mul_bwd_out(dx, dy, x, activation);
    return dx;
  }

  // dx [..., 2d], possibly with strided rows, written as two row views (dgate, dup) of one tensor.
  static void act_and_mul_bwd_out(Tensor& dx, const Tensor& dy, const Tensor& x, c10::string_view activation) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    Rows xr = as_rows(x, "x");
    ActMulParams fp = packed(x, xr, activation);
    check_half_of(dy, "dy", x);
    check_same_shape(dx, "dx", x, "x");
    Rows dyr = as_rows(dy, "dy"), dxr = as_rows(dx, "dx", /*writable=*/true);
    check_no_partial_overlap(dx, "dx", x, "x");
    check_no_partial_overlap(dx, "dx", dy, "dy");
    ActMulBwdParams p = bwd_params(fp, dyr);
    p.dgate = dxr.data();
    p.dup = skip(dxr.data(), dx, p.d);
    p.dgate_stride = p.dup_stride = dxr.stride;
    if (p.rows) Backend::bwd(p);
  }

  // gate, up [..., d] of one shape: fills everything but the output.
  static ActMulParams separate(const Tensor& gate, const Rows& gr, const Tensor& up, const Rows& ur,
                               c10::string_view activation) {
    ActMulParams p;
    p.rows = gr.rows;
    p.d = gr.cols;
    p.gate = gr.data();
    p.gate_stride = gr.stride;
    p.up = ur.data();
    p.up_stride = ur.stride;
    p.dtype = kernel_dtype(gate, "gate");
    p.act = parse(activation);
    return p;
  }

  static void check_separate(const Tensor& gate, const Tensor& up) {
    check_device(gate, "gate", Backend::device);
    kernel_dtype(gate, "gate");
    check_same_shape(up, "up", gate, "gate");
    TORCH_CHECK(gate.dim() == 0 || gate.size(-1) > 0, "gate: expected a non-empty last dim, got sizes ",
                gate.sizes());
  }

  // -> act(gate) * up, [..., d]
  static Tensor act_mul(const Tensor& gate, const Tensor& up, c10::string_view activation) {
    const c10::DeviceGuard guard(gate.device());  // kernels run on the device of the data
    check_separate(gate, up);
    Rows gr = as_rows(gate, "gate"), ur = as_rows(up, "up");
    ActMulParams p = separate(gate, gr, up, ur, activation);
    Tensor out = empty_like_contiguous(gate);
    p.out = out.data_ptr();
    p.out_stride = p.d;
    if (p.rows) Backend::fwd(p);
    return out;
  }

  // -> (dgate, dup), each of gate's shape.
  static std::tuple<Tensor, Tensor> act_mul_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up,
                                                c10::string_view activation) {
    check_device(gate, "gate", Backend::device);  // before allocating on gate's device
    Tensor dgate = empty_like_contiguous(gate), dup = empty_like_contiguous(gate);
    act_mul_bwd_out(dgate, dup, dy, gate, up, activation);
    return {dgate, dup};
  }

  // dgate, dup of gate's shape, each possibly with strided rows.
  static void act_mul_bwd_out(Tensor& dgate, Tensor& dup, const Tensor& dy, const Tensor& gate, const Tensor& up,
                              c10::string_view activation) {
    const c10::DeviceGuard guard(gate.device());  // kernels run on the device of the data
    check_separate(gate, up);
    check_same_shape(dy, "dy", gate, "gate");
    check_same_shape(dgate, "dgate", gate, "gate");
    check_same_shape(dup, "dup", gate, "gate");
    Rows gr = as_rows(gate, "gate"), ur = as_rows(up, "up"), dyr = as_rows(dy, "dy");
    Rows dgr = as_rows(dgate, "dgate", /*writable=*/true), dur = as_rows(dup, "dup", /*writable=*/true);
    // The two outputs must be disjoint (one would overwrite the other); each may alias an input exactly.
    const auto both = at::get_overlap_status(dgate, dup);
    TORCH_CHECK(both != at::MemOverlapStatus::Full && both != at::MemOverlapStatus::Partial,
                "dup: expected memory disjoint from dgate's");
    for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dgate, "dgate"}, {&dup, "dup"}}) {
      check_no_partial_overlap(*t, name, gate, "gate");
      check_no_partial_overlap(*t, name, up, "up");
      check_no_partial_overlap(*t, name, dy, "dy");
    }
    ActMulBwdParams p = bwd_params(separate(gate, gr, up, ur, activation), dyr);
    p.dgate = dgr.data();
    p.dgate_stride = dgr.stride;
    p.dup = dur.data();
    p.dup_stride = dur.stride;
    if (p.rows) Backend::bwd(p);
  }

  // The backward's inputs: the forward's (gate, up) plus dy.
  static ActMulBwdParams bwd_params(const ActMulParams& f, const Rows& dyr) {
    ActMulBwdParams p;
    p.dtype = f.dtype;
    p.act = f.act;
    p.rows = f.rows;
    p.d = f.d;
    p.gate = f.gate;
    p.gate_stride = f.gate_stride;
    p.up = f.up;
    p.up_stride = f.up_stride;
    p.dy = dyr.data();
    p.dy_stride = dyr.stride;
    return p;
  }
};

// Registers the family's ops for one dispatch key; called inside TORCH_LIBRARY_IMPL.
template <typename Backend>
void register_activation_ops(torch::Library& m) {
  m.impl("act_and_mul", &ActivationOps<Backend>::act_and_mul);
  m.impl("act_and_mul_out", &ActivationOps<Backend>::act_and_mul_out);
  m.impl("act_and_mul_bwd", &ActivationOps<Backend>::act_and_mul_bwd);
  m.impl("act_and_mul_bwd_out", &ActivationOps<Backend>::act_and_mul_bwd_out);
  m.impl("act_mul", &ActivationOps<Backend>::act_mul);
  m.impl("act_mul_bwd", &ActivationOps<Backend>::act_mul_bwd);
  m.impl("act_mul_bwd_out", &ActivationOps<Backend>::act_mul_bwd_out);
}

}  // namespace llmkern
