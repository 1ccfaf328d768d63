// Dense linear on the CPU: the shared tensor-level op (ops/linear.h) over the ISA-dispatched core; and mm, the fp32
// matrix product of training's linears.
#include "kernels/matmul.h"
#include "ops/linear.h"

namespace llmkern {
namespace {

struct CpuLinear {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void linear(const LinearGroup& g) { linear_kernel(g); }
};

// a [M, K] @ b [K, N] -> [M, N], float32. a is read in place when either stride is 1 (a transposed view
// included), b when its rows are contiguous.
Tensor mm(const Tensor& a, const Tensor& b) {
  check_device(a, "a", c10::DeviceType::CPU);
  check_device(b, "b", c10::DeviceType::CPU);
  TORCH_CHECK(a.scalar_type() == at::kFloat, "a: expected float32, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == at::kFloat, "b: expected float32, got ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2, "a: expected 2 dimensions [M, K], got sizes ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == a.size(1), "b: expected [K, N] with K = ", a.size(1),
              " (a's columns), got sizes ", b.sizes());
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  if (out.numel() == 0) return out;
  const Tensor av = a.stride(0) == 1 || a.stride(1) == 1 ? a : a.contiguous();
  const Tensor bv = b.stride(1) == 1 || b.size(1) == 1 ? b : b.contiguous();
  MatmulParams p;
  p.m = a.size(0), p.n = b.size(1), p.k = a.size(1);
  p.a = av.data_ptr<float>(), p.a_rs = av.stride(0), p.a_ks = av.stride(1);  // a_rs == 1: column-major (dy^T)
  p.b = bv.data_ptr<float>(), p.ldb = bv.stride(0);
  p.c = out.data_ptr<float>(), p.ldc = p.n;
  matmul_kernel(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) {
  register_linear_ops<CpuLinear>(m);
  m.impl("mm", &mm);
}

}  // namespace llmkern
