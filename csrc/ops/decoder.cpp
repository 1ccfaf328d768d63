// One serving step of the Llama-family decoder (llmkern/models/llama.py, LlamaForCausalLM.step) with its layer loop
// in C++. From Python each op call costs ~5-10 us (module call, wrapper, argument parsing) and a step makes ~14 per
// layer: at batch 1 that was most of the step. Here each op is called through the dispatcher (well under 1 us): the
// same kernels on the same inputs, on any device the ops support.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace llmkern {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The weights list: the model's tensors, then kLayerSlots per layer (None where a model has no such tensor; a
// linear's bias follows its weight).
enum ModelSlot { kEmbed, kFinalNorm, kLmHead, kRopeCache, kAlibiSlopes, kModelSlots };
enum LayerSlot {
  kInputNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kQNorm, kKNorm, kO, kOBias,
  kPostNorm, kGate, kGateBias, kUp, kUpBias, kDown, kDownBias, kLayerSlots
};
// Bit i of llmkern_linears: whether the linears of kind i run llmkern::linear (else at::linear). Python decides
// with ops.linear_beats_torch, as its Linear module does for each call.
enum LinearKind { kLinQ, kLinK, kLinV, kLinO, kLinGate, kLinUp, kLinDown, kLinHead };

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Whether logits_indices is 0, 1, .., tokens - 1 (a step of decodes, one token and one logit a sequence): then the
// head reads x as it is, without aten's gather (~20 us of a 16-sequence decode step of ~1 ms). Read on the CPU only,
// where looking costs no device synchronization.
bool wants_every_row(const Tensor& logits_indices, int64_t tokens) {
  if (!logits_indices.device().is_cpu() || logits_indices.scalar_type() != at::kLong || logits_indices.dim() != 1 ||
      logits_indices.size(0) != tokens || !logits_indices.is_contiguous())
    return false;
  const int64_t* idx = logits_indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i)
    if (idx[i] != i) return false;
  return true;
}

