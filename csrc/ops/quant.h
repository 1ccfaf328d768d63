// Weight-only quantization ops at the tensor level: checks, output allocation and QWeight/params filling,
// shared by the CPU and CUDA bindings. Backend supplies `device`, qlinear(QLinearParams) and
// dequantize(QDequantParams); quantize(QQuantParams) and blockwise8(Blockwise8Params) are optional (a backend
// without them registers only the linear and dequantize ops).
#pragma once
#include <optional>
#include <tuple>
#include <vector>

#include "kernels/quant.h"
#include "ops/common.h"

namespace llmkern {

template <typename Backend>
struct QuantOps {
  static constexpr bool can_quantize = requires(const QQuantParams& p) { Backend::quantize(p); };
  static constexpr bool can_blockwise8 = requires(const Blockwise8Params& p) { Backend::blockwise8(p); };

  // Contiguous copies of inputs whose pointers go into params live here until the kernel returns.
  struct Keep {
    std::vector<Tensor> held;
    const void* ptr(const Tensor& t) {
      held.push_back(t.contiguous());
      return held.back().data_ptr();
    }
  };

  static void check_on(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
    check_device(t, name, Backend::device);
    TORCH_CHECK(t.device() == ref.device(), name, ": expected the device of ", ref_name, " (", ref.device(),
                "), got ", t.device());
  }

  static void check_dtype(const Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  }

  // A float tensor of scales: float32, bfloat16 or float16.
  static DType scale_dtype(const Tensor& t, const char* name) {
    const auto s = t.scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
                     ": expected dtype float32, bfloat16 or float16, got ", s);
    return kernel_dtype(t, name);
  }

  // A weight to quantize: float32, bfloat16 or float16.
  static DType weight_dtype(const Tensor& w, const char* name) { return scale_dtype(w, name); }

