// RoPE ops at the tensor level: checks, output allocation and params, shared by the CPU and CUDA
// bindings. Backend supplies `device`, rope(RopeParams) and check_positions(positions, max_position).
// The CPU's check_positions rejects any position outside [0, max_position) BEFORE anything is written (an
// in-place op must not leave q half-rotated); CUDA's does nothing (a check would sync the device) and its
// kernel writes NaN rows for such positions instead of reading out of bounds.
#pragma once
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "kernels/rope.h"
#include "ops/common.h"

namespace llmkern {

namespace rope_detail {

// Stride between consecutive tokens when the leading dims of x [..., heads, head_dim] flatten to one
// token index, else -1. (as_rows would also fold heads into rows, which fails for the common q/k views
// into a fused qkv buffer, whose token stride is not heads * head_dim.)
inline int64_t token_stride(const Tensor& x) { return collapsed_stride(x, x.dim() - 2); }

// The kernel addresses x as tokens x heads x head_dim with unit stride along head_dim.
inline bool addressable(const Tensor& x) {
  return x.dim() < 2 || (x.stride(-1) == 1 && token_stride(x) >= 0);
}

}  // namespace rope_detail

template <typename Backend>
struct RopeOps {
  // x: [..., heads, head_dim], addressable; positions: x.shape[:-2] int64, contiguous;
  // cache: [max_position, rotary_dim] float32. Fills the input side of the params.
  static RopeParams params(const Tensor& positions, const Tensor& x, const char* name, const Tensor& cache,
                           bool is_neox) {
    check_device(x, name, Backend::device);
    RopeParams p;
    p.dtype = kernel_dtype(x, name);
    TORCH_CHECK(x.dim() >= 2, name, ": expected [..., heads, head_dim], got sizes ", x.sizes());
    p.head_dim = x.size(-1);
    TORCH_CHECK(p.head_dim > 0 && p.head_dim % 2 == 0, name, ": expected an even head_dim (last dim), got ",
                p.head_dim);
    TORCH_CHECK(positions.device() == x.device(), "positions: expected the device of ", name, " (", x.device(),
                "), got ", positions.device());
    TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "positions: expected dtype int64 (torch.long), got ",
                     positions.scalar_type(), positions.scalar_type() == at::kInt ? "; convert with .long()" : "");
    const auto token_dims = x.sizes().slice(0, x.dim() - 2);
    TORCH_CHECK(positions.sizes() == token_dims, "positions: expected shape ", token_dims, " (", name,
                ".shape[:-2]), got ", positions.sizes());
    TORCH_CHECK(cache.device() == x.device(), "cos_sin_cache: expected the device of ", name, " (", x.device(),
                "), got ", cache.device());
    TORCH_CHECK_TYPE(cache.scalar_type() == at::kFloat, "cos_sin_cache: expected dtype float32, got ",
                     cache.scalar_type());
    TORCH_CHECK(cache.dim() == 2, "cos_sin_cache: expected [max_position, rotary_dim], got sizes ", cache.sizes());
    p.rotary_dim = cache.size(1);
    TORCH_CHECK(p.rotary_dim > 0 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.head_dim,
                "cos_sin_cache: expected an even rotary_dim (last dim) in [2, head_dim=", p.head_dim, "], got ",
                p.rotary_dim);
    TORCH_CHECK(cache.is_contiguous(), "cos_sin_cache: expected a contiguous tensor, got strides ",
                cache.strides());
    p.tokens = positions.numel();
    p.heads = x.size(-2);
    p.positions = positions.data_ptr<int64_t>();
    p.cos_sin_cache = cache.data_ptr<float>();
    p.max_position = cache.size(0);
    p.src = x.data_ptr();
    p.src_token_stride = rope_detail::token_stride(x);
    p.src_head_stride = x.stride(-2);
    p.is_neox = is_neox;
    return p;
  }