Tensor decoder_step(const Tensor& input_ids, const Tensor& positions, const Tensor& cu_seqlens_q,
                    const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const Tensor& block_tables,
                    const Tensor& slot_mapping, const Tensor& logits_indices,
                    const c10::List<OptTensor>& weights, at::TensorList kv_caches, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, at::IntArrayRef window_left, double eps,
                    int64_t llmkern_linears) {
  static const auto linear_op = op<Tensor(const Tensor&, const Tensor&, const OptTensor&)>("llmkern::linear");
  static const auto linear_group = op<std::vector<Tensor>(const Tensor&, at::TensorList, at::TensorList)>(
      "llmkern::linear_group");
  static const auto rms_norm = op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, double, bool)>(
      "llmkern::rms_norm");
  static const auto add_rms_norm_ = op<void(Tensor&, Tensor&, const OptTensor&, double, bool)>(
      "llmkern::fused_add_rms_norm_");
  static const auto rope_ = op<void(const Tensor&, Tensor&, const OptTensor&, const Tensor&, bool)>(
      "llmkern::rotary_embedding_");
  static const auto write_kv = op<void(const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&)>(
      "llmkern::write_kv_cache");
  static const auto attention = op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, double, int64_t, int64_t, double,
      int64_t)>("llmkern::flash_attn_fwd");
  static const auto act_mul = op<Tensor(const Tensor&, const Tensor&, c10::string_view)>("llmkern::act_mul");

  const auto layers = static_cast<int64_t>(window_left.size());
  TORCH_CHECK_VALUE(layers > 0, "window_left: expected one entry per layer (at least one), got none");
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == kModelSlots + layers * kLayerSlots, "weights: expected ",
                    kModelSlots + layers * kLayerSlots, " entries (", kModelSlots, " + ", kLayerSlots,
                    " per layer for ", layers, " layers, the length of window_left), got ", weights.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(kv_caches.size()) == 2 * layers, "kv_caches: expected ", 2 * layers,
                    " tensors (k_cache, v_cache per layer), got ", kv_caches.size());
  std::vector<OptTensor> w(weights.begin(), weights.end());
  auto need = [&](int64_t slot) -> const Tensor& {
    TORCH_CHECK_VALUE(w[slot].has_value(), "weights[", slot, "]: expected a tensor, got None");
    return *w[slot];
  };
  auto linear = [&](const Tensor& x, int64_t slot, const OptTensor& bias, LinearKind kind) {
    const Tensor& weight = need(slot);
    return llmkern_linears >> kind & 1 ? linear_op.call(x, weight, bias) : at::linear(x, weight, bias);
  };
  // The linears of one input (q, k, v; gate, up), weight slots with their biases next: one llmkern::linear_group
  // call when each runs llmkern::linear and their biases are all present or all absent, else one call each.
  auto linears = [&](const Tensor& x, std::initializer_list<std::pair<int64_t, LinearKind>> parts) {
    std::vector<Tensor> part_weights, biases, out;
    bool grouped = true;
    for (const auto& [slot, kind] : parts) {
      grouped = grouped && (llmkern_linears >> kind & 1);
      part_weights.push_back(need(slot));
      if (w[slot + 1]) biases.push_back(*w[slot + 1]);
    }
    if (grouped && (biases.empty() || biases.size() == part_weights.size()))
      return linear_group.call(x, part_weights, biases);
    for (const auto& [slot, kind] : parts) out.push_back(linear(x, slot, w[slot + 1], kind));
    return out;
  };
  const int64_t tokens = input_ids.size(0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

  Tensor x = at::embedding(need(kEmbed), input_ids), residual;
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t l = kModelSlots + i * kLayerSlots;
    // The (x, residual) stream of llama.py's DecoderLayer: each block's output is added into the next norm.
    if (i == 0) {
      residual = x;
      x = std::get<0>(rms_norm.call(x, w[l + kInputNorm], eps, false));
    } else {
      add_rms_norm_.call(x, residual, w[l + kInputNorm], eps, false);
    }
    const std::vector<Tensor> qkv = linears(x, {{l + kQ, kLinQ}, {l + kK, kLinK}, {l + kV, kLinV}});
    Tensor q = qkv[0].view({tokens, num_heads, head_dim});
    Tensor k = qkv[1].view({tokens, num_kv_heads, head_dim});
    Tensor v = qkv[2].view({tokens, num_kv_heads, head_dim});
    if (w[l + kQNorm]) {  // qwen3 QK-Norm: per head, before rope
      q = std::get<0>(rms_norm.call(q, w[l + kQNorm], eps, false));
      k = std::get<0>(rms_norm.call(k, w[l + kKNorm], eps, false));
    }
    if (w[kRopeCache]) rope_.call(positions, q, k, *w[kRopeCache], /*is_neox=*/true);
    Tensor k_cache = kv_caches[2 * i], v_cache = kv_caches[2 * i + 1];
    write_kv.call(k, v, k_cache, v_cache, slot_mapping);
    Tensor out = std::get<0>(attention.call(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, std::nullopt,
                                            std::nullopt, block_tables, w[kAlibiSlopes], max_seqlen_q,
                                            max_seqlen_k, scale, window_left[i], 0, 0.0, 0));
    x = linear(out.view({tokens, num_heads * head_dim}), l + kO, w[l + kOBias], kLinO);
    add_rms_norm_.call(x, residual, w[l + kPostNorm], eps, false);
    const std::vector<Tensor> gate_up = linears(x, {{l + kGate, kLinGate}, {l + kUp, kLinUp}});
    Tensor act = act_mul.call(gate_up[0], gate_up[1], "silu");
    x = linear(act, l + kDown, w[l + kDownBias], kLinDown);
  }
  add_rms_norm_.call(x, residual, w[kFinalNorm], eps, false);
  return linear(wants_every_row(logits_indices, tokens) ? x : x.index_select(0, logits_indices), kLmHead,
                std::nullopt, kLinHead);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CompositeExplicitAutograd, m) { m.impl("decoder_step", &decoder_step); }

}  // namespace llmkern
