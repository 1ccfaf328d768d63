#include "ops/common.h"

#include <ATen/MemoryOverlap.h>

namespace llmkern {

DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    case at::kDouble: return DType::f64;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype float32, bfloat16, float16 or float64, got ",
                       t.scalar_type());
  }
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected the device of ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

void check_same_shape(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_like(t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
}

void check_no_partial_overlap(const Tensor& out, const char* name, const Tensor& in, const char* in_name) {
  TORCH_CHECK(at::get_overlap_status(out, in) != at::MemOverlapStatus::Partial, name,
              ": expected memory disjoint from ", in_name, "'s or exactly the same (in place); it partially overlaps");
}

void check_disjoint(const Tensor& a, const char* name, const Tensor& b, const char* b_name) {
  const auto status = at::get_overlap_status(a, b);
  TORCH_CHECK(status != at::MemOverlapStatus::Partial && status != at::MemOverlapStatus::Full, name,
              ": expected memory disjoint from ", b_name, "'s (both are written), they overlap");
}

void check_device(const Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, ": expected a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
}

int64_t collapsed_stride(const Tensor& t, int64_t ndims) {
  int64_t stride = 0, expected = -1;
  for (int64_t d = ndims - 1; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expected >= 0 && t.stride(d) != expected) return -1;
    if (expected < 0) stride = t.stride(d);
    expected = t.stride(d) * t.size(d);
  }
  return stride;
}

Rows as_rows(const Tensor& t, const char* name, bool writable) {
  TORCH_CHECK(t.dim() >= 1, name, ": expected at least 1 dimension, got a 0-dim tensor");
  const int64_t cols = t.size(-1);
  int64_t stride = (t.stride(-1) == 1 || cols == 1) ? collapsed_stride(t, t.dim() - 1) : -1;
  Tensor held = t;
  if (writable) {
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                ": written in place, so its elements must not overlap (e.g. an expanded tensor); got strides ",
                t.strides());
  }
  if (stride < 0) {
    TORCH_CHECK(!writable, name, ": written in place, so its rows must be addressable with unit stride "
                "along the last dim and one stride across the leading dims; got sizes ", t.sizes(),
                " strides ", t.strides());
    held = t.contiguous();
    stride = cols;
  }
  return Rows{held, cols == 0 ? 0 : t.numel() / cols, cols, stride};
}

Tensor empty_like_contiguous(const Tensor& t) { return at::empty(t.sizes(), t.options()); }

}  // namespace llmkern
