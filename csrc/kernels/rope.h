// Rotary position embedding (RoPE) kernel parameters and CPU entry points.
// src/dst are [tokens, heads, head_dim] with token and head strides in elements and unit stride along
// head_dim; src == dst is the in-place case. Only the first rotary_dim features of each head rotate;
// out of place, the rest are copied.
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

// For pair (a, b) with angle theta = position * inv_freq[i]:
//   a' = a cos - b sin,  b' = b cos + a sin   (inverse: sin -> -sin, the transpose, i.e. the backward)
// NeoX style pairs feature i with i + rotary_dim/2; GPT-J style pairs 2i with 2i + 1.
struct RopeParams {
  DType dtype;  // of src and dst; the cache is always float32
  int64_t tokens = 0, heads = 0, head_dim = 0, rotary_dim = 0;
  const int64_t* positions = nullptr;  // [tokens], each in [0, max_position)
  const float* cos_sin_cache = nullptr;  // [max_position, rotary_dim]: cos(theta_0..r/2-1), sin(...)
  int64_t max_position = 0;
  const void* src = nullptr;
  int64_t src_token_stride = 0, src_head_stride = 0;
  void* dst = nullptr;
  int64_t dst_token_stride = 0, dst_head_stride = 0;
  bool is_neox = true;
  bool inverse = false;
};

LLMKERN_DECLARE_CPU_KERNEL(rope_kernel, RopeParams)

}  // namespace llmkern
