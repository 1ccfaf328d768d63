// Tensor-level checks and views shared by every op family's CPU and CUDA bindings.
// Each check names the argument, what was expected and what was got.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "kernels/dtype.h"

namespace llmkern {

using at::Tensor;

// The kernel dtype tag for t, which must be float32, bfloat16, float16 or (for gradcheck) float64.
DType kernel_dtype(const Tensor& t, const char* name);

// Same dtype and device as `ref` (named ref_name).
void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name);

// check_like plus the same shape as ref.
void check_same_shape(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name);

// An output may be an input exactly (in place: elementwise kernels load before they store) or be disjoint
// from it, but must not overlap it shifted. Same test as ATen's out= ops (at::assert_no_partial_overlap):
// exact for dense tensors, and layouts too costly to compare are let through.
void check_no_partial_overlap(const Tensor& out, const char* name, const Tensor& in, const char* in_name);
// Two outputs written in place: no memory shared at all (the same test, exact overlap refused too).
void check_disjoint(const Tensor& a, const char* name, const Tensor& b, const char* b_name);

void check_device(const Tensor& t, const char* name, c10::DeviceType device);

// The one stride that steps through dims [0, ndims) of t as a single flattened index (size-1 dims
// ignored): -1 when no single stride does, 0 when every such dim has size 1.
int64_t collapsed_stride(const Tensor& t, int64_t ndims);

// A tensor seen as [rows, cols] rows with unit stride along the last dim and one row stride.
struct Rows {
  Tensor tensor;  // t itself, or a contiguous copy when t's rows could not be addressed in place
  int64_t rows = 0, cols = 0, stride = 0;
  void* data() const { return tensor.data_ptr(); }
};

// Views t's last dim as columns and all leading dims as rows. A layout that cannot be described by
// one row stride is copied to contiguous memory, unless `writable` (the op writes t in place), in
// which case it is rejected with a message.
Rows as_rows(const Tensor& t, const char* name, bool writable = false);

// A fresh, contiguous output shaped like t.
Tensor empty_like_contiguous(const Tensor& t);

}  // namespace llmkern