  static void check_shape(const Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                          const char* what) {
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), name, ": expected shape ", c10::IntArrayRef(shape), " (",
                what, "), got ", t.sizes());
  }

  static void check_code(const Tensor& code, const char* name, int64_t len, const Tensor& ref, const char* ref_name) {
    check_on(code, name, ref, ref_name);
    check_dtype(code, name, at::kFloat);
    TORCH_CHECK(code.dim() == 1 && code.size(0) == len, name, ": expected a [", len, "] float32 code table, got shape ",
                code.sizes());
  }

  // The kernel dtype tag of a requested output dtype (float32, bfloat16, float16 or float64).
  static DType out_dtype(at::ScalarType dtype, const char* name) {
    switch (dtype) {
      case at::kFloat: return DType::f32;
      case at::kBFloat16: return DType::bf16;
      case at::kHalf: return DType::f16;
      case at::kDouble: return DType::f64;
      default:
        TORCH_CHECK_TYPE(false, name, ": expected float32, bfloat16, float16 or float64, got ", dtype);
    }
  }

  static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

  // ---- nf4

  static void check_block_size(int64_t block_size) {
    TORCH_CHECK(block_size >= 32 && block_size <= 4096 && (block_size & (block_size - 1)) == 0,
                "block_size: expected one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (bitsandbytes' block sizes), got ",
                block_size);
  }

  // The nf4 weight of n * k elements (flattened); `ref` is the tensor whose device everything must share.
  static QWeight nf4_weight(Keep& keep, int64_t n, int64_t k, const Tensor& packed, const Tensor& absmax,
                            int64_t block_size, const Tensor& code, const std::optional<Tensor>& nested_absmax,
                            const std::optional<Tensor>& nested_code, double nested_offset, const Tensor& ref,
                            const char* ref_name) {
    check_block_size(block_size);
    const int64_t numel = n * k, blocks = ceil_div(numel, block_size);
    check_on(packed, "packed", ref, ref_name);
    check_dtype(packed, "packed", at::kByte);
    TORCH_CHECK(packed.numel() == (numel + 1) / 2, "packed: expected (numel + 1) / 2 = ", (numel + 1) / 2,
                " bytes for ", numel, " 4-bit values, got ", packed.numel(), " (shape ", packed.sizes(), ")");
    check_code(code, "code", 16, ref, ref_name);
    check_on(absmax, "absmax", ref, ref_name);
    QWeight w;
    w.format = QFormat::nf4;
    w.n = n;
    w.k = k;
    w.group = block_size;
    w.data = keep.ptr(packed);
    w.code = static_cast<const float*>(keep.ptr(code));
    if (nested_absmax) {
      check_dtype(absmax, "absmax", at::kByte);  // 8-bit codes of absmax - nested_offset
      TORCH_CHECK(absmax.numel() == blocks, "absmax: expected ceil(numel / block_size) = ", blocks,
                  " 8-bit codes (one per block of ", block_size, "), got ", absmax.numel());
      check_on(*nested_absmax, "nested_absmax", ref, ref_name);
      check_dtype(*nested_absmax, "nested_absmax", at::kFloat);
      TORCH_CHECK(nested_absmax->numel() == ceil_div(blocks, 256), "nested_absmax: expected ceil(blocks / 256) = ",
                  ceil_div(blocks, 256), " values (one per 256 absmax codes), got ", nested_absmax->numel());
      TORCH_CHECK(nested_code.has_value(), "nested_code: expected the [256] code table of the nested absmax, got None");
      check_code(*nested_code, "nested_code", 256, ref, ref_name);
      w.nested_q = static_cast<const uint8_t*>(keep.ptr(absmax));
      w.nested_absmax = static_cast<const float*>(keep.ptr(*nested_absmax));
      w.nested_code = static_cast<const float*>(keep.ptr(*nested_code));
      w.nested_offset = static_cast<float>(nested_offset);
    } else {
      check_dtype(absmax, "absmax", at::kFloat);
      TORCH_CHECK(absmax.numel() == blocks, "absmax: expected ceil(numel / block_size) = ", blocks,
                  " values (one per block of ", block_size, "), got ", absmax.numel());
      TORCH_CHECK(!nested_code.has_value(), "nested_code: given without nested_absmax");
      TORCH_CHECK(nested_offset == 0.0, "nested_offset: given (", nested_offset, ") without nested_absmax");
      w.absmax = static_cast<const float*>(keep.ptr(absmax));
    }
    return w;
  }

  // ---- int4

  static void check_group_size(int64_t group_size) {
    TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "group_size: expected 32, 64 or 128, got ", group_size);
  }

  static void check_k_groups(int64_t k, int64_t group_size, const char* k_name) {
    check_group_size(group_size);
    TORCH_CHECK(k % group_size == 0, "group_size: K = ", k_name, " = ", k, " is not a multiple of group_size = ",
                group_size);
  }

  // packed [N, K / 2] with K = 2 * packed.size(1); scales [N, K / G]; zeros uint8 [N, K / G] or None.
  static QWeight int4_weight(Keep& keep, const Tensor& packed, const Tensor& scales,
                             const std::optional<Tensor>& zeros, int64_t group_size, const Tensor& ref,
                             const char* ref_name) {
    check_on(packed, "packed", ref, ref_name);
    check_dtype(packed, "packed", at::kByte);
    TORCH_CHECK(packed.dim() == 2, "packed: expected a 2-d [N, K / 2] uint8 tensor, got shape ", packed.sizes());
    const int64_t n = packed.size(0), k = 2 * packed.size(1);
    check_k_groups(k, group_size, "2 * packed.size(1)");
    check_on(scales, "scales", ref, ref_name);
    QWeight w;
    w.format = QFormat::int4;
    w.n = n;
    w.k = k;
    w.group = group_size;
    w.scales_dtype = scale_dtype(scales, "scales");
    check_shape(scales, "scales", {n, k / group_size}, "[N, K / group_size]");
    if (zeros) {
      check_on(*zeros, "zeros", ref, ref_name);
      check_dtype(*zeros, "zeros", at::kByte);
      check_shape(*zeros, "zeros", {n, k / group_size}, "[N, K / group_size]");
      w.zeros = static_cast<const uint8_t*>(keep.ptr(*zeros));
    }
    w.data = keep.ptr(packed);
    w.scales = keep.ptr(scales);
    return w;
  }

  // ---- int8

  // q int8 [N, K]; scales [N].
  static QWeight int8_weight(Keep& keep, const Tensor& q, const Tensor& scales, const Tensor& ref,
                             const char* ref_name) {
    check_on(q, "q", ref, ref_name);
    check_dtype(q, "q", at::kChar);
    TORCH_CHECK(q.dim() == 2, "q: expected a 2-d [N, K] int8 tensor, got shape ", q.sizes());
    check_on(scales, "scales", ref, ref_name);
    QWeight w;
    w.format = QFormat::int8;
    w.n = q.size(0);
    w.k = q.size(1);
    w.group = w.k;
    w.scales_dtype = scale_dtype(scales, "scales");
    check_shape(scales, "scales", {w.n}, "[N], one per row of q");
    w.data = keep.ptr(q);
    w.scales = keep.ptr(scales);
    return w;
  }

  // ---- linear: x [..., K] -> [..., N]

  static Tensor linear(const Tensor& x, const QWeight& w, const std::optional<Tensor>& bias) {
    check_device(x, "x", Backend::device);
    QLinearParams p;
    p.dtype = kernel_dtype(x, "x");
    TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension [..., K], got a 0-dim tensor");
    TORCH_CHECK(x.size(-1) == w.k, "x: expected last dim K = ", w.k, " (in_features of the weight), got ",
                x.size(-1));
    TORCH_CHECK(w.k >= 1, "x: expected a non-empty last dim K, got sizes ", x.sizes());
    Rows xr = as_rows(x, "x");
    Keep keep;
    if (bias) {
      check_like(*bias, "bias", x, "x");
      check_shape(*bias, "bias", {w.n}, "[N], out_features");
      p.bias = keep.ptr(*bias);
    }
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = w.n;
    Tensor out = at::empty(out_shape, x.options());
    p.w = w;
    p.m = xr.rows;
    p.x = xr.data();
    p.x_stride = xr.stride;
    p.out = out.data_ptr();
    p.out_stride = w.n;
    if (p.m > 0 && w.n > 0) Backend::qlinear(p);
    return out;
  }

  static Tensor nf4_linear(const Tensor& x, const Tensor& packed, const Tensor& absmax, int64_t out_features,
                           int64_t block_size, const Tensor& code, const std::optional<Tensor>& bias,
                           const std::optional<Tensor>& nested_absmax, const std::optional<Tensor>& nested_code,
                           double nested_offset) {
    const c10::DeviceGuard guard(x.device());
    check_device(x, "x", Backend::device);
    TORCH_CHECK(out_features >= 1, "out_features: expected >= 1, got ", out_features);
    TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension [..., K], got a 0-dim tensor");
    Keep keep;
    QWeight w = nf4_weight(keep, out_features, x.size(-1), packed, absmax, block_size, code, nested_absmax,
                           nested_code, nested_offset, x, "x");
    return linear(x, w, bias);
  }

  static Tensor int4_linear(const Tensor& x, const Tensor& packed, const Tensor& scales,
                            const std::optional<Tensor>& zeros, int64_t group_size, const std::optional<Tensor>& bias) {
    const c10::DeviceGuard guard(x.device());
    check_device(x, "x", Backend::device);
    Keep keep;
    QWeight w = int4_weight(keep, packed, scales, zeros, group_size, x, "x");
    return linear(x, w, bias);
  }

  static Tensor int8_linear(const Tensor& x, const Tensor& q, const Tensor& scales, const std::optional<Tensor>& bias) {
    const c10::DeviceGuard guard(x.device());
    check_device(x, "x", Backend::device);
    Keep keep;
    QWeight w = int8_weight(keep, q, scales, x, "x");
    return linear(x, w, bias);
  }

  // ---- dequantize

  static Tensor dequantize(const QWeight& w, at::IntArrayRef shape, at::ScalarType dtype, const Tensor& ref) {
    QDequantParams p;
    p.w = w;
    p.dtype = out_dtype(dtype, "dtype");
    Tensor out = at::empty(shape, ref.options().dtype(dtype));
    p.out = out.data_ptr();
    if (out.numel() > 0) Backend::dequantize(p);
    return out;
  }

  static Tensor dequantize_nf4(const Tensor& packed, const Tensor& absmax, at::IntArrayRef shape,
                               at::ScalarType dtype, int64_t block_size, const Tensor& code,
                               const std::optional<Tensor>& nested_absmax, const std::optional<Tensor>& nested_code,
                               double nested_offset) {
    const c10::DeviceGuard guard(packed.device());
    check_device(packed, "packed", Backend::device);
    int64_t numel = 1;
    for (int64_t s : shape) {
      TORCH_CHECK(s >= 0, "shape: expected non-negative sizes, got ", shape);
      numel *= s;
    }
    // Rows of the last dim (the kernel only sees the flattened n * k elements).
    const int64_t k = shape.empty() ? 1 : shape.back(), n = k > 0 ? numel / k : 0;
    Keep keep;
    QWeight w = nf4_weight(keep, n, k, packed, absmax, block_size, code, nested_absmax, nested_code, nested_offset,
                           packed, "packed");
    return dequantize(w, shape, dtype, packed);
  }

  static Tensor dequantize_int4(const Tensor& packed, const Tensor& scales, const std::optional<Tensor>& zeros,
                                int64_t group_size, std::optional<at::ScalarType> dtype) {
    const c10::DeviceGuard guard(packed.device());
    check_device(packed, "packed", Backend::device);
    Keep keep;
    QWeight w = int4_weight(keep, packed, scales, zeros, group_size, packed, "packed");
    return dequantize(w, {w.n, w.k}, dtype.value_or(scales.scalar_type()), packed);
  }

  static Tensor dequantize_int8(const Tensor& q, const Tensor& scales, std::optional<at::ScalarType> dtype) {
    const c10::DeviceGuard guard(q.device());
    check_device(q, "q", Backend::device);
    Keep keep;
    QWeight w = int8_weight(keep, q, scales, q, "q");
    return dequantize(w, {w.n, w.k}, dtype.value_or(scales.scalar_type()), q);
  }

  // ---- quantize (backends with Backend::quantize / Backend::blockwise8)

  static QQuantParams quant_params(Keep& keep, const Tensor& w, QFormat format) {
    check_device(w, "w", Backend::device);
    QQuantParams p;
    p.dtype = weight_dtype(w, "w");
    p.x = keep.ptr(w);
    p.w.format = format;
    return p;
  }

  // w any shape -> (packed uint8 [(numel + 1) / 2, 1], absmax fp32 [ceil(numel / block_size)])
  static std::tuple<Tensor, Tensor> quantize_nf4(const Tensor& w, int64_t block_size, const Tensor& code) {
    const c10::DeviceGuard guard(w.device());
    check_block_size(block_size);
    Keep keep;
    QQuantParams p = quant_params(keep, w, QFormat::nf4);
    check_code(code, "code", 16, w, "w");
    const int64_t numel = w.numel();
    Tensor packed = at::empty({(numel + 1) / 2, 1}, w.options().dtype(at::kByte));
    Tensor absmax = at::empty({ceil_div(numel, block_size)}, w.options().dtype(at::kFloat));
    p.w.n = 1;
    p.w.k = numel;
    p.w.group = block_size;
    p.w.code = static_cast<const float*>(keep.ptr(code));
    p.w.data = packed.data_ptr();
    p.w.absmax = absmax.data_ptr<float>();
    if (numel > 0) Backend::quantize(p);
    return {packed, absmax};
  }

  // w [N, K] -> (packed uint8 [N, K / 2], scales [N, K / G] in w's dtype, zeros uint8 [N, K / G] or [0])
  static std::tuple<Tensor, Tensor, Tensor> quantize_int4(const Tensor& w, int64_t group_size, bool symmetric) {
    const c10::DeviceGuard guard(w.device());
    TORCH_CHECK(w.dim() == 2, "w: expected a 2-d [N, K] weight, got shape ", w.sizes());
    check_k_groups(w.size(1), group_size, "w.size(1)");
    Keep keep;
    QQuantParams p = quant_params(keep, w, QFormat::int4);
    const int64_t n = w.size(0), k = w.size(1);
    Tensor packed = at::empty({n, k / 2}, w.options().dtype(at::kByte));
    Tensor scales = at::empty({n, k / group_size}, w.options());
    Tensor zeros = symmetric ? at::empty({0}, w.options().dtype(at::kByte))
                             : at::empty({n, k / group_size}, w.options().dtype(at::kByte));
    p.w.n = n;
    p.w.k = k;
    p.w.group = group_size;
    p.w.data = packed.data_ptr();
    p.w.scales = scales.data_ptr();
    p.w.scales_dtype = p.dtype;
    p.w.zeros = symmetric ? nullptr : zeros.data_ptr<uint8_t>();
    if (n * k > 0) Backend::quantize(p);
    return {packed, scales, zeros};
  }

  // w [N, K] -> (q int8 [N, K], scales [N] in w's dtype)
  static std::tuple<Tensor, Tensor> quantize_int8(const Tensor& w) {
    const c10::DeviceGuard guard(w.device());
    TORCH_CHECK(w.dim() == 2, "w: expected a 2-d [N, K] weight, got shape ", w.sizes());
    Keep keep;
    QQuantParams p = quant_params(keep, w, QFormat::int8);
    const int64_t n = w.size(0), k = w.size(1);
    Tensor q = at::empty({n, k}, w.options().dtype(at::kChar));
    Tensor scales = at::empty({n}, w.options());
    p.w.n = n;
    p.w.k = k;
    p.w.group = k;
    p.w.data = q.data_ptr();
    p.w.scales = scales.data_ptr();
    p.w.scales_dtype = p.dtype;
    if (n * k > 0) {
      Backend::quantize(p);
    } else {
      scales.zero_();
    }
    return {q, scales};
  }

  // x fp32 (any shape) -> (q uint8 [numel], absmax fp32 [ceil(numel / block_size)])
  static std::tuple<Tensor, Tensor> quantize_blockwise8(const Tensor& x, const Tensor& code, int64_t block_size) {
    const c10::DeviceGuard guard(x.device());
    check_device(x, "x", Backend::device);
    check_dtype(x, "x", at::kFloat);
    check_code(code, "code", 256, x, "x");
    TORCH_CHECK(block_size >= 1, "block_size: expected >= 1, got ", block_size);
    Keep keep;
    Blockwise8Params p;
    p.numel = x.numel();
    p.block = block_size;
    p.x = static_cast<const float*>(keep.ptr(x));
    p.code = static_cast<const float*>(keep.ptr(code));
    Tensor q = at::empty({p.numel}, x.options().dtype(at::kByte));
    Tensor absmax = at::empty({ceil_div(p.numel, block_size)}, x.options());
    p.q = q.data_ptr<uint8_t>();
    p.absmax = absmax.data_ptr<float>();
    if (p.numel > 0) Backend::blockwise8(p);
    return {q, absmax};
  }
};

// Registers the family's ops for one dispatch key; called inside TORCH_LIBRARY_IMPL. The quantize ops are
// registered only for backends that implement them.
template <typename Backend>
void register_quant_ops(torch::Library& m) {
  using Ops = QuantOps<Backend>;
  m.impl("nf4_linear", &Ops::nf4_linear);
  m.impl("int4_linear", &Ops::int4_linear);
  m.impl("int8_linear", &Ops::int8_linear);
  m.impl("dequantize_nf4", &Ops::dequantize_nf4);
  m.impl("dequantize_int4", &Ops::dequantize_int4);
  m.impl("dequantize_int8", &Ops::dequantize_int8);
  if constexpr (Ops::can_quantize) {
    m.impl("quantize_nf4", &Ops::quantize_nf4);
    m.impl("quantize_int4", &Ops::quantize_int4);
    m.impl("quantize_int8", &Ops::quantize_int8);
  }
  if constexpr (Ops::can_blockwise8) m.impl("quantize_blockwise8", &Ops::quantize_blockwise8);
}

}  // namespace llmkern
