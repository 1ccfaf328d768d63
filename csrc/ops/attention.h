// Attention ops at the tensor level: checks, output allocation and params, shared by the CPU and CUDA
// bindings. Backend supplies `device`, fwd(AttnParams), bwd(AttnBwdParams), kv_write(KvWriteParams) and
// check_indices(params, q_rows, k_rows) / check_slots(params). The CPU's checks read the int32 index
// tensors (cu_seqlens, seqused_k, kv_batch_idx, block_table) and slot_mapping and reject bad values before
// any kernel runs; CUDA's do nothing (reading device memory on the host would sync the device).
#pragma once
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels/attention.h"
#include "ops/common.h"

namespace llmkern {

using OptTensor = std::optional<Tensor>;

// Rows of t seen through AttnTensor: [batch, seqlen, heads, d], or packed [total, heads, d] (batch_stride
// 0), or paged [num_blocks, block_size, heads, d] (batch_stride: between blocks).
inline AttnTensor attn_tensor(const Tensor& t) {
  AttnTensor a;
  a.ptr = t.data_ptr();
  const int64_t off = t.dim() == 4 ? 1 : 0;
  a.batch_stride = off ? t.stride(0) : 0;
  a.row_stride = t.stride(off);
  a.head_stride = t.stride(off + 1);
  return a;
}

// lse [batch, heads, seqlen_q] or [heads, total_q] (contiguous) as an AttnTensor with head_dim 1.
inline AttnTensor lse_tensor(const Tensor& lse) {
  AttnTensor a;
  a.ptr = lse.data_ptr();
  a.batch_stride = lse.dim() == 3 ? lse.stride(0) : 0;
  a.row_stride = 1;
  a.head_stride = lse.stride(-2);
  return a;
}

// An int32 index tensor of the given shape (-1: any size) on q's device.
inline const int32_t* index_data(const OptTensor& t, const char* name, const Tensor& q,
                                 std::initializer_list<int64_t> shape) {
  if (!t) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, ": expected dtype int32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == q.device(), name, ": expected the device of q (", q.device(), "), got ", t->device());
  bool ok = t->dim() == int64_t(shape.size());
  int64_t i = 0;
  for (int64_t s : shape) ok = ok && (s < 0 || t->size(i++) == s);
  TORCH_CHECK(ok, name, ": expected shape ", at::IntArrayRef(shape), " (-1: any), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, ": expected a contiguous tensor, got strides ", t->strides());
  return t->data_ptr<int32_t>();
}

// q, k, v (and out, dout, ...) have head_dim contiguous; every other stride is free.
inline void check_rows_layout(const Tensor& t, const char* name, int64_t dims, const char* layout) {
  TORCH_CHECK(t.dim() == dims, name, ": expected ", layout, ", got shape ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, name, ": expected a contiguous last (head_dim) dim, got strides ",
              t.strides());
}

template <typename Backend>
struct AttentionOps {
  // The forward's fields from q, k, v and the options (shared with the backward). No allocation.
  static AttnParams params(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens_q,
                           const OptTensor& cu_seqlens_k, const OptTensor& seqused_k, const OptTensor& kv_batch_idx,
                           const OptTensor& block_table, const OptTensor& alibi_slopes, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
                           double softcap) {
    check_device(q, "q", Backend::device);
    AttnParams p;
    p.dtype = kernel_dtype(q, "q");
    check_like(k, "k", q, "q");
    check_like(v, "v", q, "q");
    const bool varlen = cu_seqlens_q.has_value(), paged = block_table.has_value();
    TORCH_CHECK(cu_seqlens_k.has_value() == varlen, "cu_seqlens_k: expected ", varlen ? "a tensor" : "None",
                " (cu_seqlens_q and cu_seqlens_k come together), got ", cu_seqlens_k ? "a tensor" : "None");
    check_rows_layout(q, "q", varlen ? 3 : 4, varlen ? "[total_q, heads, head_dim]" : "[batch, seqlen_q, heads, head_dim]");
    check_rows_layout(k, "k", varlen && !paged ? 3 : 4,
                      paged ? "[num_blocks, block_size, heads_k, head_dim]"
                            : (varlen ? "[total_k, heads_k, head_dim]" : "[batch, seqlen_k, heads_k, head_dim]"));
    check_same_shape(v, "v", k, "k");
    check_rows_layout(v, "v", k.dim(), "k's shape");

    const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);
    const int64_t nheads = q.size(-2), nheads_k = k.size(-2), d = q.size(-1);
    TORCH_CHECK(batch >= 0, "cu_seqlens_q: expected shape [batch + 1], got ", cu_seqlens_q->sizes());
    TORCH_CHECK(d >= 1 && d <= 256, "q: head_dim must be in [1, 256], got ", d);
    TORCH_CHECK(k.size(-1) == d, "k: expected head_dim ", d, " (q's), got ", k.size(-1));
    TORCH_CHECK(nheads_k >= 1 && nheads % nheads_k == 0, "k: q's heads (", nheads,
                ") must be a multiple of k's heads (", nheads_k, ")");
    p.batch = int(batch);
    p.nheads = int(nheads);
    p.nheads_k = int(nheads_k);
    p.head_dim = int(d);
    p.q = attn_tensor(q);
    p.k = attn_tensor(k);
    p.v = attn_tensor(v);

    p.cu_seqlens_q = index_data(cu_seqlens_q, "cu_seqlens_q", q, {-1});
    p.cu_seqlens_k = index_data(cu_seqlens_k, "cu_seqlens_k", q, {batch + 1});
    p.seqused_k = index_data(seqused_k, "seqused_k", q, {batch});
    p.kv_batch_idx = index_data(kv_batch_idx, "kv_batch_idx", q, {batch});
    TORCH_CHECK(!(paged && kv_batch_idx), "kv_batch_idx: not supported with a block_table (the table maps sequences)");
    p.block_table = index_data(block_table, "block_table", q, {batch, -1});
    if (paged) {
      p.block_table_stride = block_table->size(1);
      p.block_size = int(k.size(1));
      TORCH_CHECK(p.block_size >= 1, "k: expected a block_size (dim 1) of at least 1, got ", k.sizes());
    } else if (!varlen && !kv_batch_idx) {
      TORCH_CHECK(k.size(0) == batch, "k: expected batch ", batch, " (q's), got ", k.size(0));
    }
    TORCH_CHECK(!varlen || max_seqlen_q >= 0, "max_seqlen_q: expected >= 0, got ", max_seqlen_q);
    TORCH_CHECK(!varlen || max_seqlen_k >= 0, "max_seqlen_k: expected >= 0, got ", max_seqlen_k);
    p.seqlen_q = int(varlen ? max_seqlen_q : q.size(1));
    p.seqlen_k = int(varlen ? max_seqlen_k : (paged ? block_table->size(1) * k.size(1) : k.size(1)));

    if (alibi_slopes) {
      const Tensor& a = *alibi_slopes;
      TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes: expected dtype float32, got ", a.scalar_type());
      TORCH_CHECK(a.device() == q.device(), "alibi_slopes: expected the device of q (", q.device(), "), got ", a.device());
      TORCH_CHECK((a.dim() == 1 && a.size(0) == nheads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == nheads),
                  "alibi_slopes: expected shape [", nheads, "] or [", batch, ", ", nheads, "], got ", a.sizes());
      TORCH_CHECK(a.is_contiguous(), "alibi_slopes: expected a contiguous tensor, got strides ", a.strides());
      p.alibi_slopes = a.data_ptr<float>();
      p.alibi_batch_stride = a.dim() == 2 ? nheads : 0;
    }
    TORCH_CHECK(window_left >= -1, "window_size: left must be >= -1 (-1: unbounded), got ", window_left);
    TORCH_CHECK(window_right >= -1, "window_size: right must be >= -1 (-1: unbounded), got ", window_right);
    TORCH_CHECK(softcap >= 0, "softcap: expected >= 0 (0: off), got ", softcap);
    TORCH_CHECK(std::isfinite(softmax_scale), "softmax_scale: expected a finite value, got ", softmax_scale);
    p.window_left = int(window_left);
    p.window_right = int(window_right);
    p.softcap = float(softcap);
    p.scale = float(softmax_scale);
    Backend::check_indices(p, q.size(0), k.size(0));
    return p;
  }

  // Packed q: zero out and set lse to +inf in the rows outside every sequence. The kernels write the rows of the
  // sequences, so on the CPU (where cu_seqlens_q can be read) only the rows before the first sequence and after the
  // last are cleared: the two whole-tensor fills took ~8 us of a 16-sequence decode step's 56-78 us attention call.
  static void clear_outside_rows(Tensor& out, Tensor& lse, const AttnParams& p) {
    if constexpr (Backend::device == c10::DeviceType::CPU) {
      const int64_t total = out.size(0), first = p.cu_seqlens_q[0], last = p.cu_seqlens_q[p.batch];
      for (const auto& [r0, r1] : {std::pair<int64_t, int64_t>{0, first}, {last, total}})
        if (r0 < r1) {
          out.narrow(0, r0, r1 - r0).zero_();
          lse.narrow(1, r0, r1 - r0).fill_(INFINITY);
        }
    } else {
      out.zero_();
      lse.fill_(INFINITY);
    }
  }

  // lse: float32 [batch, heads, seqlen_q], or [heads, total_q] for packed q.
  static Tensor empty_lse(const Tensor& q, const AttnParams& p) {
    auto opts = q.options().dtype(at::kFloat);
    return p.cu_seqlens_q ? at::empty({p.nheads, q.size(0)}, opts) : at::empty({p.batch, p.nheads, p.seqlen_q}, opts);
  }

  static std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens_q,
                                        const OptTensor& cu_seqlens_k, const OptTensor& seqused_k,
                                        const OptTensor& kv_batch_idx, const OptTensor& block_table,
                                        const OptTensor& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                        double softmax_scale, int64_t window_left, int64_t window_right,
                                        double softcap, int64_t num_splits) {
    const c10::DeviceGuard guard(q.device());  // kernels run on the device of the data
    AttnParams p = params(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, block_table, alibi_slopes,
                          max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap);
    TORCH_CHECK(num_splits >= 0, "num_splits: expected >= 0 (0: chosen by the kernel), got ", num_splits);
    p.num_splits = int(num_splits);
    // Rows of packed q outside every sequence are not attention rows: zeros, as flash-attn leaves them (lse +inf).
    Tensor out = at::empty(q.sizes(), q.options()), lse = empty_lse(q, p);
    if (p.cu_seqlens_q) clear_outside_rows(out, lse, p);
    p.out = attn_tensor(out);
    p.lse = lse_tensor(lse);
    if (q.numel()) Backend::fwd(p);
    return {out, lse};
  }

