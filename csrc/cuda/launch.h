// CUDA kernel launchers: each takes a filled params struct (device pointers) and a stream, launches on
// that stream and returns the launch's error (cudaSuccess when it went out). Torch-free; the current
// device must be the one holding the pointers. Included by csrc/cuda/*.cu and bindings.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/norm.h"
#include "kernels/quant.h"
#include "kernels/rope.h"

namespace llmkern {

// RMSNorm forward, plain or with the fused residual add (see RmsNormParams).
cudaError_t rms_norm_fwd_cuda(const RmsNormParams& p, cudaStream_t stream);
// RMSNorm backward: dx, and when p.dweight is set, p.blocks dw partials then their column sum.
cudaError_t rms_norm_bwd_cuda(const RmsNormBwdParams& p, cudaStream_t stream);

cudaError_t act_mul_fwd_cuda(const ActMulParams& p, cudaStream_t stream);
cudaError_t act_mul_bwd_cuda(const ActMulBwdParams& p, cudaStream_t stream);

// RoPE. Unlike the CPU kernel (whose caller rejects bad positions up front, which on a GPU would cost a
// device sync), a position outside [0, max_position) is never read from the cache: that token's dst
// rows (all heads, all head_dim features) are written as NaN instead.
cudaError_t rope_cuda(const RopeParams& p, cudaStream_t stream);

// Attention (math and layouts: kernels/attention.h). Forward over contiguous, packed (varlen) or paged k/v,
// writing out and lse; backward writing dq, dk, dv (deterministic: no atomics); the paged cache write.
cudaError_t attn_fwd_cuda(const AttnParams& p, cudaStream_t stream);
// Bytes of p.workspace that attn_fwd_cuda uses to split the keys of a decode across blocks on a GPU with
// num_sms SMs (0: no workspace needed). Call it with p filled in (pointers included: the decode path
// needs 16-byte aligned q/k/v); host only, no device call.
int64_t attn_fwd_cuda_workspace_bytes(const AttnParams& p, int num_sms);
cudaError_t attn_bwd_cuda(const AttnBwdParams& p, cudaStream_t stream);
cudaError_t kv_write_cuda(const KvWriteParams& p, cudaStream_t stream);

// Weight-only quantized linear out = x @ dequant(W)^T (+ bias) and dequantize (formats: kernels/quant.h).
// x/out f32, bf16, f16 (f64 too, through a slow element-wise kernel). Fast paths need k % 32 == 0, the
// packed data 16-byte aligned and a power-of-two group; other shapes run a slower element-wise kernel.
// cudaErrorInvalidValue for a weight the kernels cannot index (missing tables or scales, int4 with
// k % group != 0 or odd k). There is no CUDA quantize: quantization runs on the CPU.
cudaError_t qlinear_cuda(const QLinearParams& p, cudaStream_t stream);
// Bytes of p.workspace that qlinear_cuda uses to split k across blocks on a GPU with num_sms SMs (0: no
// workspace needed); host only (an occupancy query of the kernel, nothing on a stream).
int64_t qlinear_cuda_workspace_bytes(const QLinearParams& p, int num_sms);
cudaError_t dequantize_cuda(const QDequantParams& p, cudaStream_t stream);

}  // namespace llmkern
