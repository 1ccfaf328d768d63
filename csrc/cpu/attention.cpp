// Attention on the CPU: the shared tensor-level ops (ops/attention.h) over the ISA-dispatched cores, plus
// the host-side checks of the index tensors (free here, since they live in host memory).
#include <climits>

#include "ops/attention.h"

namespace llmkern {
namespace {

// Offsets cu[0..batch] of packed rows: non-decreasing, from >= 0, within `rows`, lengths <= max_len.
void check_offsets(const int32_t* cu, int64_t batch, const char* name, int64_t rows, int64_t max_len,
                   const char* max_name) {
  TORCH_CHECK(cu[0] >= 0, name, ": expected offsets >= 0, got ", cu[0], " at index 0");
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    TORCH_CHECK(len >= 0, name, ": expected non-decreasing offsets, got ", cu[b], " then ", cu[b + 1], " at index ", b);
    TORCH_CHECK(len <= max_len, name, ": sequence ", b, " has length ", len, " > ", max_name, "=", max_len);
  }
  TORCH_CHECK(cu[batch] <= rows, name, ": last offset ", cu[batch], " is beyond the ", rows, " packed rows");
}

struct CpuAttention {
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  static void fwd(const AttnParams& p) { attn_fwd_kernel(p); }
  static void bwd(const AttnBwdParams& p) { attn_bwd_kernel(p); }
  static void kv_write(const KvWriteParams& p) { kv_write_kernel(p); }

  // q_rows / k_rows: size(0) of q and k (packed rows, batch, or number of cache blocks).
  static void check_indices(const AttnParams& p, int64_t q_rows, int64_t k_rows) {
    const int64_t capacity = p.block_table ? p.block_table_stride * p.block_size : p.seqlen_k;
    if (p.cu_seqlens_q) check_offsets(p.cu_seqlens_q, p.batch, "cu_seqlens_q", q_rows, p.seqlen_q, "max_seqlen_q");
    if (p.cu_seqlens_k) {
      check_offsets(p.cu_seqlens_k, p.batch, "cu_seqlens_k", p.block_table ? INT64_MAX : k_rows, p.seqlen_k,
                    "max_seqlen_k");
      for (int64_t b = 0; p.block_table && b < p.batch; ++b)
        TORCH_CHECK(p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] <= capacity, "cu_seqlens_k: sequence ", b, " has ",
                    p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b], " keys, more than its block_table row holds (",
                    capacity, ")");
    }
    for (int64_t b = 0; p.seqused_k && b < p.batch; ++b)
      TORCH_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] <= capacity, "seqused_k: value ", p.seqused_k[b],
                  " at index ", b, " is outside [0, ", capacity, "] (the cache's capacity per sequence)");
    for (int64_t b = 0; p.kv_batch_idx && b < p.batch; ++b)
      TORCH_CHECK_INDEX(p.kv_batch_idx[b] >= 0 && p.kv_batch_idx[b] < k_rows, "cache_batch_idx: value ",
                        p.kv_batch_idx[b], " at index ", b, " is outside [0, ", k_rows, ") (the cache's batch)");
    for (int64_t b = 0; p.block_table && b < p.batch; ++b) {
      const int64_t len = p.seqused_k ? p.seqused_k[b]
                          : p.cu_seqlens_k ? int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b]
                                           : p.seqlen_k;
      const int32_t* row = p.block_table + b * p.block_table_stride;
      for (int64_t j = 0; j < (len + p.block_size - 1) / p.block_size; ++j)
        TORCH_CHECK_INDEX(row[j] >= 0 && row[j] < k_rows, "block_table: entry ", row[j], " at [", b, ", ", j,
                          "] is outside [0, ", k_rows, ") (the number of cache blocks)");
    }
  }

  static void check_slots(const KvWriteParams& p) {
    const int64_t slots = p.num_blocks * p.block_size;
    for (int64_t t = 0; t < p.tokens; ++t)
      TORCH_CHECK_INDEX(p.slot_mapping[t] >= -1 && p.slot_mapping[t] < slots, "slot_mapping: value ",
                        p.slot_mapping[t], " at index ", t, " is outside [-1, ", slots,
                        ") (-1 skips a token; the cache has num_blocks * block_size slots)");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) { register_attention_ops<CpuAttention>(m); }

}  // namespace llmkern