  // Params for rotating x (query or key) in place: its layout must be addressable, without overlap.
  static RopeParams inplace_params(const Tensor& positions, Tensor& x, const char* name, const Tensor& cache,
                                   bool is_neox) {
    TORCH_CHECK(rope_detail::addressable(x), name, ": written in place, so it needs unit stride along head_dim "
                "and leading dims that flatten to one token stride; got sizes ", x.sizes(), " strides ",
                x.strides());
    TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, name,
                ": written in place, so its elements must not overlap (e.g. an expanded tensor); got strides ",
                x.strides());
    RopeParams p = params(positions, x, name, cache, is_neox);
    p.dst = x.data_ptr();
    p.dst_token_stride = p.src_token_stride;
    p.dst_head_stride = p.src_head_stride;
    return p;
  }

  // In place, vLLM-style: query [..., heads, head_dim], key [..., kv_heads, head_dim] or None.
  static void rotary_embedding_(const Tensor& positions, Tensor& query, const std::optional<Tensor>& key,
                                const Tensor& cache, bool is_neox) {
    const c10::DeviceGuard guard(query.device());  // kernels run on the device of the data
    Tensor pos = positions.contiguous();
    RopeParams pq = inplace_params(pos, query, "query", cache, is_neox);
    std::optional<RopeParams> pk;
    if (key) {
      Tensor k = *key;
      check_like(k, "key", query, "query");
      const auto q_tokens = query.sizes().slice(0, query.dim() - 2);
      TORCH_CHECK(k.dim() == query.dim() && k.sizes().slice(0, k.dim() - 2) == q_tokens,
                  "key: expected the token dims of query ", q_tokens, " then [kv_heads, head_dim], got sizes ",
                  k.sizes());
      pk = inplace_params(pos, k, "key", cache, is_neox);
    }
    if (pq.tokens == 0) return;
    Backend::check_positions(pos, pq.max_position);
    Backend::rope(pq);
    if (pk) Backend::rope(*pk);
  }

  // Out of place on x [..., heads, head_dim] -> [..., heads, head_dim] contiguous; inverse rotates by -theta.
  static Tensor rotary_embedding(const Tensor& positions, const Tensor& x, const Tensor& cache, bool is_neox,
                                 bool inverse) {
    Tensor out = empty_like_contiguous(x);
    rotary_embedding_out(out, positions, x, cache, is_neox, inverse);
    return out;
  }

  // Into a preallocated out shaped like x: addressable (it may be a strided view, e.g. into a fused buffer),
  // without internal overlap, and either disjoint from x or x itself (in place; the kernel loads each
  // vector before storing it).
  static void rotary_embedding_out(Tensor& out, const Tensor& positions, const Tensor& x, const Tensor& cache,
                                   bool is_neox, bool inverse) {
    const c10::DeviceGuard guard(x.device());  // kernels run on the device of the data
    check_same_shape(out, "out", x, "x");
    TORCH_CHECK(rope_detail::addressable(out), "out: written by the kernel, so it needs unit stride along "
                "head_dim and leading dims that flatten to one token stride; got sizes ", out.sizes(), " strides ",
                out.strides());
    TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                "out: its elements must not overlap (e.g. an expanded tensor); got strides ", out.strides());
    check_no_partial_overlap(out, "out", x, "x");
    // A layout the kernel cannot address (e.g. the expanded gradient of a sum) is copied once.
    const Tensor xs = rope_detail::addressable(x) ? x : x.contiguous();
    Tensor pos = positions.contiguous();
    RopeParams p = params(pos, xs, "x", cache, is_neox);
    p.inverse = inverse;
    p.dst = out.data_ptr();
    p.dst_token_stride = rope_detail::token_stride(out);
    p.dst_head_stride = out.stride(-2);
    if (out.numel() == 0) return;
    Backend::check_positions(pos, p.max_position);  // before anything is written (out may be x)
    Backend::rope(p);
  }
};

// Registers the family's ops for one dispatch key; called inside TORCH_LIBRARY_IMPL.
template <typename Backend>
void register_rope_ops(torch::Library& m) {
  m.impl("rotary_embedding_", &RopeOps<Backend>::rotary_embedding_);
  m.impl("rotary_embedding", &RopeOps<Backend>::rotary_embedding);
  m.impl("rotary_embedding_out", &RopeOps<Backend>::rotary_embedding_out);
}

}  // namespace llmkern
