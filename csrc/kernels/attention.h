// Attention kernel parameters (shared by the CPU and CUDA cores) and the CPU entry points.
//
// Math (flash-attn 2's definition, llmkern/ops/attention.py: attention_ref): for query row i of sequence b
// and key j, with Lq, Lk that sequence's lengths and the bottom-right alignment d = Lk - Lq,
//   s_ij = scale * q_i . k_j;  s_ij = softcap * tanh(s_ij / softcap) when softcap > 0;
//   s_ij -= slope_h * |i + d - j|  when alibi_slopes are given;
//   j is masked out when window_left >= 0 and j < i + d - window_left, or window_right >= 0 and
//   j > i + d + window_right (causal is window_right = 0);
//   out_i = sum_j softmax_j(s_i) v_j,  lse_i = log sum_j exp(s_ij) (natural log).
// A row with no visible key gets out = 0 and lse = +inf (so the backward's exp(s - lse) is 0 there).
// GQA: query head h reads kv head h / (nheads / nheads_k).
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

// Where the [rows, heads, head_dim] rows of a tensor live: element (b, i, h, :) of sequence b at position
// i is ptr + b * batch_stride + (start_b + i) * row_stride + h * head_stride, head_dim contiguous. start_b
// is cu_seqlens[b] for packed (varlen) tensors, whose batch_stride is 0, and 0 otherwise. Strides are in
// elements. For a paged cache (block_table set) batch_stride is the stride between blocks: key j of
// sequence b is in block block_table[b][j / block_size], row j % block_size.
struct AttnTensor {
  void* ptr = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
};

struct AttnParams {
  DType dtype;  // of q, k, v, out (and of dout, dq, dk, dv in the backward)
  int batch = 0, nheads = 0, nheads_k = 0, head_dim = 0;
  int seqlen_q = 0, seqlen_k = 0;  // per sequence; for varlen (cu_seqlens set) the maxima
  AttnTensor q, k, v, out;
  AttnTensor lse;  // float32, head_dim 1: [batch, nheads, seqlen_q] (row_stride 1) or [nheads, total_q]

  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1] offsets of packed q rows, or null (fixed length)
  const int32_t* cu_seqlens_k = nullptr;  // [batch + 1] offsets of packed k/v rows (their lengths, if paged)
  const int32_t* seqused_k = nullptr;     // [batch] keys attended per sequence (kv cache), or null
  const int32_t* kv_batch_idx = nullptr;  // [batch] k/v batch index of each sequence (non-paged cache)
  const int32_t* block_table = nullptr;   // [batch, block_table_stride] paged k/v blocks, or null
  int64_t block_table_stride = 0;
  int block_size = 0;

  float scale = 1.f;
  float softcap = 0.f;  // 0: off
  int window_left = -1, window_right = -1;  // -1: unbounded
  const float* alibi_slopes = nullptr;      // [nheads] (alibi_batch_stride 0) or [batch, nheads]
  int64_t alibi_batch_stride = 0;

  int num_splits = 0;  // split-K over the keys (flash-decoding); 0: the kernel chooses

  // Device scratch for the split partials of the CUDA decode path (float32, no initialisation needed),
  // sized by attn_fwd_cuda_workspace_bytes (cuda/launch.h); null / too small: the kernel does not split
  // across blocks. Unused by the CPU kernels.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// Backward: dq, dk, dv from dout, q, k, v, out, lse (the forward's fields, paged / seqused / kv_batch_idx
// unused). dq, dk, dv have q's and k's shapes; dk and dv sum over the query heads sharing a kv head.
// One workspace, allocated by the caller: delta, float32 [total q rows, nheads] (rowsum(dout * out), laid out
// as lse).
struct AttnBwdParams {
  AttnParams fwd;
  AttnTensor dout, dq, dk, dv;
  AttnTensor delta;        // float32, laid out like lse
  bool deterministic = false;  // bitwise-identical results run to run (the CPU kernels always are)
};

// The serving engine's write path: k/v [tokens, nheads_k, head_dim] into slots of a paged cache
// [num_blocks, block_size, nheads_k, head_dim]; slot s = block * block_size + offset, -1: skip the token.
struct KvWriteParams {
  DType dtype;
  int64_t tokens = 0;
  int nheads_k = 0, head_dim = 0, block_size = 0;
  int64_t num_blocks = 0;
  AttnTensor k, v;              // batch_stride unused; row_stride: between tokens
  AttnTensor k_cache, v_cache;  // batch_stride: between blocks
  const int64_t* slot_mapping = nullptr;  // [tokens]
};

LLMKERN_DECLARE_CPU_KERNEL(attn_fwd_kernel, AttnParams)
LLMKERN_DECLARE_CPU_KERNEL(attn_bwd_kernel, AttnBwdParams)
LLMKERN_DECLARE_CPU_KERNEL(kv_write_kernel, KvWriteParams)

}  // namespace llmkern