  static std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                                const Tensor& out, const Tensor& lse, const OptTensor& cu_seqlens_q,
                                                const OptTensor& cu_seqlens_k, const OptTensor& alibi_slopes,
                                                int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                                int64_t window_left, int64_t window_right, double softcap) {
    const c10::DeviceGuard guard(q.device());
    AttnBwdParams p;
    p.fwd = params(q, k, v, cu_seqlens_q, cu_seqlens_k, std::nullopt, std::nullopt, std::nullopt, alibi_slopes,
                   max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap);
    check_same_shape(out, "out", q, "q");
    check_same_shape(dout, "dout", q, "q");
    check_rows_layout(out, "out", q.dim(), "q's shape");
    check_rows_layout(dout, "dout", q.dim(), "q's shape");
    Tensor delta = empty_lse(q, p.fwd);
    TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse: expected dtype float32, got ", lse.scalar_type());
    TORCH_CHECK(lse.sizes() == delta.sizes() && lse.is_contiguous(), "lse: expected a contiguous tensor of shape ",
                delta.sizes(), " (the forward's), got ", lse.sizes(), " with strides ", lse.strides());
    TORCH_CHECK(lse.device() == q.device(), "lse: expected the device of q (", q.device(), "), got ", lse.device());
    p.fwd.out = attn_tensor(out);
    p.fwd.lse = lse_tensor(lse);
    p.dout = attn_tensor(dout);
    p.delta = lse_tensor(delta);
    // Packed rows outside every sequence get zero gradients; the kernels write the rows of sequences. On the CPU the
    // gradients start zeroed in any case: their fresh pages then fault in one pass in page order, not one by one
    // in the kernel's strided row writes (fp32, 32 heads of 128, 2048 tokens: 2.5-3.4% faster, side by side).
    const bool zeroed = p.fwd.cu_seqlens_q != nullptr || Backend::device == c10::DeviceType::CPU;
    auto grad_for = [&](const Tensor& t) {
      return zeroed ? at::zeros(t.sizes(), t.options()) : at::empty(t.sizes(), t.options());
    };
    Tensor dq = grad_for(q), dk = grad_for(k), dv = grad_for(v);
    p.dq = attn_tensor(dq);
    p.dk = attn_tensor(dk);
    p.dv = attn_tensor(dv);
    p.deterministic = true;
    if (q.numel() == 0 || k.numel() == 0) {  // no key for any query: every gradient is 0
      dq.zero_(), dk.zero_(), dv.zero_();
      return {dq, dk, dv};
    }
    Backend::bwd(p);
    return {dq, dk, dv};
  }

  static void write_kv_cache(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                             const Tensor& slot_mapping) {
    const c10::DeviceGuard guard(k.device());
    check_device(k, "k", Backend::device);
    KvWriteParams p;
    p.dtype = kernel_dtype(k, "k");
    check_rows_layout(k, "k", 3, "[tokens, heads_k, head_dim]");
    check_same_shape(v, "v", k, "k");
    check_rows_layout(v, "v", 3, "[tokens, heads_k, head_dim]");
    check_like(k_cache, "k_cache", k, "k");
    check_rows_layout(k_cache, "k_cache", 4, "[num_blocks, block_size, heads_k, head_dim]");
    check_same_shape(v_cache, "v_cache", k_cache, "k_cache");
    check_rows_layout(v_cache, "v_cache", 4, "[num_blocks, block_size, heads_k, head_dim]");
    TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "k_cache: expected [num_blocks, block_size, ",
                k.size(1), ", ", k.size(2), "] (k's heads and head_dim), got ", k_cache.sizes());
    TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping: expected dtype int64, got ",
                     slot_mapping.scalar_type());
    TORCH_CHECK(slot_mapping.device() == k.device(), "slot_mapping: expected the device of k (", k.device(), "), got ",
                slot_mapping.device());
    TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0) && slot_mapping.is_contiguous(),
                "slot_mapping: expected a contiguous [", k.size(0), "] tensor (one slot per token), got shape ",
                slot_mapping.sizes(), " strides ", slot_mapping.strides());
    p.tokens = k.size(0);
    p.nheads_k = int(k.size(1));
    p.head_dim = int(k.size(2));
    p.num_blocks = k_cache.size(0);
    p.block_size = int(k_cache.size(1));
    p.k = attn_tensor(k);
    p.v = attn_tensor(v);
    p.k_cache = attn_tensor(k_cache);
    p.v_cache = attn_tensor(v_cache);
    p.slot_mapping = slot_mapping.data_ptr<int64_t>();
    if (p.tokens == 0 || k.numel() == 0) return;
    Backend::check_slots(p);
    Backend::kv_write(p);
  }
};

// Registers the family's ops for one dispatch key; called inside TORCH_LIBRARY_IMPL.
template <typename Backend>
void register_attention_ops(torch::Library& m) {
  m.impl("flash_attn_fwd", &AttentionOps<Backend>::fwd);
  m.impl("flash_attn_bwd", &AttentionOps<Backend>::bwd);
  m.impl("write_kv_cache", &AttentionOps<Backend>::write_kv_cache);
}

}  // namespace llmkern
