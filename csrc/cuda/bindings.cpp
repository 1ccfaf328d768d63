// CUDA backends for the shared tensor-level ops (csrc/ops/*.h): each launches the torch-free kernels of
// csrc/cuda/*.cu on the current stream of the device that holds the data. Built only with a CUDA torch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/norm.h"
#include "ops/quant.h"
#include "ops/rope.h"

namespace llmkern {
namespace {

// Calls launch(stream) with the current stream of the current device, which the shared ops (csrc/ops/*.h) set to
// the data's device with a DeviceGuard; a launch error becomes a Python exception.
template <typename F>
void run_on_current_stream(const char* op, F&& launch) {
  const cudaError_t err = launch(c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "llmkern::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// Device scratch of `bytes` (none when 0) on the current device. The caching allocator keeps it valid for
// the work queued on this stream after the tensor is released.
Tensor workspace(int64_t bytes) {
  if (bytes == 0) return {};
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
}

int sm_count() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

struct CudaNorm {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  static void fwd(const RmsNormParams& p) {
    run_on_current_stream("rms_norm", [&](cudaStream_t s) { return rms_norm_fwd_cuda(p, s); });
  }
  static void bwd(const RmsNormBwdParams& p) {
    run_on_current_stream("rms_norm_bwd", [&](cudaStream_t s) { return rms_norm_bwd_cuda(p, s); });
  }
  // Row groups summing their own dw partial: ~8 per SM keeps the SMs busy; the partials ([groups, hidden]
  // fp32) stay a small fraction of the bytes the backward moves.
  static int64_t dweight_blocks(int64_t) { return 8 * int64_t(sm_count()); }
};

struct CudaActivation {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  static void fwd(const ActMulParams& p) {
    run_on_current_stream("act_mul", [&](cudaStream_t s) { return act_mul_fwd_cuda(p, s); });
  }
  static void bwd(const ActMulBwdParams& p) {
    run_on_current_stream("act_mul_bwd", [&](cudaStream_t s) { return act_mul_bwd_cuda(p, s); });
  }
};

struct CudaRope {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  static void rope(const RopeParams& p) {
    run_on_current_stream("rotary_embedding", [&](cudaStream_t s) { return rope_cuda(p, s); });
  }
  // Positions are not checked on the host (that would sync the device): the kernel writes NaN rows for
  // positions outside [0, max_position) instead of reading out of bounds (cuda/launch.h).
  static void check_positions(const Tensor&, int64_t) {}
};

struct CudaAttention {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  // Split-K decode (flash-decoding) partials go to a workspace the kernel sizes.
  static void fwd(const AttnParams& params) {
    AttnParams p = params;
    p.workspace_bytes = attn_fwd_cuda_workspace_bytes(p, sm_count());
    const Tensor ws = workspace(p.workspace_bytes);
    p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    run_on_current_stream("flash_attn_fwd", [&](cudaStream_t s) { return attn_fwd_cuda(p, s); });
  }
  static void bwd(const AttnBwdParams& p) {
    run_on_current_stream("flash_attn_bwd", [&](cudaStream_t s) { return attn_bwd_cuda(p, s); });
  }
  static void kv_write(const KvWriteParams& p) {
    run_on_current_stream("write_kv_cache", [&](cudaStream_t s) { return kv_write_cuda(p, s); });
  }
  // Index tensors live on the device: checking them here would sync it. The kernels skip slots outside the
  // cache instead of writing out of bounds; other indices are the caller's contract, as in flash-attn.
  static void check_indices(const AttnParams&, int64_t, int64_t) {}
  static void check_slots(const KvWriteParams&) {}
};

struct CudaQuant {
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  // Split-k partials go to a workspace the kernel sizes.
  static void qlinear(const QLinearParams& params) {
    QLinearParams p = params;
    p.workspace_bytes = qlinear_cuda_workspace_bytes(p, sm_count());
    const Tensor ws = workspace(p.workspace_bytes);
    p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    run_on_current_stream("quantized linear", [&](cudaStream_t s) { return qlinear_cuda(p, s); });
  }
  static void dequantize(const QDequantParams& p) {
    run_on_current_stream("dequantize", [&](cudaStream_t s) { return dequantize_cuda(p, s); });
  }
  // No quantize / blockwise8: quantization is a one-time CPU step. The CUDA registrations below turn the
  // dispatcher's generic "no CUDA backend" error into one that says what to do.
};

[[noreturn]] void no_cuda_quantize(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "llmkern::", op, ": there is no CUDA kernel; quantization runs on the CPU: ",
                              "quantize w.cpu() and move the results to the GPU with .to(device)");
}

std::tuple<Tensor, Tensor> quantize_nf4_cuda(const Tensor&, int64_t, const Tensor&) { no_cuda_quantize("quantize_nf4"); }
std::tuple<Tensor, Tensor, Tensor> quantize_int4_cuda(const Tensor&, int64_t, bool) { no_cuda_quantize("quantize_int4"); }
std::tuple<Tensor, Tensor> quantize_int8_cuda(const Tensor&) { no_cuda_quantize("quantize_int8"); }
std::tuple<Tensor, Tensor> quantize_blockwise8_cuda(const Tensor&, const Tensor&, int64_t) {
  no_cuda_quantize("quantize_blockwise8");
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CUDA, m) {
  register_norm_ops<CudaNorm>(m);
  register_activation_ops<CudaActivation>(m);
  register_rope_ops<CudaRope>(m);
  register_attention_ops<CudaAttention>(m);
  register_quant_ops<CudaQuant>(m);
  static_assert(!QuantOps<CudaQuant>::can_quantize && !QuantOps<CudaQuant>::can_blockwise8);
  m.impl("quantize_nf4", &quantize_nf4_cuda);
  m.impl("quantize_int4", &quantize_int4_cuda);
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("quantize_blockwise8", &quantize_blockwise8_cuda);
}

}  // namespace llmkern
