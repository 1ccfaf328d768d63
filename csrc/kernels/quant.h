// Weight-only quantized linear layers: the packed formats, the kernel parameters (shared by the CPU and
// CUDA cores) and the CPU entry points.
//
// Every weight is W [n][k] in nn.Linear's layout (n = out_features, k = in_features), row-major.
//
// Formats (w is the dequantized value, computed in fp32 and rounded once to the output dtype):
// - nf4 (bitsandbytes, bit-compatible): 4-bit codes, two per byte over the FLATTENED weight, element
//   e = r * k + c in byte e / 2, in the HIGH nibble when e is even (bitsandbytes' order). Blocks of `group`
//   consecutive flattened elements (32..4096) share one absmax: w = code[q] * absmax[e / group].
//   absmax is fp32, or nested (bitsandbytes' double quant, compress_statistics):
//   absmax[b] = float(nested_code[nested_q[b]] * nested_absmax[b / 256]) + nested_offset
//   (an fp32 multiply rounded, then an fp32 add rounded: no FMA, so it matches bitsandbytes bit for bit).
// - int4 (llmkern's own; GPTQ/AWQ checkpoints are converted to it): the same nibble order as nf4 (byte
//   e / 2, high nibble when e is even), rows of k / 2 bytes (k even); groups of `group` (32, 64, 128)
//   consecutive columns of one row share a scale and a zero point: w = (q - z) * s with
//   s = scales[r][c / group] (in scales_dtype) and z = zeros[r][c / group] (uint8, 0..255), or z = 8 when
//   zeros is null (symmetric).
// - int8: int8 [n][k], one scale per row: w = q * scales[r].
#pragma once
#include <cstdint>

#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

enum class QFormat : int { nf4, int4, int8 };

struct QWeight {
  QFormat format = QFormat::nf4;
  int64_t n = 0, k = 0;
  const void* data = nullptr;  // nf4/int4: uint8 [(n * k + 1) / 2]; int8: int8 [n][k]
  int64_t group = 0;           // nf4: block size over the flattened index; int4: group along k; int8: k
  // nf4
  const float* code = nullptr;           // [16] value of each 4-bit code (bitsandbytes' quant_map)
  const float* absmax = nullptr;         // [ceil(n * k / group)], or nullptr when nested
  const uint8_t* nested_q = nullptr;     // [ceil(n * k / group)] 8-bit codes of absmax - nested_offset
  const float* nested_code = nullptr;    // [256] (bitsandbytes' dynamic map)
  const float* nested_absmax = nullptr;  // [ceil(nblocks / 256)]
  float nested_offset = 0.f;
  // int4 / int8
  const void* scales = nullptr;  // int4: [n][k / group]; int8: [n]; contiguous, in scales_dtype
  DType scales_dtype = DType::f32;
  const uint8_t* zeros = nullptr;  // int4: [n][k / group] zero points, or nullptr (symmetric: 8)
};

// out[i][j] = sum_c x[i][c] * w[j][c] (+ bias[j]), accumulated in fp32 (fp64 for f64).
struct QLinearParams {
  QWeight w;
  DType dtype = DType::f32;  // of x, bias and out
  int64_t m = 0;             // rows of x
  const void* x = nullptr;   // [m][k], unit stride along k
  int64_t x_stride = 0;
  const void* bias = nullptr;  // [n] or nullptr
  void* out = nullptr;         // [m][n], unit stride along n
  int64_t out_stride = 0;

  // Device scratch for the split-k partials of the CUDA tensor-core path (float32, no initialisation
  // needed), sized by qlinear_cuda_workspace_bytes (cuda/launch.h); null / too small: k is not split.
  // Unused by the CPU kernels.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// out[r][c] = w[r][c] in dtype, out contiguous [n][k] (nf4: the flattened n * k elements).
struct QDequantParams {
  QWeight w;
  DType dtype = DType::f32;
  void* out = nullptr;
};

// Quantizes x [n][k] (contiguous, dtype) into w (whose format, n, k, group and output pointers are set):
// - nf4 (bitsandbytes' quantize_4bit, bit for bit; any numel, blocks over the flattened tensor): a full
//   block stores absmax = max|x| and codes bucketize(clamp(x * (1 / max(absmax, 1e-38)), -1, 1), mid) with
//   mid = (code[i] + code[i + 1]) / 2 in fp32 and an exact midpoint taking the lower code; a partial last
//   block stores absmax = max(max|x|, 1e-38) and divides (x / absmax) instead. An odd numel pads nibble 7.
//   Writes data and absmax (not nested: nesting is quantize_blockwise8's job, see below).
// - int4 (GPTQ's round-to-nearest): per (row, group) in fp32: symmetric: xmax = max|x|, s = 2 xmax / 15,
//   z = 8; asymmetric: lo = min(x, 0), hi = max(x, 0), s = (hi - lo) / 15, z = round(-lo / s); a group of
//   zeros uses s = 1 (symmetric) or lo = -1, hi = 1. s is rounded to scales_dtype first and
//   q = clamp(round(x / s) + z, 0, 15) uses that rounded s (round half to even). Writes data, scales, zeros
//   (zeros only when asymmetric).
// - int8: s = max|x| / 127 rounded to scales_dtype, q = clamp(round(x / s), -127, 127), q = 0 when s = 0.
struct QQuantParams {
  QWeight w;  // outputs: data, absmax (nf4), scales and zeros (int4 / int8) are written
  DType dtype = DType::f32;  // of x
  const void* x = nullptr;  // [n * k] contiguous
};

// bitsandbytes' quantize_blockwise (8-bit, its CPU algorithm, bit for bit), used to nest NF4 absmax:
// per block of `block` values absmax = max|x|; v = clamp(x * (1 / absmax), -1, 1);
// idx = uint16(((v + 1) * 0.5) * 65535 + 0.5) and q = lut[idx], lut[j] = #{ i < 255 : mid[i] < -1 + 2 j / 65535 },
// mid[i] = 0.5 * (code[i] + code[i + 1]) (all fp32); an all-zero block stores codes 0.
struct Blockwise8Params {
  int64_t numel = 0, block = 256;
  const float* x = nullptr;     // [numel]
  const float* code = nullptr;  // [256], sorted
  uint8_t* q = nullptr;         // [numel]
  float* absmax = nullptr;      // [ceil(numel / block)]
};

LLMKERN_DECLARE_CPU_KERNEL(qlinear_kernel, QLinearParams)
LLMKERN_DECLARE_CPU_KERNEL(dequantize_kernel, QDequantParams)
LLMKERN_DECLARE_CPU_KERNEL(quantize_kernel, QQuantParams)
LLMKERN_DECLARE_CPU_KERNEL(quantize_blockwise8_kernel, Blockwise8Params)

}  // namespace llmkern
